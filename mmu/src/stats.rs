//! Counters and histograms. Plain `std` atomics: statistics never decide
//! anything, so they stay out of the loom model.

use crate::hist::{Histogram, Summary};
use std::sync::atomic::{AtomicU64, Ordering};

/// Which histogram a lock hold is recorded in (besides the overall one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hold {
    Fault,
    Invalidate,
    Teardown,
    Reclaim,
    Other,
}

/// `repr(C)`, lock-hold histograms last: they sit right before the mmu lock
/// (see `Mmu`).
#[derive(Default, Debug)]
#[repr(C)]
pub struct Stats {
    pub(crate) faults: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) read_begin_waits: AtomicU64,
    pub(crate) installed: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) teardowns: AtomicU64,
    pub(crate) entries_zapped: AtomicU64,
    pub(crate) leaves_reclaimed: AtomicU64,
    pub(crate) entries_reclaimed: AtomicU64,
    pub(crate) reclaim_batches: AtomicU64,
    pub(crate) reclaim_waits: AtomicU64,
    pub(crate) invalidate_ns: Histogram,
    pub(crate) teardown_ns: Histogram,
    pub(crate) hold_fault: Histogram,
    pub(crate) hold_other: Histogram,
    pub(crate) hold_reclaim: Histogram,
    pub(crate) hold_invalidate: Histogram,
    pub(crate) hold_teardown: Histogram,
}

impl Stats {
    pub(crate) fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub(crate) fn hold(&self, kind: Hold) -> &Histogram {
        match kind {
            Hold::Fault => &self.hold_fault,
            Hold::Invalidate => &self.hold_invalidate,
            Hold::Teardown => &self.hold_teardown,
            Hold::Reclaim => &self.hold_reclaim,
            Hold::Other => &self.hold_other,
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            faults: get(&self.faults),
            retries: get(&self.retries),
            read_begin_waits: get(&self.read_begin_waits),
            installed: get(&self.installed),
            invalidations: get(&self.invalidations),
            teardowns: get(&self.teardowns),
            entries_zapped: get(&self.entries_zapped),
            leaves_reclaimed: get(&self.leaves_reclaimed),
            entries_reclaimed: get(&self.entries_reclaimed),
            reclaim_batches: get(&self.reclaim_batches),
            reclaim_waits: get(&self.reclaim_waits),
            lock_hold_ns: self.lock_holds().summary(),
            fault_hold_ns: self.hold_fault.summary(),
            invalidate_hold_ns: self.hold_invalidate.summary(),
            teardown_hold_ns: self.hold_teardown.summary(),
            reclaim_hold_ns: self.hold_reclaim.summary(),
            invalidate_ns: self.invalidate_ns.summary(),
            teardown_ns: self.teardown_ns.summary(),
        }
    }

    /// Lock holds of the reclaimer (detaching obsolete leaves).
    pub fn reclaim_holds(&self) -> &Histogram {
        &self.hold_reclaim
    }

    /// Every lock hold (the per-kind histograms merged).
    pub fn lock_holds(&self) -> Histogram {
        let all = Histogram::new();
        for h in [
            &self.hold_fault,
            &self.hold_invalidate,
            &self.hold_teardown,
            &self.hold_reclaim,
            &self.hold_other,
        ] {
            all.merge_from(h);
        }
        all
    }

    /// Clear the histograms (counters keep counting).
    pub fn reset_histograms(&self) {
        for h in [
            &self.hold_fault,
            &self.hold_invalidate,
            &self.hold_teardown,
            &self.hold_reclaim,
            &self.hold_other,
            &self.invalidate_ns,
            &self.teardown_ns,
        ] {
            h.reset();
        }
    }
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsSnapshot {
    /// Faults whose translations were installed.
    pub faults: u64,
    /// Installs refused because an invalidation raced (each one retried).
    pub retries: u64,
    /// `read_begin` calls that had to wait for an invalidation to end.
    pub read_begin_waits: u64,
    /// Translations installed (4 KiB or 2 MiB each).
    pub installed: u64,
    pub invalidations: u64,
    pub teardowns: u64,
    /// 4 KiB entries removed by range invalidations.
    pub entries_zapped: u64,
    /// Leaves (each up to 512 entries, like a KVM shadow page) freed by the
    /// reclaimer.
    pub leaves_reclaimed: u64,
    /// 4 KiB-equivalent entries in those leaves.
    pub entries_reclaimed: u64,
    pub reclaim_batches: u64,
    /// Reclaim steps that waited for another thread's step to finish.
    pub reclaim_waits: u64,
    pub lock_hold_ns: Summary,
    pub fault_hold_ns: Summary,
    pub invalidate_hold_ns: Summary,
    pub teardown_hold_ns: Summary,
    pub reclaim_hold_ns: Summary,
    /// Whole range invalidations, mirrors included.
    pub invalidate_ns: Summary,
    /// Whole teardowns (until old translations are invisible and every
    /// mirror has been told).
    pub teardown_ns: Summary,
}
