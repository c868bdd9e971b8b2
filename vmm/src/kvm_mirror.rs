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
//! * generation (teardown), with the vCPUs running throughout:
//!   1. private anonymous RAM (the default): `GuestRam::retire_in_place`
//!      moves every page of each region in scope to a retired range with
//!      `mremap(MREMAP_DONTUNMAP)`, 4 MiB per call; the memslot and the
//!      host address stay, KVM sees one MMU-notifier invalidation per
//!      chunk, and the next guest access faults through userfaultfd onto
//!      fresh memory (served untracked while the teardown runs, so a vCPU
//!      never waits for more than the chunk being moved). No pause, no
//!      memslot change. The kernel's part is O(pages KVM maps), spread over
//!      the chunks: each holds the mmap lock for writing (every vCPU
//!      refault queues on it), so the moves run in bursts
//!      (`contention::with_burst_class`: `SCHED_FIFO` when permitted, so a
//!      burst is never preempted while holding the lock) with a sleep three
//!      times as long as each burst between them (`contention::breathe`:
//!      the vCPUs keep most of the CPUs through the O(n) phase). With one
//!      pinned vCPU the moves run on its CPU (`set_mover_cpus`: a vCPU
//!      queued on the lock then never leaves its CPU idle for the host's
//!      work; see `affinity`). The moved pages
//!      are given back by the `Releaser` thread afterwards, 4 MiB per
//!      `MADV_DONTNEED` (a short read hold), paced the same way unless the
//!      host is short of memory.
//!   2. shared backings (memfd, hugetlbfs), where moving pages away would
//!      leave the file's pages visible: pause the vCPUs, give each region
//!      a fresh mapping and move its memslot there, resume. The pause lasts
//!      the slot delete (KVM's zap of every shadow page) and the slot
//!      creation (per-page metadata): O(n), measured, kept for these.
//!
//!   Optionally (`VmHandle::set_prezap`, off by default) KVM's shadow
//!   tables are first emptied through a throwaway memslot before the mmu's
//!   teardown (`KvmMirror::prezap`): measured slower with a guest that
//!   keeps writing (it rebuilds them meanwhile, and each memslot change
//!   waits for an SRCU grace period, 50–170 ms here).
//!
//!   `TeardownParts` times each part; `odpvm bench teardown` reports them.
//!   After this returns KVM holds no translation of the old pages (the
//!   notifier or the slot delete zapped them synchronously): tests
//!   `teardown::stamped_writers_see_no_stale_page_and_lose_no_write`,
//!   `kvm::teardown_while_vcpus_fault_leaves_no_stale_translation`.
//! * reclaim: the mmu's reclaimer hands back the old generation's
//!   translations in batches; their pages are released with
//!   `MADV_DONTNEED` (taking the mmap lock for reading only), and the
//!   emptied mapping is unmapped when the whole generation is done.

use crate::devices::testdev::Epochs;
use crate::memory::GuestRam;
use crate::vstate::gate::RunGate;
use crate::vstate::vm::KvmVm;
use mmu::hist::Histogram;
use mmu::{Extent, Invalidation, InvalidationKind, Mirror, MirrorRole, Mmu, RegionId, Scope};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

/// Bytes moved out per `mremap` in a teardown: the KVM invalidation a vCPU
/// may wait for covers at most this much (0.1–0.2 ms of kernel work with
/// every page mapped, measured here: 12 ms for 256 MiB in one call; the
/// same moves take ~4 µs per 4 MiB in a process without KVM, so nearly all
/// of it is KVM dropping its shadow entries).
const RETIRE_CHUNK: u64 = 4 << 20;

/// Bytes of moved-out memory released per `MADV_DONTNEED`: one mmap-lock
/// hold for reading, ~0.5 ms here. Any writer meanwhile (the next
/// teardown's `mremap`, an unmap) waits for the hold, and every vCPU fault
/// queues behind that writer, so the hold stays short (64 MiB holds, ~9 ms
/// each, showed as guest stalls of that size in `odpvm bench teardown`).
const RELEASE_CHUNK: u64 = 4 << 20;

/// Where one teardown's time went inside the KVM mirror (nanoseconds).
#[derive(Clone, Copy, Debug, Default)]
pub struct TeardownParts {
    /// When the mirror was told (after every cache mirror had confirmed).
    pub entered: Option<Instant>,
    /// The whole generation notice in this mirror.
    pub total_ns: u64,
    /// The optional throwaway-memslot zap, vCPUs running (just before the
    /// mmu's teardown, outside it).
    pub prezap_ns: u64,
    /// Step 1: `mremap` of every region in scope, vCPUs running.
    pub retire_ns: u64,
    /// Of step 1: the longest single chunk (the most a vCPU touching
    /// guest RAM can wait for it).
    pub chunk_max_ns: u64,
    /// Step 2: vCPUs held outside KVM_RUN (0 when not paused).
    pub pause_ns: u64,
    /// Of the pause: until every vCPU had left KVM_RUN.
    pub kick_ns: u64,
    /// Of the pause: mapping swap and memslot delete + create.
    pub slot_ns: u64,
    /// The CPU the step-1 moves started on (`set_mover_cpus`).
    pub mover_cpu: Option<usize>,
}

