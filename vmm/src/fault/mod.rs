//! The fault-handling thread: every missing-page fault on guest RAM (from a
//! vCPU, from KVM on its behalf, or from a VMM thread) is resolved through
//! the mmu protocol:
//!
//! ```text
//!   T = try_read_begin(page)  → populate with DONTWAKE (zero page, or the
//!   boot image's page) → install(T) → UFFDIO_WAKE
//! ```
//!
//! so the faulting thread never runs on a page the mmu does not track, and
//! an invalidation racing with the fault makes it start over.
//!
//! This thread must never block on an invalidation: the invalidation's
//! `MADV_DONTNEED` waits until this thread has read the REMOVE event it
//! generates. So a fault colliding with a range invalidation is deferred
//! and retried, never waited for. A fault colliding with a teardown that
//! is retiring the faulting region is served without tracking (fresh
//! memory: a zero page or the boot image's page): when the teardown moves
//! the old pages out in place, the vCPU must not wait for every chunk of
//! RAM to move (test `teardown::stamped_writers_see_no_stale_page_and_lose_no_write`);
//! when it swaps the mapping, the page dies with the retired one and the
//! vCPU must not stay blocked in the kernel while vCPUs are paused. An
//! untracked page is never seen by a device (devices fault through the
//! mmu, which then tracks it) and goes at the next invalidation.
//!
//! Supervision: the thread beats a heartbeat on every pass and records why
//! it can no longer serve the guest (it ended on an error, or guest memory
//! ran out) in [`FaultStats::failure`]. [`Watchdog`], polled by the VMM's
//! main loop, turns a failure, or guest faults left unread while the
//! heartbeat stands still ([`STALL_AFTER`]), into a stop of the VM with the
//! reason as its exit (`a_dead_fault_thread_stops_the_vm_with_the_reason`,
//! `a_stalled_fault_thread_does_not_block_the_main_loop` in
//! `vmm/tests/api.rs`).

use crate::memory::GuestRam;
use crate::uffd::Userfault;
use mmu::Mmu;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

mod handler;

use handler::Handler;
pub use handler::{GuestResolver, MAX_FAULT_AROUND};

/// Counters of the fault thread.
#[derive(Debug, Default)]
pub struct FaultStats {
    /// Faults resolved and installed in the mmu.
    pub faults: AtomicU64,
    /// Pages those faults installed.
    pub pages: AtomicU64,
    /// Installs that raced with an invalidation and started over.
    pub retries: AtomicU64,
    /// Faults deferred because an invalidation of their page was running.
    pub deferred: AtomicU64,
    /// Faults on mappings being retired by a teardown, served untracked.
    pub untracked: AtomicU64,
    /// REMOVE events (our own MADV_DONTNEED/REMOVE on guest RAM).
    pub removes: AtomicU64,
    /// Faults that could not be resolved properly (logged; the faulting
    /// thread was woken anyway).
    pub errors: AtomicU64,
    /// Pages made present for devices (the RNIC's page faults/prefetches).
    pub device_pages: AtomicU64,
    /// Pages fault-around resolved beyond the faulting one.
    pub speculative: AtomicU64,
    /// Pages resolved per fault.
    pub pages_per_fault: mmu::hist::Histogram,
    /// Installed faults per RAM region (index order).
    pub per_region: Vec<AtomicU64>,
    /// Expected races with a teardown (a fault from before it on a mapping
    /// it retired, a page of a retiring mapping that is already gone):
    /// served or dropped as designed, counted apart from `errors`
    /// (`teardown_races_are_not_fault_errors` in `vmm/tests/api.rs`).
    pub teardown_races: AtomicU64,
    /// Passes of the fault thread's loop (the watchdog's heartbeat).
    pub heartbeat: AtomicU64,
    /// Why the fault thread can no longer serve the guest, once it cannot.
    pub failure: parking_lot::Mutex<Option<String>>,
    /// Test hook (see [`FaultStats::inject`]).
    inject: std::sync::atomic::AtomicU8,
}

/// A failure the supervision tests make the fault thread suffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Injected {
    /// End the thread as a read error would.
    Exit = 1,
    /// Stop reading events (but still obey the stop request).
    Stall = 2,
}

impl FaultStats {
    fn new(regions: usize) -> Self {
        FaultStats {
            per_region: (0..regions).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Make the fault thread fail the way `what` says, to prove that the
    /// VMM notices (supervision tests only; nothing else calls it).
    #[doc(hidden)]
    pub fn inject(&self, what: Injected) {
        self.inject.store(what as u8, Ordering::SeqCst);
    }

    /// Record why the guest can no longer be served (the first reason wins).
    fn fail(&self, why: String) {
        log::error!("fault handler: {why}");
        self.failure.lock().get_or_insert(why);
    }
}

/// Guest faults unread for this long, with no pass of the fault thread,
/// mean it is stalled.
pub const STALL_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Watches a VM's fault thread from another thread (the VMM's main loop).
pub struct Watchdog {
    stats: Arc<FaultStats>,
    uffd: Option<Arc<Userfault>>,
    /// Heartbeat when faults were first seen waiting, and when.
    waiting_since: Option<(u64, std::time::Instant)>,
    reported: bool,
}

impl Watchdog {
    pub fn new(vm: &crate::vm::VmHandle) -> Self {
        Watchdog {
            stats: vm.faults().clone(),
            uffd: vm.uffd().cloned(),
            waiting_since: None,
            reported: false,
        }
    }

