//! Process memory for the RNIC tests: an anonymous mapping registered with
//! an mmu as an address space whose iova == host address. Guarded, every
//! invalidated page becomes PROT_NONE until a fault maps it again, so a
//! device touching a page after its invalidation returned (a stale access)
//! crashes the test. Shared by the emulated, hardening and RoCE tests.
#![allow(dead_code)]

use mmu::{
    Config, Error as MmuError, FaultResolver, Invalidation, InvalidationKind, Mirror, MirrorRole,
    Mmu, RegionSpec, Translation, PAGE_SIZE,
};
use rdma_passthrough::AddressSpace;
use std::sync::Arc;

pub const MIB: u64 = 1 << 20;

/// A fresh anonymous read-write mapping of `len` bytes (test lifetime).
pub fn mmap(len: u64) -> u64 {
    // SAFETY: a fresh anonymous mapping, never unmapped (test lifetime).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

fn protect(addr: u64, len: u64, rw: bool) {
    let prot = if rw {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_NONE
    };
    // SAFETY: the range lies in a mapping the test owns.
    let rc = unsafe { libc::mprotect(addr as *mut _, len as usize, prot) };
    assert_eq!(rc, 0);
}

/// The backing of a guarded space: invalidated pages become inaccessible.
struct Guard;
impl Mirror for Guard {
    fn name(&self) -> &str {
        "guard"
    }
    fn role(&self) -> MirrorRole {
        MirrorRole::Backing
    }
    fn invalidate_start(&self, inv: &Invalidation) {
        if let InvalidationKind::Range { gpa, len } = inv.kind {
            protect(gpa, len, false);
        }
    }
    fn invalidate_wait(&self, _: &Invalidation) {}
}

/// Resolves by making the pages accessible again.
struct GuardResolver {
    mmu: std::sync::Weak<Mmu>,
}
impl FaultResolver for GuardResolver {
    fn resolve(&self, gpa: u64, len: u64, _write: bool) -> Result<(), MmuError> {
        let mmu = self.mmu.upgrade().expect("mmu alive");
        mmu.fault_in(gpa, len, |t, out| {
            protect(t.gpa(), t.len(), true);
            let mut p = t.gpa();
            while p < t.end() {
                out.push(Translation::small(p, p));
                p += PAGE_SIZE;
            }
            Ok(())
        })
        .map(|_| ())
    }
}

/// `len` bytes of process memory as an address space.
pub struct Memory {
    pub base: u64,
    pub len: u64,
    pub mmu: Arc<Mmu>,
    pub space: Arc<AddressSpace>,
}

pub fn memory(len: u64, guard: bool) -> Memory {
    let base = mmap(len);
    let mmu = Mmu::new(Config::default()).unwrap();
    mmu.add_region(RegionSpec {
        name: "buf".into(),
        gpa: base,
        size: len,
        hva: base,
    })
    .unwrap();
    let resolver: Arc<dyn FaultResolver> = if guard {
        mmu.register_mirror(Arc::new(Guard));
        Arc::new(GuardResolver {
            mmu: Arc::downgrade(&mmu),
        })
    } else {
        Arc::new(mmu::DirectResolver::new(mmu.clone()))
    };
    let space = AddressSpace::new("test", mmu.clone(), resolver);
    Memory {
        base,
        len,
        mmu,
        space,
    }
}

/// CPU seconds used so far by this process's thread named `comm`.
pub fn thread_cpu(comm: &str) -> f64 {
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim_end() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        return (f[0] + f[1]) as f64 / hz;
    }
    panic!("no thread named {comm}");
}
