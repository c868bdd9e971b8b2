//! Secondary MMUs that cache translations and must drop them on request.

use crate::error::Error;
use crate::table::Extent;
use crate::types::{Invalidation, RegionId};

/// How a mirror is ordered in the fan-out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MirrorRole {
    /// Caches translations of memory it does not own (an RNIC's ODP page
    /// table). Started and waited for in the first two passes.
    #[default]
    Cache,
    /// Owns the host memory behind the translations and releases it when it
    /// invalidates (KVM's side: `MADV_DONTNEED` zaps the shadow entries and
    /// frees the pages). Runs only after every `Cache` mirror's wait has
    /// returned, so no device can write into memory that was released.
    Backing,
}

/// A secondary MMU subscribed to invalidations.
///
/// Every callback is invoked **without** the mmu lock held, from the thread
/// that called `invalidate`/`teardown_*`/`reclaim_step`, and may sleep.
/// A callback that calls `read_begin`/`fault_in` on a range it is being
/// told to invalidate, or `unregister_mirror`, would wait for itself: those
/// return `Err(Reentrant)` instead. `reclaim_step` from inside a reclaim
/// callback does nothing.
pub trait Mirror: Send + Sync {
    /// For logs and statistics.
    fn name(&self) -> &str;

    /// Read once, when the mirror is registered.
    fn role(&self) -> MirrorRole {
        MirrorRole::Cache
    }

    /// Pass one: begin dropping the translations `inv` names (post the
    /// device command, kick the TLB flush) and return without waiting for
    /// completion. Called once per invalidation, before any mirror's
    /// `invalidate_wait`, so slow devices flush in parallel.
    fn invalidate_start(&self, inv: &Invalidation);

    /// Pass two: return once the translations are gone and no access
    /// through them is in flight. After this returns the mirror must not
    /// use them again; new translations for the range come only from a
    /// fault that passes `read_retry`/`install`. Must not hang: a device
    /// that does not confirm in bounded time is fenced, then this returns.
    fn invalidate_wait(&self, inv: &Invalidation);

    /// The reclaimer freed obsolete translations (older generations). For a
    /// `Backing` mirror that gave every generation its own host memory,
    /// `extents` is memory it may now release: every mirror's
    /// `invalidate_wait` for the teardown that made them obsolete has
    /// returned. Called in batches, one reclaim step at a time, never under
    /// the lock.
    fn reclaimed(&self, extents: &[Extent]) {
        let _ = extents;
    }

    /// Every translation of `region` older than generation `below` has been
    /// reclaimed: every `reclaimed` batch of them has returned.
    fn generation_reclaimed(&self, region: RegionId, below: u64) {
        let _ = (region, below);
    }
}

/// Identifies a registered mirror, for `unregister_mirror`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MirrorId(pub u64);

/// Makes guest pages present on behalf of a device fault: the seam where an
/// RNIC (which faults) meets the VMM (which owns guest memory). An
/// implementation runs the fault protocol (`read_begin` → populate →
/// `install`) so the translations end up in the mmu's table.
pub trait FaultResolver: Send + Sync {
    /// Make `[gpa, gpa + len)` (page aligned, inside one region) present
    /// and tracked. May sleep. `write` asks for writable pages.
    fn resolve(&self, gpa: u64, len: u64, write: bool) -> Result<(), Error>;
}