    /// Let every thread blocked on guest memory go on without the fault
    /// thread: guest RAM is unregistered from userfaultfd, which wakes the
    /// faulting threads and leaves later faults to the kernel. Only for a
    /// VM being stopped because its fault thread failed: nothing is tracked
    /// after.
    /// Events already queued are read here and dropped: that completes
    /// any `madvise` waiting for its REMOVE event to be read (an
    /// invalidation in flight), so the VM can be torn down.
    pub fn release(&self, vm: &crate::vm::VmHandle) {
        let Some(uffd) = &self.uffd else {
            return;
        };
        for r in vm.ram().regions() {
            uffd.unregister(r.hva, r.size);
        }
        let mut dropped = 0u64;
        while let Ok(Some(_)) = uffd.read_event() {
            dropped += 1;
        }
        log::warn!("fault thread failed: guest RAM released from userfaultfd, {dropped} queued events dropped");
    }

    /// Why the VM must stop, once (then None).
    pub fn check(&mut self) -> Option<String> {
        if self.reported {
            return None;
        }
        if let Some(why) = self.stats.failure.lock().clone() {
            self.reported = true;
            return Some(format!("fault thread failed: {why}"));
        }
        let uffd = self.uffd.as_ref()?;
        let beat = self.stats.heartbeat.load(Ordering::SeqCst);
        if !readable(uffd.fd()) {
            self.waiting_since = None;
            return None;
        }
        match self.waiting_since {
            Some((b, since)) if b == beat => {
                if since.elapsed() >= STALL_AFTER {
                    self.reported = true;
                    return Some(format!(
                        "fault thread stalled: guest page faults unanswered for {:.1}s",
                        since.elapsed().as_secs_f64()
                    ));
                }
            }
            _ => self.waiting_since = Some((beat, std::time::Instant::now())),
        }
        None
    }
}

/// Whether `fd` has something to read now.
fn readable(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// How faults are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Tracking {
    /// Through the mmu protocol (the product).
    #[default]
    Mmu,
    /// Populate and wake with no mmu at all: the benchmark baseline for
    /// what tracking costs.
    RawUffd,
    /// No userfaultfd: the kernel fills pages on first touch. Nothing is
    /// tracked and invalidation cannot work; benchmarks only.
    None,
}

impl std::str::FromStr for Tracking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmu" | "tracked" => Ok(Tracking::Mmu),
            "raw-uffd" | "raw" => Ok(Tracking::RawUffd),
            "none" | "no-uffd" => Ok(Tracking::None),
            _ => Err(format!("unknown tracking {s:?} (mmu, raw-uffd, none)")),
        }
    }
}

impl Tracking {
    pub fn as_str(self) -> &'static str {
        match self {
            Tracking::Mmu => "mmu",
            Tracking::RawUffd => "raw-uffd",
            Tracking::None => "none",
        }
    }
}

/// The running fault thread.
pub struct FaultThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
    pub stats: Arc<FaultStats>,
}

impl FaultThread {
    /// Counters for a VM with no fault thread (`Tracking::None`).
    pub fn idle_stats(regions: usize) -> Arc<FaultStats> {
        Arc::new(FaultStats::new(regions))
    }
}

impl FaultThread {
    pub fn spawn(
        tracking: Tracking,
        fault_around: u64,
        uffd: Arc<Userfault>,
        ram: Arc<GuestRam>,
        mmu: Arc<Mmu>,
    ) -> std::io::Result<FaultThread> {
        let stats = Arc::new(FaultStats::new(ram.regions().len()));
        let stop = EventFd::new(libc::EFD_CLOEXEC)?;
        let handler = Handler::new(tracking, fault_around, uffd, ram, mmu, stats.clone());
        let stop_rx = stop.try_clone()?;
        let handle = std::thread::Builder::new()
            .name("odpvm-fault".into())
            .spawn(move || {
                // Every guest fault waits on this thread: it must run as
                // soon as it is woken, whatever else is busy.
                let class = crate::contention::make_latency_critical();
                log::debug!("fault thread scheduling: {class}");
                handler.run(stop_rx)
            })?;
        Ok(FaultThread {
            stop,
            handle: Some(handle),
            stats,
        })
    }

    /// Restrict the fault thread to `cpus` (`CpuPlan::waited_on`).
    pub fn pin(&self, cpus: &[usize]) -> std::io::Result<()> {
        match &self.handle {
            Some(h) => crate::affinity::pin_thread(h, cpus),
            None => Err(std::io::Error::from_raw_os_error(libc::ESRCH)),
        }
    }
}

impl Drop for FaultThread {
    /// Stop the thread and join it, unless it does not stop within a
    /// second (stuck in the kernel): then it is left behind, so a VM whose
    /// fault thread stalled can still be torn down and reported.
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let t0 = std::time::Instant::now();
            while !h.is_finished() && t0.elapsed() < std::time::Duration::from_secs(1) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                log::error!("the fault thread did not stop; leaving it behind");
            }
        }
    }
}

/// Whether the host page at `hva` (page aligned, `len` bytes) is present
/// (`mincore`): a page the kernel says exists must really be there.
pub(crate) fn present(hva: u64, len: u64) -> bool {
    let pages = len.div_ceil(crate::layout::PAGE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: mincore only reads the page tables of the range and writes
    // `pages` bytes into `vec`, which has that length.
    let rc = unsafe {
        libc::mincore(
            (hva & !(crate::layout::PAGE - 1)) as *mut libc::c_void,
            len as usize,
            vec.as_mut_ptr(),
        )
    };
    rc == 0 && vec.iter().all(|b| b & 1 == 1)
}
