//! A cheap monotonic clock for lock-hold measurements.
//!
//! Every critical section is timed, so reading the clock must cost far less
//! than the sections it measures. On x86-64 that is `rdtsc` (about 10 ns
//! here, against ~25 ns for `Instant::now`), calibrated once against
//! `Instant`; elsewhere it falls back to `Instant`.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

#[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
mod imp {
    use super::*;

    static TICKS_PER_NS: OnceLock<f64> = OnceLock::new();

    #[inline]
    pub fn ticks() -> u64 {
        // SAFETY: rdtsc has no preconditions; the project only runs on hosts
        // with an invariant TSC (constant_tsc), and a skewed read only
        // perturbs a statistic.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    pub fn ticks_per_ns() -> f64 {
        *TICKS_PER_NS.get_or_init(|| {
            let t0 = Instant::now();
            let c0 = ticks();
            while t0.elapsed().as_micros() < 2_000 {
                std::hint::spin_loop();
            }
            let c1 = ticks();
            let ns = t0.elapsed().as_nanos() as f64;
            ((c1 - c0) as f64 / ns).max(0.001)
        })
    }
}

#[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
mod imp {
    use super::*;

    pub fn ticks() -> u64 {
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    pub fn ticks_per_ns() -> f64 {
        1.0
    }
}

/// Current time in clock ticks (not nanoseconds; see [`ticks_to_ns`]).
#[inline]
pub fn ticks() -> u64 {
    imp::ticks()
}

/// Convert a tick difference to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (ticks as f64 / imp::ticks_per_ns()) as u64
}

/// Nanoseconds per tick, for callers that keep their own copy next to the
/// data they time (the calibration lives in a static: one more cache line
/// to miss on a cold path).
pub(crate) fn ns_per_tick() -> f64 {
    1.0 / imp::ticks_per_ns()
}

/// Calibrate now rather than on the first measurement.
pub fn calibrate() {
    let _ = START.get_or_init(Instant::now);
    let _ = imp::ticks_per_ns();
}
