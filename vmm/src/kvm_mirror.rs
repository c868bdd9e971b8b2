//! KVM's side of guest memory as an mmu mirror.
//!
//! KVM's shadow page tables are a cache of the host mapping, kept coherent
//! by the kernel's own MMU notifiers. So this mirror acts on the host
//! memory itself and is a `Backing` mirror (it runs after every device has
//! stopped using the range):
//!
//! * range invalidation: `MADV_DONTNEED` (`MADV_REMOVE` for shared
//!   memory). The kernel zaps KVM's entries before the call returns, and
//!   the guest's next access faults through userfaultfd again.
//! * generation (teardown): pause the vCPUs, give each region in scope a
//!   fresh mapping and move its memslot there (KVM deletes the old slot
//!   with its own fast zap), resume. Cost is per region, not per page.
//! * reclaim: the mmu's reclaimer hands back the old generation's
//!   translations in batches; their pages are released with
//!   `MADV_DONTNEED` (taking the mmap lock for reading only), and the
//!   emptied mapping is unmapped when the whole generation is done.

use crate::memory::GuestRam;
use crate::vstate::gate::RunGate;
use crate::vstate::vm::KvmVm;
use mmu::hist::Histogram;
use mmu::{Extent, Invalidation, InvalidationKind, Mirror, MirrorRole, Mmu, RegionId, Scope};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

/// One RAM region as KVM and the mmu know it.
#[derive(Clone, Debug)]
pub struct Slot {
    pub slot: u32,
    pub region: RegionId,
    pub ram_index: usize,
}

#[derive(Default, Debug)]
pub struct KvmMirrorStats {
    pub invalidations: AtomicU64,
    pub bytes_discarded: AtomicU64,
    pub generations: AtomicU64,
    pub slot_moves: AtomicU64,
    pub bytes_released: AtomicU64,
    pub mappings_unmapped: AtomicU64,
    pub errors: AtomicU64,
    /// Fault-around pages discarded without ever being written.
    pub wasted_pages: AtomicU64,
    /// How long vCPUs stayed paused for a teardown.
    pub pause_ns: Histogram,
}

pub struct KvmMirror {
    ram: Arc<GuestRam>,
    vm: Arc<KvmVm>,
    gate: Arc<RunGate>,
    slots: Vec<Slot>,
    mmu: Weak<Mmu>,
    /// Serialises discards against mapping swaps.
    lock: Mutex<()>,
    pub stats: KvmMirrorStats,
}

impl KvmMirror {
    pub fn new(
        ram: Arc<GuestRam>,
        vm: Arc<KvmVm>,
        gate: Arc<RunGate>,
        slots: Vec<Slot>,
        mmu: Weak<Mmu>,
    ) -> Self {
        KvmMirror {
            ram,
            vm,
            gate,
            slots,
            mmu,
            lock: Mutex::new(()),
            stats: KvmMirrorStats::default(),
        }
    }

    fn error(&self, what: String) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        log::error!("kvm mirror: {what}");
    }

    fn new_generation(&self, scope: Scope, generation: u64) {
        let slots: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| scope == Scope::All || scope == Scope::Region(s.region))
            .collect();
        let indices: Vec<usize> = slots.iter().map(|s| s.ram_index).collect();
        let _g = self.lock.lock();
        self.ram.set_retiring(&indices, true);
        let t0 = Instant::now();
        self.gate.pause();
        for s in &slots {
            match self.ram.swap(s.ram_index, generation) {
                Ok((gpa, size, hva)) => {
                    if let Err(e) = self.vm.move_slot(s.slot, gpa, size, hva) {
                        self.error(format!("moving memslot {}: {e}", s.slot));
                    }
                    if let Some(mmu) = self.mmu.upgrade() {
                        if let Err(e) = mmu.set_region_hva(s.region, hva) {
                            self.error(format!("updating region {}: {e}", s.region));
                        }
                    }
                    self.stats.slot_moves.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // Correct but O(n): discard the region in place.
                    self.error(format!(
                        "fresh mapping for a teardown failed ({e}); discarding in place"
                    ));
                    let r = &self.ram.regions()[s.ram_index];
                    let _ = self.ram.discard(r.gpa, r.size);
                }
            }
        }
        self.gate.resume();
        self.stats.pause_ns.record(t0.elapsed().as_nanos() as u64);
        self.ram.set_retiring(&indices, false);
        self.stats.generations.fetch_add(1, Ordering::Relaxed);
    }
}

impl Mirror for KvmMirror {
    fn name(&self) -> &str {
        "kvm"
    }

    fn role(&self) -> MirrorRole {
        MirrorRole::Backing
    }

    fn invalidate_start(&self, inv: &Invalidation) {
        match inv.kind {
            InvalidationKind::Range { gpa, len } => {
                let _g = self.lock.lock();
                let (n, wasted) = self.ram.discard(gpa, len);
                self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_discarded.fetch_add(n, Ordering::Relaxed);
                self.stats.wasted_pages.fetch_add(wasted, Ordering::Relaxed);
            }
            InvalidationKind::Generation {
                scope, generation, ..
            } => self.new_generation(scope, generation),
        }
    }

    fn invalidate_wait(&self, _: &Invalidation) {
        // Both actions above are synchronous.
    }

    fn reclaimed(&self, extents: &[Extent]) {
        let n = self.ram.release_retired(extents);
        self.stats.bytes_released.fetch_add(n, Ordering::Relaxed);
    }

    fn generation_reclaimed(&self, region: RegionId, below: u64) {
        if let Some(s) = self.slots.iter().find(|s| s.region == region) {
            let gpa = self.ram.regions()[s.ram_index].gpa;
            let n = self.ram.drop_retired(gpa, below);
            self.stats
                .mappings_unmapped
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
