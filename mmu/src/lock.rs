//! The mmu lock: a spinlock by default, a sleeping mutex on request.
//!
//! Both policies share one type so the same protocol code runs under either
//! and benchmarks compare the conversion honestly. Every hold is timed into
//! the histogram its caller names.

use crate::clock;
use crate::hist::Histogram;
use crate::sync::{sleep_briefly, spin_hint, yield_now, AtomicBool, MutPtr, Ordering, UnsafeCell};
use std::ops::{Deref, DerefMut};

/// Which primitive protects the translation table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LockPolicy {
    /// Test-and-test-and-set spinlock; waiters never sleep. The default:
    /// critical sections are bounded and short.
    #[default]
    Spin,
    /// `parking_lot::Mutex` semantics (spin briefly, then sleep in the
    /// kernel). For comparison.
    Mutex,
}

impl LockPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            LockPolicy::Spin => "spin",
            LockPolicy::Mutex => "mutex",
        }
    }
}

impl std::str::FromStr for LockPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spin" | "spinlock" => Ok(LockPolicy::Spin),
            "mutex" => Ok(LockPolicy::Mutex),
            other => Err(format!(
                "unknown lock policy {other:?} (expected spin or mutex)"
            )),
        }
    }
}

enum Raw {
    Spin(AtomicBool),
    #[cfg(not(loom))]
    Mutex(parking_lot::RawMutex),
}

/// Spins this many times before yielding the CPU: the holder of a
/// short section is either about to release or has been preempted.
const SPINS_BEFORE_YIELD: u32 = 128;
/// Yields before the waiter sleeps instead (`sync::sleep_briefly`): a
/// real-time waiter's yield never lets a preempted normal-priority holder
/// on its CPU run (`a_real_time_waiter_lets_a_preempted_holder_finish`).
const YIELDS_BEFORE_SLEEP: u32 = 8;

impl Raw {
    fn new(policy: LockPolicy) -> Self {
        match policy {
            LockPolicy::Spin => Raw::Spin(AtomicBool::new(false)),
            #[cfg(not(loom))]
            LockPolicy::Mutex => {
                Raw::Mutex(<parking_lot::RawMutex as parking_lot::lock_api::RawMutex>::INIT)
            }
            // loom models neither parking_lot nor time; a spinlock is an
            // equally valid mutual-exclusion model there.
            #[cfg(loom)]
            LockPolicy::Mutex => Raw::Spin(AtomicBool::new(false)),
        }
    }

    /// Inlined into its callers: on a cold path every separate function is
    /// one more instruction page to miss in the TLB.
    #[inline(always)]
    fn lock(&self) {
        match self {
            Raw::Spin(locked) => {
                if locked
                    .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_err()
                {
                    Self::spin(locked);
                }
            }
            #[cfg(not(loom))]
            Raw::Mutex(m) => parking_lot::lock_api::RawMutex::lock(m),
        }
    }

    #[cold]
    fn spin(locked: &AtomicBool) {
        let mut spins = 0u32;
        loop {
            while locked.load(Ordering::Relaxed) {
                spins += 1;
                if spins.is_multiple_of(SPINS_BEFORE_YIELD * YIELDS_BEFORE_SLEEP) {
                    sleep_briefly();
                } else if spins.is_multiple_of(SPINS_BEFORE_YIELD) {
                    yield_now();
                } else {
                    spin_hint();
                }
            }
            if locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    #[inline(always)]
    fn unlock(&self) {
        match self {
            Raw::Spin(locked) => locked.store(false, Ordering::Release),
            #[cfg(not(loom))]
            // SAFETY: only called by `Guard::drop`, i.e. by the holder.
            Raw::Mutex(m) => unsafe { parking_lot::lock_api::RawMutex::unlock(m) },
        }
    }
}

/// Data protected by the mmu lock.
/// `repr(C)`: the lock word first, with the clock's scale beside it, then
/// the data it protects.
#[repr(C)]
pub(crate) struct MmuLock<T> {
    raw: Raw,
    policy: LockPolicy,
    /// `clock::ns_per_tick()`, copied so converting a hold time touches
    /// no static.
    ns_per_tick: f64,
    data: UnsafeCell<T>,
}

// SAFETY: the lock hands out access to `data` to one thread at a time.
unsafe impl<T: Send> Sync for MmuLock<T> {}
// SAFETY: moving the lock moves the data; `T: Send` suffices.
unsafe impl<T: Send> Send for MmuLock<T> {}

pub(crate) struct Guard<'a, T> {
    lock: &'a MmuLock<T>,
    ptr: MutPtr<T>,
    start: u64,
    hist: &'a Histogram,
}

impl<T> MmuLock<T> {
    pub(crate) fn new(policy: LockPolicy, data: T) -> Self {
        Self {
            raw: Raw::new(policy),
            policy,
            ns_per_tick: clock::ns_per_tick(),
            data: UnsafeCell::new(data),
        }
    }

    pub(crate) fn policy(&self) -> LockPolicy {
        self.policy
    }

    /// A tick difference in nanoseconds.
    #[inline]
    pub(crate) fn ns(&self, ticks: u64) -> u64 {
        (ticks as f64 * self.ns_per_tick) as u64
    }

