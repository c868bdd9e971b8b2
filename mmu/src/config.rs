//! The mmu's tunables and the range each may take.

use crate::error::Error;
use crate::lock::LockPolicy;

/// Tunables. The defaults are what the project ships with.
#[derive(Clone, Debug)]
pub struct Config {
    pub lock: LockPolicy,
    /// Obsolete leaves (each up to 512 translations, like a KVM shadow
    /// page) the reclaimer detaches per lock hold. KVM's `BATCH_ZAP_PAGES`
    /// is 10.
    pub reclaim_batch: usize,
    /// Directory slots the reclaimer examines per lock hold.
    pub reclaim_scan: usize,
    /// Translations written per lock hold by `install`.
    pub install_batch: usize,
    /// 4 KiB entries examined per lock hold while zapping a range.
    pub zap_batch: usize,
    /// Run the reclaimer on its own thread (otherwise call
    /// [`Mmu::reclaim_step`](crate::Mmu::reclaim_step)).
    pub background_reclaim: bool,
    /// `fault_in` gives up after this many consecutive races.
    pub max_fault_retries: u32,
}

/// The accepted range of each tunable: at least 1 (0 would never make
/// progress), at most what keeps one lock hold short and all arithmetic on
/// them far from overflow.
pub const RECLAIM_BATCH_MAX: usize = 1024;
pub const RECLAIM_SCAN_MAX: usize = 1 << 20;
pub const INSTALL_BATCH_MAX: usize = 1 << 16;
pub const ZAP_BATCH_MAX: usize = 1 << 20;

impl Config {
    /// Every tunable within its range, or the first one that is not.
    pub fn validate(&self) -> Result<(), Error> {
        let check = |what, value: usize, max: usize| {
            if (1..=max).contains(&value) {
                Ok(())
            } else {
                Err(Error::InvalidConfig {
                    what,
                    value: value as u64,
                    min: 1,
                    max: max as u64,
                })
            }
        };
        check("reclaim_batch", self.reclaim_batch, RECLAIM_BATCH_MAX)?;
        check("reclaim_scan", self.reclaim_scan, RECLAIM_SCAN_MAX)?;
        check("install_batch", self.install_batch, INSTALL_BATCH_MAX)?;
        check("zap_batch", self.zap_batch, ZAP_BATCH_MAX)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lock: LockPolicy::Spin,
            reclaim_batch: 10,
            reclaim_scan: 256,
            install_batch: 512,
            zap_batch: 512,
            background_reclaim: true,
            max_fault_retries: 10_000,
        }
    }
}
