//! Keeping the VMM's own threads from stalling the guest while a teardown's
//! O(n) kernel work runs beside it.
//!
//! A teardown moves guest pages out (`mremap`, which holds the process's
//! mmap lock for writing, one chunk at a time) and gives them back later
//! (`MADV_DONTNEED`, holding it for reading). Every guest refault needs
//! the lock for reading (KVM's `get_user_pages`). Measured with
//! `perf record -a -e sched:sched_switch -g` on the 2-core development
//! host, the VMM's own threads turned this into guest stalls of 10–150 ms
//! at 4 GiB:
//!
//! * **the fault thread took the mmap lock for writing**: glibc grows a
//!   thread's malloc arena with `mprotect`, a page or so at a time (160
//!   calls in five 1 GiB teardowns, for the mmu's fresh leaves). A writer
//!   queued behind the releaser's long read hold blocks every new reader,
//!   so every vCPU fault waited for it. [`tune_allocator`] makes the heap
//!   grow in 32 MiB steps and not shrink back;
//! * **the woken fault thread waited for a CPU**: with two vCPUs and the
//!   teardown thread busy on both cores it ran only at the next scheduler
//!   tick (~4 ms), while vCPUs waited on it in `handle_userfault`.
//!   [`make_latency_critical`] makes it `SCHED_FIFO` when the process may,
//!   else asks EEVDF (Linux 6.12+) for a short slice ([`set_own_slice`]:
//!   no privilege needed; older kernels refuse it and nothing changes);
//! * **the thread moving pages out was preempted holding the lock**:
//!   [`with_burst_class`] runs it `SCHED_FIFO` (or with a short slice) in
//!   4 MiB bursts, and [`breathe`] pauses it between them so the vCPUs
//!   keep most of the CPUs through the O(n) phase;
//! * **the RNIC freed its old page table with `munmap`** (one 32 MiB hash
//!   map at 4 GiB) on a nice-19 thread, preempted while the kernel held
//!   the mmap lock for it: the device table is now a radix of recycled
//!   4 KiB leaves (`rdma-passthrough/src/emulated/page_table.rs`);
//! * **a real-time waiter on the mmu spinlock only yielded** to a
//!   preempted normal holder on its CPU: ~0.95 s livelock (the mmu's lock
//!   now sleeps after yielding, `mmu/src/lib.rs`);
//! * with `--pin-vcpus` the VMM's threads keep off the vCPUs' CPUs
//!   (`affinity.rs`), except, with one vCPU, the two it waits on (the
//!   fault thread and the mover), which run on its CPU so that it never
//!   waits on them with its own CPU idle.
//!
//! Tests: `vmm/tests/allocator.rs` (the heap grows in big steps),
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

/// Make the calling thread real-time (`SCHED_FIFO`, lowest priority) if
/// the process may (root or `CAP_SYS_NICE`), else give it a short slice.
/// For the fault thread only: it runs microseconds per fault and every
/// vCPU fault waits on it, so it must never wait behind a busy thread of
/// the VMM or of the host. The kernel's RT throttling (95 % by default)
/// bounds what a runaway would take. Returns which one it got.
pub fn make_latency_critical() -> &'static str {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return "fifo";
    }
    if set_own_slice(LATENCY_SLICE_NS) {
        "short-slice"
    } else {
        "default"
    }
}

/// Whether this process may make threads `SCHED_FIFO` (root,
/// `CAP_SYS_NICE` or an `RLIMIT_RTPRIO`), asked once on a throwaway thread.
pub fn realtime_permitted() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        std::thread::spawn(|| {
            let fifo = libc::sched_param { sched_priority: 1 };
            // SAFETY: pid 0 is this throwaway thread; valid sched_param.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) == 0 }
        })
        .join()
        .unwrap_or(false)
    })
}

