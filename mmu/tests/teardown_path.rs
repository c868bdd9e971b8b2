//! What a generation teardown may do on its caller's thread.
//!
//! The teardown kicks the background reclaimer by setting a flag the
//! reclaimer polls. It used to wake it through a condition variable: a
//! futex syscall on every teardown and, when the reclaimer's core was idle,
//! an inter-processor interrupt — 14–24 µs on this nested host, ten times
//! the rest of the teardown. This file runs in a process of its own: it
//! installs a seccomp filter (on one thread) and a SIGSYS handler.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use mmu::*;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// futex calls trapped on the filtered thread.
static TRAPPED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigsys(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TRAPPED.fetch_add(1, Ordering::SeqCst);
}

/// From now on every `futex` call of the calling thread (only) is not
/// executed but raises SIGSYS, which `on_sigsys` counts.
fn trap_futex_on_this_thread() {
    // Classic BPF over `struct seccomp_data`: load `nr` (offset 0); futex →
    // SECCOMP_RET_TRAP, anything else → SECCOMP_RET_ALLOW.
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let filter = [
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_futex as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_TRAP,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: a zeroed sigaction is valid; the handler only does an atomic
    // add (async-signal-safe); `prog` points at `filter`, alive for the
    // call; the filter applies to this thread alone (no TSYNC flag).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        assert_eq!(libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()), 0);
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::syscall(
                libc::SYS_seccomp,
                1, // SECCOMP_SET_MODE_FILTER
                0,
                &prog as *const libc::sock_fprog
            ),
            0,
            "seccomp: {}",
            std::io::Error::last_os_error()
        );
    }
}

struct Counter(AtomicU64);
impl Mirror for Counter {
    fn name(&self) -> &str {
        "counter"
    }
    fn invalidate_start(&self, _: &Invalidation) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn invalidate_wait(&self, _: &Invalidation) {}
}

#[test]
fn a_teardown_makes_no_futex_call_and_is_still_reclaimed() {
    let m = Mmu::new(Config::default()).unwrap();
    m.add_region(RegionSpec {
        name: "ram".into(),
        gpa: 0,
        size: 64 * MIB,
        hva: 1 << 40,
    })
    .unwrap();
    let counter = Arc::new(Counter(AtomicU64::new(0)));
    m.register_mirror(counter.clone());
    for gpa in (0..16 * MIB).step_by(PAGE_SIZE as usize) {
        m.fault_in(gpa, PAGE_SIZE, |t, out| {
            out.push(Translation::small(gpa, t.host_addr(gpa)?));
            Ok(())
        })
        .unwrap();
    }
    // Let the reclaimer thread start and go to sleep.
    std::thread::sleep(Duration::from_millis(50));
    let (trapped, report) = std::thread::scope(|s| {
        s.spawn(|| {
            trap_futex_on_this_thread();
            let before = TRAPPED.load(Ordering::SeqCst);
            let report = m.teardown_all();
            (TRAPPED.load(Ordering::SeqCst) - before, report)
        })
        .join()
        .unwrap()
    });
    report.unwrap();
    assert_eq!(trapped, 0, "the teardown made {trapped} futex call(s)");
    assert_eq!(counter.0.load(Ordering::Relaxed), 1, "the mirror was told");
    assert!(m.lookup(0).is_none(), "old translations are invisible");
    // The reclaimer still finds the work on its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.reclaim_pending() {
        assert!(Instant::now() < deadline, "the reclaimer never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(m.stats().snapshot().leaves_reclaimed, 8);
}
