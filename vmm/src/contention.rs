//! Keeping the VMM's own threads from stalling the guest while a teardown's
//! O(n) kernel work runs beside it.
//!
//! A teardown moves guest pages out (`mremap`, which holds the process's
//! mmap lock for writing, one chunk at a time) and gives them back later
//! (`MADV_DONTNEED`, holding it for reading). Every guest refault needs
//! the lock for reading (KVM's `get_user_pages`). Measured with
//! `perf record -e sched:sched_switch -g` on the 2-core development host,
//! two things turned this into guest stalls of 10–150 ms at 4 GiB:
//!
//! * **the fault thread took the mmap lock for writing**: glibc grows a
//!   thread's malloc arena with `mprotect` (160 calls in five 1 GiB
//!   teardowns, for the mmu's fresh leaves). A writer queued behind the
//!   releaser's long read hold blocks every new reader, so every vCPU
//!   fault waited for it. [`tune_allocator`] makes arenas grow in big
//!   steps and never shrink, so the steady state makes no such call;
//! * **the woken fault thread waited for a CPU**: with two vCPUs and the
//!   teardown thread busy on both cores it ran only at the next scheduler
//!   tick (~4 ms), while vCPUs waited on it in `handle_userfault`.
//!   [`set_own_slice`] asks EEVDF (Linux 6.12+) for a short slice, so the
//!   woken thread preempts at once. No privilege needed; older kernels
//!   refuse it and nothing changes.
//!
//! Tests: `a_threads_arena_grows_in_one_step_and_is_not_trimmed`,
//! `a_short_slice_is_taken_and_given_back`; the effect on the guest is
//! measured by `odpvm bench teardown` (`stall_ns_*`).

/// The slice the latency-critical threads ask for: short, since they run
/// for microseconds at a time and a vCPU waits on each run.
pub const LATENCY_SLICE_NS: u64 = 100_000;

/// Ask for a `slice_ns` EEVDF slice for the calling thread (normal policy,
/// nice unchanged); 0 goes back to the default. Returns whether the kernel
/// took it.
pub fn set_own_slice(slice_ns: u64) -> bool {
    // The kernel's `struct sched_attr` (version 1, 56 bytes), spelled out:
    // libc does not bind it on every target.
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }
    // Keep the thread's nice value (-20..=19; getpriority on the calling
    // thread cannot fail).
    // SAFETY: getpriority has no memory arguments.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        nice,
        runtime: slice_ns,
        ..SchedAttr::default()
    };
    // SAFETY: `attr` is a valid, initialised sched_attr of the size it
    // declares; pid 0 is the calling thread; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        log::debug!(
            "sched_setattr(slice {slice_ns} ns): {}",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

/// Runs `f` with the calling thread's slice set to [`LATENCY_SLICE_NS`],
/// then back to the default: for a thread that holds the mmap lock for
/// writing in bursts (it then waits less for a CPU when preempted while
/// holding it, so vCPUs queued on the lock wait less).
pub fn with_short_slice<T>(f: impl FnOnce() -> T) -> T {
    let set = set_own_slice(LATENCY_SLICE_NS);
    let out = f();
    if set {
        set_own_slice(0);
    }
    out
}

/// How far a malloc arena grows at a time, and how much free space at its
/// top it keeps rather than give back.
const ARENA_STEP: i32 = 32 << 20;

/// Make glibc's malloc grow arenas `ARENA_STEP` at a time and never trim
/// them, so threads a vCPU waits on (the fault thread) do not take the
/// mmap lock for writing (`mprotect`, `brk`) in steady state. Costs
/// address space, not memory: untouched arena pages are never resident.
/// Once per process; the VMM calls it when it builds a VM.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only sets allocator parameters; both are valid
        // options with in-range values.
        let ok = unsafe {
            libc::mallopt(libc::M_TOP_PAD, ARENA_STEP) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * ARENA_STEP) == 1
                // Blocks up to this size come from the arenas too, not
                // from an mmap/munmap pair each (glibc's largest value).
                && libc::mallopt(libc::M_MMAP_THRESHOLD, ARENA_STEP) == 1
        };
        if !ok {
            log::debug!("mallopt refused the arena tuning; allocation may take the mmap lock");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice the calling thread has, from `/proc/thread-self/sched`.
    fn own_slice() -> Option<u64> {
        let s = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = s.lines().find(|l| l.starts_with("se.slice"))?;
        line.split(':').nth(1)?.trim().parse().ok()
    }

    #[test]
    fn a_short_slice_is_taken_and_given_back() {
        std::thread::spawn(|| {
            let before = own_slice();
            let during = with_short_slice(own_slice);
            let after = own_slice();
            if set_own_slice(LATENCY_SLICE_NS) {
                assert_eq!(during, Some(LATENCY_SLICE_NS));
                assert_eq!(after, before, "the default slice is restored");
            } else {
                // A kernel without custom slices: nothing changed.
                assert_eq!(during, before);
            }
        })
        .join()
        .unwrap();
    }

    /// The writable extent of the mapping holding `addr` (`/proc/self/maps`).
    fn mapping_of(addr: usize) -> (usize, usize) {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .filter_map(|l| {
                let (range, _) = l.split_once(' ')?;
                let (a, b) = range.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            })
            .find(|&(a, b)| a <= addr && addr < b)
            .unwrap()
    }

    /// What the fault thread does after each teardown: allocate the mmu's
    /// fresh leaves (4 KiB each, megabytes in all) while the reclaimer
    /// frees the old ones. With the tuning, the thread's arena grows once,
    /// by a big step, and never shrinks: no `mprotect` (mmap lock taken
    /// for writing) in steady state, seen as an unchanged mapping.
    #[test]
    fn a_threads_arena_grows_in_one_step_and_is_not_trimmed() {
        tune_allocator();
        std::thread::spawn(|| {
            let first = vec![0u8; 4096];
            let before = mapping_of(first.as_ptr() as usize);
            for _round in 0..4 {
                let leaves: Vec<Vec<u8>> = (0..2048).map(|_| vec![1u8; 4096]).collect();
                drop(leaves);
                assert_eq!(mapping_of(first.as_ptr() as usize), before);
            }
        })
        .join()
        .unwrap();
    }
}