/// Runs `f`, a loop of O(n) kernel work in bounded bursts that each hold
/// the mmap lock for writing (a teardown moving guest pages out), in the
/// scheduling class that keeps a burst short as the guest feels it:
/// `SCHED_FIFO` if the process may (never preempted while holding the
/// lock, so a vCPU queued on it waits for the burst's work only), else a
/// short EEVDF slice (preempted, it gets a CPU back sooner). The thread's
/// class is restored afterwards. `f` must call [`breathe`] between bursts.
pub fn with_burst_class<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: pid 0 is the calling thread; `old` is a valid out-pointer.
    let (policy, mut old) = (
        unsafe { libc::sched_getscheduler(0) },
        libc::sched_param { sched_priority: 0 },
    );
    // SAFETY: as above.
    unsafe { libc::sched_getparam(0, &mut old) };
    let fifo = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is the calling thread; valid sched_param.
    let raised = policy == libc::SCHED_OTHER
        && unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) } == 0;
    let sliced = !raised && set_own_slice(LATENCY_SLICE_NS);
    // Restored on the way out, a panic in `f` included: the caller's
    // thread (an API worker, a test) must not stay real-time.
    struct Restore {
        raised: bool,
        sliced: bool,
        policy: libc::c_int,
        old: libc::sched_param,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            if self.raised {
                // SAFETY: back to the policy and parameters read before.
                unsafe { libc::sched_setscheduler(0, self.policy, &self.old) };
            }
            if self.sliced {
                set_own_slice(0);
            }
        }
    }
    let _restore = Restore {
        raised,
        sliced,
        policy,
        old,
    };
    f()
}

/// How much longer than a burst the pause after it is.
const BREATHE_FACTOR: u32 = 3;

/// Between two bursts of O(n) work that took `burst`: sleep three times as
/// long (at most 2 ms), so on a host with as many busy vCPUs as cores the
/// vCPUs keep most of the CPUs through the whole O(n) phase (seven eighths
/// on two cores while bursts stay under ~0.7 ms, as 4 MiB ones do), and
/// a `SCHED_FIFO` burst thread never holds a core for long. Measured at
/// 4 GiB: guest stall p50 2.6 ms with this factor, 4.0 ms with 1 (twice
/// the completion time for it).
///
/// The pauses stay even with a core to spare for the VMM: the fault
/// thread shares a core with the mover (with one pinned vCPU, now the
/// vCPU's own: `affinity::CpuPlan::waited_on`), both `SCHED_FIFO` at the
/// same priority, so back-to-back bursts left it no CPU. Measured with one
/// pinned vCPU, both on the spare core: completion 73 ms at 4 GiB and 288 ms at 16 GiB (against
/// ~450 ms and ~1.8 s with the pauses, same session), but the guest ran at
/// 3 % of its speed and 2 of 5 repetitions stalled for the whole window;
/// with the fault thread one priority above the mover it no longer
/// starved, and the stall p50 was 1.06 / 1.74 / 4.44 ms at 256 MiB / 4 GiB
/// / 16 GiB against 0.36 / 0.76 / 3.78 with the pauses.
pub fn breathe(burst: std::time::Duration) {
    std::thread::sleep((burst * BREATHE_FACTOR).min(std::time::Duration::from_millis(2)));
}

/// How far a malloc arena grows at a time, and how much free space at its
/// top it keeps rather than give back.
const ARENA_STEP: i32 = 32 << 20;

/// Make glibc's malloc use one arena, grown `ARENA_STEP` at a time and
/// never trimmed below that, so threads a vCPU waits on (the fault
/// thread) take the mmap lock for writing (`brk`) once per `ARENA_STEP` of
/// growth, not once per page. Costs address space, not memory: untouched
/// arena pages are never resident. Once per process, before other threads
/// allocate (an arena a thread already uses stays its own); the VMM calls
/// it when it builds a VM.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only sets allocator parameters; both are valid
        // options with in-range values.
        let ok = unsafe {
            libc::mallopt(libc::M_TOP_PAD, ARENA_STEP) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * ARENA_STEP) == 1
                // Blocks up to this size come from the arena too, not
                // from an mmap/munmap pair each (glibc's largest value).
                && libc::mallopt(libc::M_MMAP_THRESHOLD, ARENA_STEP) == 1
                // One arena: glibc grows the others by `mprotect` a page at
                // a time past their high-water mark, ignoring the pad.
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
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
            if set_own_slice(LATENCY_SLICE_NS) {
                assert_eq!(own_slice(), Some(LATENCY_SLICE_NS));
                assert!(set_own_slice(0));
                assert_eq!(own_slice(), before, "the default slice is restored");
            } else {
                // A kernel without custom slices: nothing changed.
                assert_eq!(own_slice(), before);
            }
        })
        .join()
        .unwrap();
    }
}
