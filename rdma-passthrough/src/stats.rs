//! RNIC statistics.

use mmu::hist::{Histogram, Summary};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct RnicStats {
    pub(crate) device_faults: AtomicU64,
    pub(crate) fault_pages: AtomicU64,
    pub(crate) fault_failures: AtomicU64,
    pub(crate) prefetches: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) invalidations_skipped: AtomicU64,
    pub(crate) generations: AtomicU64,
    pub(crate) fenced_mrs: AtomicU64,
    pub(crate) mr_recoveries: AtomicU64,
    pub(crate) cq_overruns: AtomicU64,
    pub(crate) bytes_moved: AtomicU64,
    pub(crate) wqes: AtomicU64,
    pub(crate) wc_errors: AtomicU64,
    pub(crate) rnr_waits: AtomicU64,
    pub(crate) invalidate_rtt_ns: Histogram,
    pub(crate) fault_ns: Histogram,
}

/// A copy of the counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RnicStatsSnapshot {
    /// Device page faults raised by WQEs.
    pub device_faults: u64,
    /// Pages mapped by faults and prefetches.
    pub fault_pages: u64,
    /// Faults that could not be resolved (address not backed).
    pub fault_failures: u64,
    pub prefetches: u64,
    /// Invalidation commands the device executed.
    pub invalidations: u64,
    /// Invalidations that did not overlap an MR (no device round trip).
    pub invalidations_skipped: u64,
    pub generations: u64,
    pub fenced_mrs: u64,
    /// Fenced MRs re-registered after their device answered again.
    pub mr_recoveries: u64,
    /// Queue pairs put in error because a CQ they complete into overran.
    pub cq_overruns: u64,
    pub bytes_moved: u64,
    pub wqes: u64,
    pub wc_errors: u64,
    pub rnr_waits: u64,
    /// From `invalidate_start` to the device's completion.
    pub invalidate_rtt_ns: Summary,
    pub fault_ns: Summary,
}

impl RnicStats {
    /// Clear the histograms (counters keep counting).
    pub fn reset_histograms(&self) {
        self.invalidate_rtt_ns.reset();
        self.fault_ns.reset();
    }

    pub fn snapshot(&self) -> RnicStatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RnicStatsSnapshot {
            device_faults: g(&self.device_faults),
            fault_pages: g(&self.fault_pages),
            fault_failures: g(&self.fault_failures),
            prefetches: g(&self.prefetches),
            invalidations: g(&self.invalidations),
            invalidations_skipped: g(&self.invalidations_skipped),
            generations: g(&self.generations),
            fenced_mrs: g(&self.fenced_mrs),
            mr_recoveries: g(&self.mr_recoveries),
            cq_overruns: g(&self.cq_overruns),
            bytes_moved: g(&self.bytes_moved),
            wqes: g(&self.wqes),
            wc_errors: g(&self.wc_errors),
            rnr_waits: g(&self.rnr_waits),
            invalidate_rtt_ns: self.invalidate_rtt_ns.summary(),
            fault_ns: self.fault_ns.summary(),
        }
    }
}