impl TeardownParts {
    fn add(&mut self, entered: Instant, p: &TeardownParts) {
        self.entered.get_or_insert(entered);
        self.total_ns += p.total_ns;
        self.prezap_ns += p.prezap_ns;
        self.retire_ns += p.retire_ns;
        self.chunk_max_ns = self.chunk_max_ns.max(p.chunk_max_ns);
        self.pause_ns += p.pause_ns;
        self.kick_ns += p.kick_ns;
        self.slot_ns += p.slot_ns;
        self.mover_cpu = self.mover_cpu.or(p.mover_cpu);
    }
}

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
    /// How long vCPUs stayed paused for a teardown (only shared backings
    /// pause).
    pub pause_ns: Histogram,
    /// The whole generation notice in this mirror.
    pub generation_ns: Histogram,
    /// Parts of the teardowns and range invalidations since the owner last
    /// took them (`VmHandle::take_teardown_parts`): durations add up.
    pub last: Mutex<TeardownParts>,
}

pub struct KvmMirror {
    ram: Arc<GuestRam>,
    vm: Arc<KvmVm>,
    gate: Arc<RunGate>,
    slots: Vec<Slot>,
    mmu: Weak<Mmu>,
    /// Serialises discards against mapping swaps.
    lock: Mutex<()>,
    /// The last `prezap`, for the next teardown's `TeardownParts`.
    prezap_ns: AtomicU64,
    prezap_on: std::sync::atomic::AtomicBool,
    /// Where step 1's moves run (`affinity::CpuPlan::waited_on`; None:
    /// wherever the calling thread may).
    mover_cpus: Mutex<Option<Vec<usize>>>,
    /// Counts the actions that make guest RAM fresh (read by payloads).
    epochs: Arc<Epochs>,
    pub stats: Arc<KvmMirrorStats>,
    releaser: Releaser,
}