    /// Take the lock; the hold time is recorded into `hist` when the guard
    /// drops. One histogram per hold, not two: on a cold path (a teardown
    /// after the guest ran) every histogram touched is a cache and TLB miss.
    #[inline(always)]
    pub(crate) fn lock<'a>(&'a self, hist: &'a Histogram) -> Guard<'a, T> {
        self.raw.lock();
        Guard {
            lock: self,
            ptr: self.data.get_mut(),
            start: clock::ticks(),
            hist,
        }
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while the lock is held.
        unsafe { self.ptr.deref() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard exists only while the lock is held, and `&mut
        // self` makes this the only live reference.
        unsafe { self.ptr.deref() }
    }
}

impl<'a, T> Guard<'a, T> {
    /// Unlock without recording the hold: returns the histogram it belongs
    /// in and its length in nanoseconds, for the caller to record once its
    /// own latency-critical work is done (a cold histogram bucket is a
    /// cache miss or two).
    #[inline(always)]
    pub(crate) fn release(self) -> Deferred<'a> {
        let this = std::mem::ManuallyDrop::new(self);
        let held = clock::ticks().wrapping_sub(this.start);
        this.lock.raw.unlock();
        // SAFETY: `this` is neither dropped nor used after this read, so the
        // pointer (under loom, a tracked access) is dropped exactly once, at
        // the end of this function: after the unlock, as `Drop` below does.
        let _ptr = unsafe { std::ptr::read(&this.ptr) };
        Deferred {
            hist: this.hist,
            ns: this.lock.ns(held),
        }
    }
}

/// A lock hold not yet recorded (see [`Guard::release`]).
#[must_use = "record it"]
pub(crate) struct Deferred<'a> {
    hist: &'a Histogram,
    ns: u64,
}

impl Deferred<'_> {
    pub(crate) fn record(self) {
        self.hist.record(self.ns);
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        let held = clock::ticks().wrapping_sub(self.start);
        self.lock.raw.unlock();
        self.hist.record(self.lock.ns(held));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first CPU this thread may run on (CPU 0 may be outside a
    /// cpuset).
    fn first_cpu() -> usize {
        // SAFETY: an all-zero cpu_set_t is a valid empty set; pid 0 is the
        // calling thread; `i` stays below CPU_SETSIZE.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set),
                0
            );
            (0..libc::CPU_SETSIZE as usize)
                .find(|&i| libc::CPU_ISSET(i, &set))
                .expect("some CPU")
        }
    }

    fn pin_to(cpu: usize) {
        // SAFETY: an all-zero cpu_set_t is a valid empty set; `cpu` is
        // below CPU_SETSIZE; pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
                0
            );
        }
    }

    /// The VMM's fault thread is `SCHED_FIFO`. If it waits on the spinlock
    /// while the holder, a normal thread on the same CPU, is preempted
    /// (by the waiter itself), only sleeping lets the holder finish: a
    /// FIFO thread's yield never hands the CPU to it. Before the fix the
    /// waiter got the lock after ~0.95 s (the kernel's RT throttling) and
    /// a guest fault stalled that long (`odpvm bench teardown --pin-vcpus`).
    /// Needs CAP_SYS_NICE (CI runs as root); says so and passes otherwise.
    #[test]
    fn a_real_time_waiter_lets_a_preempted_holder_finish() {
        let lock = Arc::new(MmuLock::new(LockPolicy::Spin, 0u64));
        let held = Arc::new(std::sync::Barrier::new(2));
        let cpu = first_cpu();
        let holder = {
            let (lock, held) = (lock.clone(), held.clone());
            std::thread::spawn(move || {
                pin_to(cpu);
                let h = Histogram::new();
                let mut g = lock.lock(&h);
                held.wait();
                // A short section the waiter preempts midway.
                let t = std::time::Instant::now();
                while t.elapsed() < std::time::Duration::from_millis(5) {
                    std::hint::spin_loop();
                }
                *g += 1;
            })
        };
        let waiter = std::thread::spawn(move || {
            pin_to(cpu);
            held.wait();
            let fifo = libc::sched_param { sched_priority: 1 };
            // SAFETY: pid 0 is the calling thread; valid sched_param.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) } != 0 {
                eprintln!("no SCHED_FIFO here (needs CAP_SYS_NICE): not exercised");
                return None;
            }
            let t = std::time::Instant::now();
            let h = Histogram::new();
            *lock.lock(&h) += 1;
            Some(t.elapsed())
        });
        let waited = waiter.join().unwrap();
        holder.join().unwrap();
        if let Some(waited) = waited {
            // Liveness, not speed: ~5 ms of section plus a few sleeps,
            // against ~950 ms of livelock without the fix.
            assert!(
                waited < std::time::Duration::from_millis(400),
                "a FIFO waiter took {waited:?} to get a lock a preempted holder had"
            );
        }
    }

    #[test]
    fn both_policies_exclude() {
        for policy in [LockPolicy::Spin, LockPolicy::Mutex] {
            let lock = Arc::new(MmuLock::new(policy, 0u64));
            let h = Arc::new(Histogram::new());
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (lock, h) = (lock.clone(), h.clone());
                    std::thread::spawn(move || {
                        for _ in 0..20_000 {
                            let mut g = lock.lock(&h);
                            let v = *g;
                            *g = v + 1;
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(*lock.lock(&h), 80_000, "{policy:?}");
            assert_eq!(h.count(), 80_001);
        }
    }

    #[test]
    fn policy_parses() {
        assert_eq!("spin".parse::<LockPolicy>(), Ok(LockPolicy::Spin));
        assert_eq!("mutex".parse::<LockPolicy>(), Ok(LockPolicy::Mutex));
        assert!("rwlock".parse::<LockPolicy>().is_err());
    }
}
