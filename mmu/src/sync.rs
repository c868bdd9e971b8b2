//! The synchronisation facade: std types normally, loom's under `--cfg loom`,
//! so the protocol code is model-checked exactly as it ships.
//!
//! Statistics use `std` atomics directly (not this facade): they never decide
//! anything, and keeping them out of loom keeps the explored state space small.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex};

/// Called by a spinning waiter. Under loom it must yield so the model can
/// schedule the lock holder; natively it is the CPU's pause hint.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Give the CPU away after spinning for a while (the holder may be preempted).
#[inline]
pub(crate) fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}

/// Sleep briefly: what a waiter does once spinning and yielding have not
/// let the holder finish. A `SCHED_FIFO` waiter's `sched_yield` gives the
/// CPU only to other real-time threads, never to a preempted normal-priority
/// holder on the same CPU; only sleeping does (without it the two livelock
/// until the kernel's real-time throttling, ~0.95 s).
#[inline]
pub(crate) fn sleep_briefly() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::sleep(std::time::Duration::from_micros(20));
}

/// Start loading the cache lines of `[p, p + bytes)` (at most 8 lines)
/// without waiting for them. A cold teardown touches a dozen lines spread
/// over several pages; issued up front, their misses overlap instead of
/// following one another (every atomic read-modify-write on the path waits
/// for all older loads, prefetches excepted). Only a hint: it reads nothing
/// the program sees and never faults.
#[inline(always)]
pub(crate) fn prefetch<T: ?Sized>(p: *const T, bytes: usize) {
    #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
    for offset in (0..bytes.min(512)).step_by(64) {
        let line = p.cast::<i8>().wrapping_add(offset);
        // SAFETY: PREFETCHT0 is a hint; it neither faults nor changes
        // memory, whatever the address.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line) };
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
    let _ = (p, bytes);
}

/// The cache line `in_callback` reads, for `prefetch`.
pub(crate) fn callback_depth_ptr() -> *const u8 {
    CALLBACK_DEPTH.with(|d| d as *const _ as *const u8)
}

/// Names the calling thread, so the mmu can refuse to make a thread wait
/// for work that thread itself is doing (a mirror callback calling back).
#[cfg(loom)]
pub(crate) type ThreadToken = loom::thread::ThreadId;
/// Natively, the address of a thread-local byte: unique among live
/// threads, and computing it reads no memory (`std::thread::current()`
/// would touch the thread's handle — a cold cache line on the teardown
/// path).
#[cfg(not(loom))]
pub(crate) type ThreadToken = usize;

#[cfg(loom)]
#[inline]
pub(crate) fn thread_token() -> ThreadToken {
    loom::thread::current().id()
}

#[cfg(not(loom))]
#[inline]
pub(crate) fn thread_token() -> ThreadToken {
    thread_local! {
        static TOKEN: u8 = const { 0 };
    }
    TOKEN.with(|t| t as *const u8 as usize)
}

#[cfg(not(loom))]
thread_local! {
    /// Mirror callbacks of any mmu the calling thread is inside of.
    static CALLBACK_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}
#[cfg(loom)]
loom::thread_local! {
    static CALLBACK_DEPTH: std::cell::Cell<u32> = std::cell::Cell::new(0);
}

/// Marks the calling thread as inside a mirror callback until dropped
/// (also when the callback unwinds).
pub(crate) struct InCallback(());

impl InCallback {
    #[inline(always)]
    pub(crate) fn enter() -> Self {
        CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
        InCallback(())
    }
}

impl Drop for InCallback {
    #[inline(always)]
    fn drop(&mut self) {
        CALLBACK_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Whether the calling thread is inside a mirror callback (of any mmu: a
/// callback of one mmu waiting on another can deadlock just the same).
#[inline(always)]
pub(crate) fn in_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get() > 0)
}

#[cfg(loom)]
pub(crate) use loom::cell::{MutPtr, UnsafeCell};

#[cfg(not(loom))]
pub(crate) use native_cell::{MutPtr, UnsafeCell};

#[cfg(not(loom))]
mod native_cell {
    /// `std::cell::UnsafeCell` with loom's pointer-returning API.
    #[derive(Debug)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(std::cell::UnsafeCell::new(value))
        }

        pub(crate) fn get_mut(&self) -> MutPtr<T> {
            MutPtr(self.0.get())
        }
    }

    pub(crate) struct MutPtr<T>(*mut T);

    impl<T> MutPtr<T> {
        /// # Safety
        /// The caller must have exclusive access to the cell for as long as
        /// the returned reference lives.
        #[allow(clippy::mut_from_ref)]
        pub(crate) unsafe fn deref(&self) -> &mut T {
            // SAFETY: exclusivity is the caller's obligation (see above); the
            // pointer came from a live `UnsafeCell`.
            unsafe { &mut *self.0 }
        }
    }
}