/// Gives back pages moved out by `retire_in_place` (never the mmu's
/// extents: those name the current address), on its own thread, in
/// bounded chunks, and unmaps the emptied ranges. Woken after each
/// teardown; nothing waits for it.
struct Releaser {
    signal: Arc<(Mutex<(bool, bool)>, parking_lot::Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Releaser {
    fn spawn(ram: Arc<GuestRam>, stats: Arc<KvmMirrorStats>) -> Releaser {
        let signal = Arc::new((Mutex::new((false, false)), parking_lot::Condvar::new()));
        let sig = signal.clone();
        let handle = std::thread::Builder::new()
            .name("odpvm-release".into())
            .spawn(move || loop {
                {
                    let mut s = sig.0.lock();
                    while !s.0 && !s.1 {
                        sig.1.wait(&mut s);
                    }
                    if s.1 {
                        return;
                    }
                    s.0 = false;
                }
                for r in ram.regions() {
                    let n = ram.release_moved(r.gpa, RELEASE_CHUNK);
                    stats.bytes_released.fetch_add(n, Ordering::Relaxed);
                    let n = ram.drop_retired(r.gpa, 0);
                    stats
                        .mappings_unmapped
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            })
            .map_err(|e| log::error!("kvm mirror: no releaser thread ({e}); retired memory is given back when the VM ends"))
            .ok();
        Releaser { signal, handle }
    }

    fn kick(&self) {
        self.signal.0.lock().0 = true;
        self.signal.1.notify_one();
    }
}

impl Drop for Releaser {
    fn drop(&mut self) {
        self.signal.0.lock().1 = true;
        self.signal.1.notify_one();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl KvmMirror {
    pub fn new(
        ram: Arc<GuestRam>,
        vm: Arc<KvmVm>,
        gate: Arc<RunGate>,
        slots: Vec<Slot>,
        mmu: Weak<Mmu>,
        epochs: Arc<Epochs>,
    ) -> Self {
        let stats = Arc::new(KvmMirrorStats::default());
        KvmMirror {
            releaser: Releaser::spawn(ram.clone(), stats.clone()),
            ram,
            vm,
            gate,
            slots,
            mmu,
            lock: Mutex::new(()),
            prezap_ns: AtomicU64::new(0),
            prezap_on: std::sync::atomic::AtomicBool::new(false),
            mover_cpus: Mutex::new(None),
            epochs,
            stats,
        }
    }

    fn error(&self, what: String) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        log::error!("kvm mirror: {what}");
    }

    fn new_generation(&self, scope: Scope, generation: u64) {
        let entered = Instant::now();
        let slots: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| scope == Scope::All || scope == Scope::Region(s.region))
            .collect();
        let _g = self.lock.lock();
        let mut parts = TeardownParts {
            prezap_ns: self.prezap_ns.swap(0, Ordering::Relaxed),
            ..Default::default()
        };
        let mut to_move = Vec::new();
        if self.ram.can_retire_in_place() {
            let indices: Vec<usize> = slots.iter().map(|s| s.ram_index).collect();
            // A vCPU that touches a chunk already moved must not wait for
            // the whole teardown: its fault is served untracked (fresh
            // memory; the mmu's generation already hides everything old).
            self.ram.set_retiring(&indices, true);
            let t = Instant::now();
            // This thread holds the mmap lock for writing chunk after
            // chunk, and vCPU faults queue on it: keep each hold as short
            // as its work (see `contention`).
            // On the CPUs the pinning plan gives the threads a vCPU waits
            // on (`affinity::CpuPlan::waited_on`), then back where it was.
            // Pinned once real-time: a normal thread moved onto a busy CPU
            // could wait a whole slice before its first burst.
            let cpus = self.mover_cpus.lock().clone();
            crate::contention::with_burst_class(|| {
                let _on = cpus.and_then(|c| crate::affinity::PinnedFor::enter(&c));
                parts.mover_cpu = crate::affinity::current_cpu();
                for s in slots {
                    match self
                        .ram
                        .retire_in_place(s.ram_index, generation, RETIRE_CHUNK)
                    {
                        Ok(r) => parts.chunk_max_ns = parts.chunk_max_ns.max(r.chunk_max_ns),
                        Err(e) => {
                            self.error(format!("{e}; moving the memslot instead"));
                            to_move.push(s);
                        }
                    }
                }
            });
            parts.retire_ns = t.elapsed().as_nanos() as u64;
            self.ram.set_retiring(&indices, false);
            self.releaser.kick();
        } else {
            to_move = slots;
        }
        if !to_move.is_empty() {
            self.move_slots(&to_move, generation, &mut parts);
        }
        parts.total_ns = entered.elapsed().as_nanos() as u64;

        self.stats.generation_ns.record(parts.total_ns);
        *self.stats.last.lock() = parts;
        self.stats.generations.fetch_add(1, Ordering::Relaxed);
    }

    /// Optional, called before the mmu's teardown starts
    /// (`VmHandle::teardown`) when `set_prezap(true)`: empty KVM's shadow
    /// page tables with the vCPUs running. It must not
    /// run inside the teardown: a memslot change waits (SRCU) for every
    /// vCPU to leave KVM's page-fault path, and a vCPU faulting on RAM
    /// waits for the fault thread, which defers faults while a teardown is
    /// in flight. Only a cost if skipped: step 2 zaps whatever is left.
    pub fn prezap(&self) {
        if !self.prezap_on.load(Ordering::Relaxed) {
            return;
        }
        let t = Instant::now();
        if let Err(e) = self.vm.zap_all_shadow() {
            self.error(format!("throwaway memslot: {e}"));
        }
        self.prezap_ns
            .store(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn set_prezap(&self, on: bool) {
        self.prezap_on.store(on, Ordering::Relaxed);
    }

    /// Run step 1's moves on `cpus` (the thread asking for the teardown is
    /// restricted to them meanwhile): vCPU refaults queue on the mmap lock
    /// each move holds, and a vCPU waiting on a mover on another CPU leaves
    /// its own CPU idle for the host's work (see `affinity`).
    pub fn set_mover_cpus(&self, cpus: Option<Vec<usize>>) {
        *self.mover_cpus.lock() = cpus;
    }

    /// Step 2: fresh mappings and moved memslots, vCPUs paused.
    fn move_slots(&self, slots: &[&Slot], generation: u64, parts: &mut TeardownParts) {
        let indices: Vec<usize> = slots.iter().map(|s| s.ram_index).collect();
        self.ram.set_retiring(&indices, true);
        let t0 = Instant::now();
        self.gate.pause();
        parts.kick_ns = t0.elapsed().as_nanos() as u64;
        let t1 = Instant::now();
        for s in slots {
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
        parts.slot_ns = t1.elapsed().as_nanos() as u64;
        self.gate.resume();
        parts.pause_ns = t0.elapsed().as_nanos() as u64;
        self.stats.pause_ns.record(parts.pause_ns);
        self.ram.set_retiring(&indices, false);
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
        self.epochs.started.fetch_add(1, Ordering::SeqCst);
        match inv.kind {
            InvalidationKind::Range { gpa, len } => {
                let entered = Instant::now();
                let _g = self.lock.lock();
                let (n, wasted) = self.ram.discard(gpa, len);
                let total_ns = entered.elapsed().as_nanos() as u64;
                self.stats.last.lock().add(
                    entered,
                    &TeardownParts {
                        total_ns,
                        ..Default::default()
                    },
                );
                self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_discarded.fetch_add(n, Ordering::Relaxed);
                self.stats.wasted_pages.fetch_add(wasted, Ordering::Relaxed);
            }
            InvalidationKind::Generation {
                scope, generation, ..
            } => self.new_generation(scope, generation),
        }
        self.epochs.done.fetch_add(1, Ordering::SeqCst);
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
