//! userfaultfd: creation, registration and the three resolving ioctls,
//! with their errors sorted into what the fault handler must do.

use std::os::fd::{AsRawFd, RawFd};
use userfaultfd::{Event, FeatureFlags, Uffd, UffdBuilder};

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "creating a userfaultfd (needs /dev/userfaultfd or CAP_SYS_PTRACE for kernel faults): {0}"
    )]
    Create(userfaultfd::Error),
    #[error("registering {len:#x} bytes at {addr:#x} with userfaultfd: {source}")]
    Register {
        addr: u64,
        len: u64,
        source: userfaultfd::Error,
    },
    #[error("reading userfaultfd events: {0}")]
    Read(userfaultfd::Error),
}

/// How a resolving ioctl ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// The first `n` bytes of the range are now present (the kernel stops
    /// at the first page that already was).
    Filled(u64),
    /// The range is now present.
    Done,
    /// Some page of it was present already (another fault won the race).
    Exists,
    /// The memory layout is changing (a REMOVE is pending): try again.
    Again,
    /// Anything else: errno.
    Failed(i32),
}

pub struct Userfault {
    uffd: Uffd,
}

fn classify(e: userfaultfd::Error) -> Fill {
    use userfaultfd::Error as E;
    match e {
        E::CopyFailed(errno) | E::ZeropageFailed(errno) => match errno as i32 {
            libc::EEXIST => Fill::Exists,
            libc::EAGAIN => Fill::Again,
            other => Fill::Failed(other),
        },
        E::PartiallyCopied(_) => Fill::Again,
        _ => Fill::Failed(libc::EIO),
    }
}

impl Userfault {
    /// A non-blocking userfaultfd that also sees faults taken by the kernel
    /// on the guest's behalf (KVM reading guest memory).
    pub fn new() -> Result<Self, UffdError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(
                FeatureFlags::EVENT_REMOVE
                    | FeatureFlags::MISSING_SHMEM
                    | FeatureFlags::MISSING_HUGETLBFS,
            )
            .create()
            .map_err(UffdError::Create)?;
        Ok(Userfault { uffd })
    }

    pub fn register(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.uffd
            .register(addr as *mut libc::c_void, len as usize)
            .map(|_| ())
            .map_err(|source| UffdError::Register { addr, len, source })
    }

    pub fn unregister(&self, addr: u64, len: u64) {
        if let Err(e) = self
            .uffd
            .unregister(addr as *mut libc::c_void, len as usize)
        {
            log::warn!("unregistering {addr:#x}+{len:#x} from userfaultfd: {e}");
        }
    }

    /// Map zero pages over `[addr, addr + len)` without waking the faulter.
    pub fn zero(&self, addr: u64, len: u64) -> Fill {
        // SAFETY: the range belongs to a mapping registered with this
        // userfaultfd; the kernel validates it and only fills missing pages.
        match unsafe {
            self.uffd
                .zeropage(addr as *mut libc::c_void, len as usize, false)
        } {
            Ok(_) => Fill::Done,
            Err(e) => classify(e),
        }
    }

    /// Copy `src` into `[addr, addr + src.len())` without waking the faulter.
    pub fn copy(&self, addr: u64, src: &[u8]) -> Fill {
        // SAFETY: `src` is a live buffer of the given length; the
        // destination is a registered range the kernel validates.
        match unsafe {
            self.uffd.copy(
                src.as_ptr().cast(),
                addr as *mut libc::c_void,
                src.len(),
                false,
            )
        } {
            Ok(n) if n < src.len() => Fill::Filled(n as u64),
            Ok(_) => Fill::Done,
            Err(e) => classify(e),
        }
    }

    /// Wake the threads waiting on faults in the range.
    pub fn wake(&self, addr: u64, len: u64) {
        if let Err(e) = self.uffd.wake(addr as *mut libc::c_void, len as usize) {
            log::warn!("waking {addr:#x}+{len:#x}: {e}");
        }
    }

    /// The next event, or None when none is queued.
    pub fn read_event(&self) -> Result<Option<Event>, UffdError> {
        self.uffd.read_event().map_err(UffdError::Read)
    }

    pub fn fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }
}
