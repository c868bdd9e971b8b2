//! The protocol itself: [`Mmu`]. The rules it follows are written once, in
//! the crate documentation (`lib.rs`).

use crate::clock;
use crate::error::Error;
use crate::lock::{Guard, LockPolicy, MmuLock};
use crate::mirror::{FaultResolver, Mirror, MirrorId, MirrorRole};
use crate::stats::{Hold, Stats};
use crate::sync::{AtomicUsize, Condvar, Mutex, Ordering};
use crate::table::{leaf_index, Entry, Leaf, LeafList, RegionTable, Slot, ENTRIES_PER_LEAF};
use crate::types::*;
use std::sync::{Arc, Weak};

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
    /// [`Mmu::reclaim_step`]).
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

/// Regions per mmu (preallocated so adding one never allocates under the
/// lock). KVM allows more memslots, but a microVM uses a handful.
pub const MAX_REGIONS: usize = 64;
/// Invalidations in flight at once; more wait for a free slot.
const MAX_ACTIVE: usize = 64;
/// Ended invalidations remembered for `read_retry`. A ticket older than
/// everything remembered is conservatively stale.
const LOG_LEN: usize = 64;
/// Zeroed leaves kept for reuse so installs rarely allocate.
const FREE_LEAVES_MAX: usize = 256;

/// An invalidation or teardown in flight or recently ended.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    /// Sequence number it took; 0 marks an empty log slot.
    id: u64,
    gpa: u64,
    end: u64,
    teardown: bool,
}

impl Span {
    fn overlaps(&self, gpa: u64, end: u64) -> bool {
        self.gpa < end && gpa < self.end
    }
}

type MirrorList = Arc<[(MirrorId, Arc<dyn Mirror>)]>;

struct State {
    regions: Vec<RegionTable>,
    next_region: u64,
    next_gen: u64,
    /// Sequence numbers handed out so far (one per invalidation/teardown).
    seq: u64,
    active: Vec<Span>,
    log: [Span; LOG_LEN],
    log_next: usize,
    /// Largest id evicted from `log`.
    log_floor: u64,
    mirrors: MirrorList,
    next_mirror: u64,
    /// Obsolete leaves detached by installs, awaiting the reclaimer.
    obsolete: LeafList,
    free: LeafList,
    /// Region the reclaimer's scan is in.
    scan_region: usize,
}

impl State {
    fn region_index(&self, gpa: u64, len: u64) -> Result<usize, Error> {
        self.regions
            .iter()
            .position(|r| !r.removed && r.contains(gpa, len))
            .ok_or(Error::OutsideRegions {
                gpa,
                end: gpa.saturating_add(len),
            })
    }

    fn region_by_id(&self, id: RegionId) -> Result<usize, Error> {
        self.regions
            .iter()
            .position(|r| !r.removed && r.id == id)
            .ok_or(Error::NoSuchRegion(id))
    }

    /// Whether every page of `[gpa, end)` lies in some region.
    fn covered(&self, gpa: u64, end: u64) -> bool {
        let mut pos = gpa;
        while pos < end {
            match self
                .regions
                .iter()
                .find(|r| !r.removed && r.gpa <= pos && pos < r.end())
            {
                Some(r) => pos = r.end(),
                None => return false,
            }
        }
        true
    }

    fn collides_active(&self, gpa: u64, end: u64) -> bool {
        self.active.iter().any(|s| s.overlaps(gpa, end))
    }

    /// `read_retry`: has an invalidation overlapping the ticket's range
    /// started since the ticket was taken?
    fn collides(&self, t: &Ticket) -> bool {
        debug_assert!(t.seq <= self.seq, "tickets are only issued by this mmu");
        if self.seq == t.seq {
            return false; // nothing started since: the common case
        }
        if self.log_floor > t.seq {
            return true; // forgotten invalidations might overlap
        }
        let newer = |s: &Span| s.id > t.seq && s.overlaps(t.gpa, t.end());
        self.active.iter().any(newer) || self.log.iter().any(newer)
    }

    fn begin_span(&mut self, gpa: u64, end: u64, teardown: bool) -> u64 {
        self.seq += 1;
        let id = self.seq;
        self.active.push(Span {
            id,
            gpa,
            end,
            teardown,
        });
        id
    }

    fn end_span(&mut self, id: u64) {
        let i = self
            .active
            .iter()
            .position(|s| s.id == id)
            .expect("ending an invalidation that is not active");
        let span = self.active.swap_remove(i);
        let evicted = std::mem::replace(&mut self.log[self.log_next], span);
        self.log_floor = self.log_floor.max(evicted.id);
        self.log_next = (self.log_next + 1) % LOG_LEN;
    }

    /// Write one translation. `Err(())` means a fresh leaf is needed and
    /// the free list is empty: drop the lock, allocate, come back.
    fn install_one(&mut self, ri: usize, tr: &Translation) -> Result<(), ()> {
        let region = &mut self.regions[ri];
        let si = region.slot_index(tr.gpa);
        let gen = region.valid_gen;
        if region.dir[si].current(gen).is_none() {
            let mut leaf = self.free.pop().ok_or(())?;
            leaf.reset(region.id, region.slot_gpa(si));
            let slot = &mut region.dir[si];
            slot.gen = gen;
            if let Some(old) = slot.leaf.replace(leaf) {
                self.obsolete.push(old);
            }
        }
        let leaf = region.dir[si]
            .current_mut(gen)
            .expect("slot was just filled");
        let entry = Entry::new(tr.hva, tr.writable);
        match tr.size {
            PageSize::Small => {
                if leaf.huge {
                    split_huge(leaf);
                }
                let i = leaf_index(tr.gpa);
                if !leaf.entries[i].present() {
                    region.live += 1;
                }
                leaf.set(i, entry);
            }
            PageSize::Huge if leaf.present == 0 || leaf.huge => {
                if leaf.present == 0 {
                    region.live += ENTRIES_PER_LEAF as u64;
                }
                leaf.huge = true;
                leaf.set(0, entry);
            }
            PageSize::Huge => {
                // Some 4 KiB entries of this 2 MiB exist: keep the leaf in
                // 4 KiB form and fill all of it.
                for i in 0..ENTRIES_PER_LEAF {
                    if !leaf.entries[i].present() {
                        region.live += 1;
                    }
                    leaf.set(i, Entry::new(tr.hva + i as u64 * PAGE_SIZE, tr.writable));
                }
            }
        }
        Ok(())
    }

    /// Zap current entries in `[pos, end)`, examining at most about
    /// `budget` entries. Returns where to continue and entries zapped.
    fn zap(
        &mut self,
        mut pos: u64,
        end: u64,
        mut budget: usize,
        spare: &mut Option<Box<Leaf>>,
    ) -> (u64, u64) {
        let mut zapped = 0;
        while pos < end && budget > 0 {
            let Some(ri) = self
                .regions
                .iter()
                .position(|r| !r.removed && r.gpa <= pos && pos < r.end())
            else {
                // A hole (a region was removed meanwhile): skip to the next one.
                pos = self
                    .regions
                    .iter()
                    .filter(|r| !r.removed && r.gpa > pos)
                    .map(|r| r.gpa)
                    .min()
                    .unwrap_or(end)
                    .min(end);
                continue;
            };
            let region = &mut self.regions[ri];
            let si = region.slot_index(pos);
            let slot_start = region.slot_gpa(si);
            let zend = end.min(region.end()).min(slot_start + HUGE_PAGE_SIZE);
            let gen = region.valid_gen;
            match region.dir[si].current_mut(gen) {
                Some(leaf) => {
                    if leaf.huge {
                        if pos <= slot_start && zend >= slot_start + HUGE_PAGE_SIZE {
                            let leaf = region.dir[si].leaf.take().expect("checked above");
                            region.live -= ENTRIES_PER_LEAF as u64;
                            zapped += ENTRIES_PER_LEAF as u64;
                            if self.free.len() < FREE_LEAVES_MAX {
                                self.free.push(leaf);
                            } else {
                                // Freed by the caller once the lock is dropped.
                                *spare = Some(leaf);
                                budget = 0;
                            }
                            budget = budget.saturating_sub(ENTRIES_PER_LEAF);
                            pos = zend;
                            continue;
                        }
                        // Part of a huge entry goes: keep the rest as 4 KiB entries.
                        split_huge(leaf);
                    }
                    let mut page = pos;
                    while page < zend {
                        let i = leaf_index(page);
                        if leaf.entries[i].present() {
                            leaf.set(i, Entry::EMPTY);
                            region.live -= 1;
                            zapped += 1;
                        }
                        page += PAGE_SIZE;
                    }
                    budget = budget.saturating_sub(((zend - pos) / PAGE_SIZE) as usize);
                }
                None => budget = budget.saturating_sub(1),
            }
            pos = zend;
        }
        (pos, zapped)
    }
}

fn split_huge(leaf: &mut Leaf) {
    let e = leaf.entries[0];
    leaf.huge = false;
    leaf.present = 0;
    leaf.entries[0] = Entry::EMPTY;
    if e.present() {
        for i in 0..ENTRIES_PER_LEAF {
            leaf.set(i, Entry::new(e.hva() + i as u64 * PAGE_SIZE, e.writable()));
        }
    }
}

/// Numbers the mmus of this process, so a ticket names the one that issued it.
static NEXT_MMU: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn check_range(gpa: u64, len: u64) -> Result<u64, Error> {
    aligned("guest-physical address", gpa, PAGE_SIZE)?;
    aligned("length", len, PAGE_SIZE)?;
    if len == 0 {
        return Err(Error::EmptyRange { gpa });
    }
    gpa.checked_add(len).ok_or(Error::Overflow { gpa, len })
}

/// `[start, start + len)` must end at or below [`ADDRESS_LIMIT`], so that
/// every address the table derives from a region (slot ends rounded up to
/// 2 MiB, host addresses) stays far from wrapping.
fn below_limit(what: &'static str, start: u64, len: u64) -> Result<(), Error> {
    match start.checked_add(len) {
        Some(end) if end <= ADDRESS_LIMIT => Ok(()),
        _ => Err(Error::AboveLimit {
            what,
            start,
            len,
            limit: ADDRESS_LIMIT,
        }),
    }
}

fn aligned(what: &'static str, value: u64, align: u64) -> Result<(), Error> {
    if value.is_multiple_of(align) {
        Ok(())
    } else {
        Err(Error::Misaligned { what, value, align })
    }
}

/// What `teardown_*` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeardownReport {
    /// The sequence number the teardown took.
    pub id: u64,
    /// The generation now current in the affected regions.
    pub generation: u64,
    /// Nanoseconds until old translations were invisible and every mirror
    /// had confirmed the notice.
    pub ns: u64,
}

/// What one `reclaim_step` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimProgress {
    pub leaves: u64,
    pub entries: u64,
    /// Whether obsolete state remains.
    pub more: bool,
}

/// What `fault_in` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultOutcome {
    pub installed: usize,
    /// Times the install raced with an invalidation and started over.
    pub retries: u32,
}

#[derive(Default)]
struct ReclaimSignal {
    /// (work pending, stop)
    flags: std::sync::Mutex<(bool, bool)>,
    cv: std::sync::Condvar,
}

/// The secondary MMU. See the crate documentation for the protocol.
pub struct Mmu {
    /// This instance's number, stamped into its tickets.
    instance: u64,
    config: Config,
    state: MmuLock<State>,
    stats: Stats,
    /// Sleepers in `read_begin`/`unregister_mirror`/`begin`: they wait on
    /// `wait_cv` with `wait_mutex` held and re-check under the mmu lock.
    waiting: AtomicUsize,
    wait_mutex: Mutex<()>,
    wait_cv: Condvar,
    reclaim: Arc<ReclaimSignal>,
    reclaimer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Mmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mmu")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Mmu {
    /// Create an mmu; with `config.background_reclaim` it starts its
    /// reclaimer thread. `Err(InvalidConfig)` if a tunable is out of range
    /// (see [`Config::validate`]), `Err(Spawn)` if the thread cannot start.
    pub fn new(config: Config) -> Result<Arc<Mmu>, Error> {
        config.validate()?;
        clock::calibrate();
        let state = State {
            regions: Vec::with_capacity(MAX_REGIONS),
            next_region: 1,
            next_gen: 1,
            seq: 0,
            active: Vec::with_capacity(MAX_ACTIVE),
            log: [Span::default(); LOG_LEN],
            log_next: 0,
            log_floor: 0,
            mirrors: Arc::new([]),
            next_mirror: 1,
            obsolete: LeafList::default(),
            free: LeafList::default(),
            scan_region: 0,
        };
        let background = config.background_reclaim;
        let mmu = Arc::new(Mmu {
            instance: NEXT_MMU.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            state: MmuLock::new(config.lock, state),
            config,
            stats: Stats::default(),
            waiting: AtomicUsize::new(0),
            wait_mutex: Mutex::new(()),
            wait_cv: Condvar::new(),
            reclaim: Arc::new(ReclaimSignal::default()),
            reclaimer: std::sync::Mutex::new(None),
        });
        if background && cfg!(not(loom)) {
            let weak = Arc::downgrade(&mmu);
            let signal = mmu.reclaim.clone();
            let handle = std::thread::Builder::new()
                .name("mmu-reclaim".into())
                .spawn(move || reclaimer_thread(weak, signal))
                .map_err(|e| Error::Spawn(e.to_string()))?;
            *mmu.reclaimer.lock().unwrap() = Some(handle);
        }
        Ok(mmu)
    }

    /// `Err(ForeignTicket)` unless this mmu issued `t`.
    fn own(&self, t: &Ticket) -> Result<(), Error> {
        if t.mmu == self.instance {
            Ok(())
        } else {
            Err(Error::ForeignTicket)
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn lock_policy(&self) -> LockPolicy {
        self.state.policy()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn lock(&self, kind: Hold) -> Guard<'_, State> {
        self.state.lock(&self.stats.hold_all, self.stats.hold(kind))
    }

    /// Sleep until `cond` holds (evaluated under the mmu lock). Pairs with
    /// `wake_waiters`, which every state change a waiter may care about
    /// calls after dropping the mmu lock.
    fn wait_until(&self, mut cond: impl FnMut(&State) -> bool) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut g = self.wait_mutex.lock().unwrap();
        while !cond(&self.lock(Hold::Other)) {
            g = self.wait_cv.wait(g).unwrap();
        }
        drop(g);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn wake_waiters(&self) {
        // A waiter increments `waiting` before its check under the mmu
        // lock, and our change was made under that lock before this load,
        // so either it saw the change or we see it waiting.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let _g = self.wait_mutex.lock().unwrap();
            self.wait_cv.notify_all();
        }
    }

    // ---- regions -------------------------------------------------------

    /// Register a region. Called any time; takes the lock once (the
    /// directory is allocated before). Errors on misalignment, overflow or
    /// overlap with an existing region.
    pub fn add_region(&self, spec: RegionSpec) -> Result<RegionId, Error> {
        let end = check_range(spec.gpa, spec.size)?;
        below_limit("guest-physical", spec.gpa, spec.size)?;
        aligned("host address", spec.hva, PAGE_SIZE)?;
        below_limit("host", spec.hva, spec.size)?;
        let mut table = RegionTable::new(
            RegionId(0),
            spec.name.into(),
            spec.gpa,
            spec.size,
            spec.hva,
            0,
        );
        let mut st = self.lock(Hold::Other);
        if let Some(other) = st
            .regions
            .iter()
            .find(|r| !r.removed && r.gpa < end && spec.gpa < r.end())
        {
            return Err(Error::RegionOverlap {
                name: table.name.to_string(),
                gpa: spec.gpa,
                end,
                other: other.name.to_string(),
                other_gpa: other.gpa,
                other_end: other.end(),
            });
        }
        if st.regions.len() == MAX_REGIONS {
            return Err(Error::OutsideRegions { gpa: spec.gpa, end });
        }
        table.id = RegionId(st.next_region);
        st.next_region += 1;
        table.valid_gen = st.next_gen;
        table.reclaimed_below = st.next_gen;
        let id = table.id;
        st.regions.push(table);
        Ok(id)
    }

    /// Tear the region down (O(1), like `teardown_region`) and forget it;
    /// its table memory is freed by the reclaimer.
    pub fn remove_region(&self, id: RegionId) -> Result<TeardownReport, Error> {
        self.teardown(Scope::Region(id), true)
    }

    /// The live regions.
    pub fn regions(&self) -> Vec<RegionInfo> {
        let mut out = Vec::with_capacity(MAX_REGIONS);
        let st = self.lock(Hold::Other);
        for r in st.regions.iter().filter(|r| !r.removed) {
            out.push((
                r.id,
                r.name.clone(),
                r.gpa,
                r.size,
                r.hva,
                r.valid_gen,
                r.live,
            ));
        }
        drop(st);
        out.into_iter()
            .map(|(id, name, gpa, size, hva, generation, live)| RegionInfo {
                id,
                name: name.to_string(),
                gpa,
                size,
                hva,
                generation,
                mapped_bytes: live * PAGE_SIZE,
            })
            .collect()
    }

    /// Change a region's host base (the backing moved, e.g. after a
    /// teardown gave it fresh memory). Existing translations are not
    /// touched: call it from a `Backing` mirror's generation notice, while
    /// the teardown still blocks every fault in the region.
    pub fn set_region_hva(&self, id: RegionId, hva: u64) -> Result<(), Error> {
        aligned("host address", hva, PAGE_SIZE)?;
        let mut st = self.lock(Hold::Other);
        let ri = st.region_by_id(id)?;
        below_limit("host", hva, st.regions[ri].size)?;
        st.regions[ri].hva = hva;
        Ok(())
    }

    /// Bytes with a current translation, over all regions.
    pub fn mapped_bytes(&self) -> u64 {
        let st = self.lock(Hold::Other);
        st.regions
            .iter()
            .filter(|r| !r.removed)
            .map(|r| r.live * PAGE_SIZE)
            .sum()
    }

    // ---- mirrors -------------------------------------------------------

    /// Subscribe a mirror. It receives every invalidation that starts after
    /// this returns. Never blocks an invalidation in flight: the list is
    /// copied and swapped.
    pub fn register_mirror(&self, mirror: Arc<dyn Mirror>) -> MirrorId {
        loop {
            let (current, id) = {
                let st = self.lock(Hold::Other);
                (st.mirrors.clone(), st.next_mirror)
            };
            let mut list: Vec<_> = current.iter().cloned().collect();
            list.push((MirrorId(id), mirror.clone()));
            let list: MirrorList = list.into();
            let mut st = self.lock(Hold::Other);
            if Arc::ptr_eq(&st.mirrors, &current) {
                let old = std::mem::replace(&mut st.mirrors, list);
                st.next_mirror += 1;
                drop(st);
                drop(old);
                return MirrorId(id);
            }
        }
    }

    /// Unsubscribe a mirror. Returns once no invalidation that could still
    /// call it is running, so the caller may free it. May sleep.
    pub fn unregister_mirror(&self, id: MirrorId) -> Result<(), Error> {
        let last = loop {
            let current = self.lock(Hold::Other).mirrors.clone();
            if !current.iter().any(|(m, _)| *m == id) {
                return Err(Error::NoSuchMirror(id.0));
            }
            let list: MirrorList = current
                .iter()
                .filter(|(m, _)| *m != id)
                .cloned()
                .collect::<Vec<_>>()
                .into();
            let mut st = self.lock(Hold::Other);
            if Arc::ptr_eq(&st.mirrors, &current) {
                let old = std::mem::replace(&mut st.mirrors, list);
                let last = st.seq;
                drop(st);
                drop(old);
                break last;
            }
        };
        self.wait_until(|st| st.active.iter().all(|s| s.id > last));
        Ok(())
    }

    pub fn mirror_count(&self) -> usize {
        self.lock(Hold::Other).mirrors.len()
    }

    // ---- faults --------------------------------------------------------

    /// Start resolving a fault on `[gpa, gpa + len)` (page aligned, inside
    /// one region). Sleeps while an invalidation of an overlapping range is
    /// running. The ticket is then good until an overlapping invalidation
    /// starts.
    pub fn read_begin(&self, gpa: u64, len: u64) -> Result<Ticket, Error> {
        loop {
            match self.try_read_begin(gpa, len) {
                Err(Error::Busy { .. }) => {}
                other => return other,
            }
            Stats::bump(&self.stats.read_begin_waits, 1);
            let end = check_range(gpa, len)?;
            self.wait_until(|st| !st.collides_active(gpa, end));
        }
    }

    /// `read_begin` that never sleeps: `Err(Busy)` while an overlapping
    /// invalidation runs (`teardown` says whether it is a teardown).
    pub fn try_read_begin(&self, gpa: u64, len: u64) -> Result<Ticket, Error> {
        let end = check_range(gpa, len)?;
        let st = self.lock(Hold::Fault);
        let ri = st.region_index(gpa, len)?;
        if let Some(s) = st.active.iter().find(|s| s.overlaps(gpa, end)) {
            return Err(Error::Busy {
                gpa: s.gpa,
                end: s.end,
                teardown: s.teardown,
            });
        }
        let r = &st.regions[ri];
        Ok(Ticket {
            mmu: self.instance,
            seq: st.seq,
            gpa,
            len,
            region: r.id,
            region_gpa: r.gpa,
            region_hva: r.hva,
        })
    }

    /// True if the ticket is stale: an overlapping invalidation started
    /// since it was taken. A mirror calls this under its own update lock
    /// right before programming its table (the lock its invalidation
    /// callback also takes), exactly like `mmu_interval_read_retry`.
    /// A ticket of another mmu is always stale: it proves nothing here.
    pub fn read_retry(&self, t: &Ticket) -> bool {
        self.own(t).is_err() || self.lock(Hold::Fault).collides(t)
    }

    /// The current translation of `gpa` (inside the ticket's range), or
    /// `Err(Stale)` if the ticket is stale.
    pub fn translate(&self, t: &Ticket, gpa: u64) -> Result<Option<Translation>, Error> {
        self.own(t)?;
        if gpa < t.gpa || gpa >= t.end() {
            return Err(Error::OutsideTicket {
                gpa,
                start: t.gpa,
                end: t.end(),
            });
        }
        let st = self.lock(Hold::Fault);
        if st.collides(t) {
            return Err(Error::Stale);
        }
        let ri = st.region_by_id(t.region).map_err(|_| Error::Stale)?;
        Ok(st.regions[ri].lookup(gpa))
    }

    /// The current translations of `[gpa, end)` (inside the ticket's range)
    /// in one lock hold, appended to `out` as (page, host address) pairs
    /// until the first page with no translation, whose address is
    /// returned (None: all present). `Err(Stale)` if the ticket is stale.
    /// At most `install_batch` pages per call.
    pub fn translate_range(
        &self,
        t: &Ticket,
        gpa: u64,
        end: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<Option<u64>, Error> {
        self.own(t)?;
        if gpa < t.gpa || end > t.end() || gpa > end {
            return Err(Error::OutsideTicket {
                gpa,
                start: t.gpa,
                end: t.end(),
            });
        }
        // In range: `gpa` is inside a region (below `ADDRESS_LIMIT`) and the
        // batch is bounded by `INSTALL_BATCH_MAX`.
        let end = end.min(gpa + self.config.install_batch as u64 * PAGE_SIZE);
        let st = self.lock(Hold::Fault);
        if st.collides(t) {
            return Err(Error::Stale);
        }
        let ri = st.region_by_id(t.region).map_err(|_| Error::Stale)?;
        let mut page = gpa & !(PAGE_SIZE - 1);
        while page < end {
            match st.regions[ri].lookup(page) {
                Some(tr) => out.push((page, tr.hva + (page - tr.gpa))),
                None => return Ok(Some(page)),
            }
            page += PAGE_SIZE;
        }
        Ok(None)
    }

    /// Record translations resolved under ticket `t`. Fails with
    /// `Err(Stale)` — installing nothing more — as soon as an overlapping
    /// invalidation has started since `t` was taken; what was written in
    /// earlier lock holds of this call is then zapped by that
    /// invalidation. Writes at most `install_batch` entries per lock hold.
    pub fn install(&self, t: &Ticket, translations: &[Translation]) -> Result<usize, Error> {
        self.own(t)?;
        for tr in translations {
            let size = tr.size.bytes();
            aligned("guest-physical address", tr.gpa, size)?;
            aligned("host address", tr.hva, size)?;
            if tr.gpa < t.gpa || tr.gpa.checked_add(size).is_none_or(|e| e > t.end()) {
                return Err(Error::OutsideTicket {
                    gpa: tr.gpa,
                    start: t.gpa,
                    end: t.end(),
                });
            }
        }
        let mut done = 0;
        while done < translations.len() {
            let mut st = self.lock(Hold::Fault);
            if st.collides(t) {
                drop(st);
                Stats::bump(&self.stats.retries, 1);
                return Err(Error::Stale);
            }
            let Ok(ri) = st.region_by_id(t.region) else {
                drop(st);
                Stats::bump(&self.stats.retries, 1);
                return Err(Error::Stale);
            };
            let batch_end = (done + self.config.install_batch).min(translations.len());
            let mut need_leaf = false;
            while done < batch_end {
                if st.install_one(ri, &translations[done]).is_err() {
                    need_leaf = true;
                    break;
                }
                done += 1;
            }
            drop(st);
            if need_leaf {
                let leaf = Leaf::boxed();
                self.lock(Hold::Fault).free.push(leaf);
            }
        }
        Stats::bump(&self.stats.installed, done as u64);
        Ok(done)
    }

    /// The whole fault protocol: `read_begin`, `resolve` (outside the lock;
    /// may sleep; fills the translations for the ticket), `install`, and
    /// start over while it races.
    pub fn fault_in<F>(&self, gpa: u64, len: u64, mut resolve: F) -> Result<FaultOutcome, Error>
    where
        F: FnMut(&Ticket, &mut Vec<Translation>) -> Result<(), Error>,
    {
        let mut out = Vec::new();
        let mut retries = 0;
        loop {
            let t = self.read_begin(gpa, len)?;
            out.clear();
            resolve(&t, &mut out)?;
            match self.install(&t, &out) {
                Ok(installed) => {
                    Stats::bump(&self.stats.faults, 1);
                    return Ok(FaultOutcome { installed, retries });
                }
                Err(Error::Stale) if retries < self.config.max_fault_retries => retries += 1,
                Err(Error::Stale) => return Err(Error::TooManyRetries { gpa, retries }),
                Err(e) => return Err(e),
            }
        }
    }

    /// The current translation of `gpa`, without a ticket (a snapshot for
    /// inspection; use `translate` to act on it).
    pub fn lookup(&self, gpa: u64) -> Option<Translation> {
        let st = self.lock(Hold::Other);
        let ri = st.region_index(gpa & !(PAGE_SIZE - 1), PAGE_SIZE).ok()?;
        st.regions[ri].lookup(gpa)
    }

    // ---- invalidation --------------------------------------------------

    /// Take an in-flight slot and a sequence number for `[gpa, end)`;
    /// `prepare` runs in the same lock hold. Sleeps only while all slots
    /// are taken.
    fn begin<T>(
        &self,
        kind: Hold,
        gpa: u64,
        end: u64,
        teardown: bool,
        mut prepare: impl FnMut(&mut State) -> Result<T, Error>,
    ) -> Result<(u64, MirrorList, T), Error> {
        loop {
            {
                let mut st = self.lock(kind);
                if st.active.len() < MAX_ACTIVE {
                    let t = prepare(&mut st)?;
                    let id = st.begin_span(gpa, end, teardown);
                    return Ok((id, st.mirrors.clone(), t));
                }
            }
            self.wait_until(|st| st.active.len() < MAX_ACTIVE);
        }
    }

    fn end(&self, id: u64) {
        self.lock(Hold::Other).end_span(id);
        self.wake_waiters();
    }

    /// Two passes over the mirrors: start every cache mirror, wait for
    /// each; then the same for backing mirrors (after every device has
    /// stopped using the memory).
    fn fan_out(mirrors: &MirrorList, inv: &Invalidation) {
        for role in [MirrorRole::Cache, MirrorRole::Backing] {
            let of_role = || mirrors.iter().filter(move |(_, m)| m.role() == role);
            for (_, m) in of_role() {
                m.invalidate_start(inv);
            }
            for (_, m) in of_role() {
                m.invalidate_wait(inv);
            }
        }
    }

    /// Invalidate `[gpa, gpa + len)`: mark it (faults on it wait or retry),
    /// tell every mirror (two passes, outside the lock, may sleep), zap the
    /// table's entries in bounded batches, end. On return no translation in
    /// the range that existed before the call is visible in the table or
    /// used by any mirror. The range must lie inside regions.
    pub fn invalidate(&self, gpa: u64, len: u64) -> Result<u64, Error> {
        let end = check_range(gpa, len)?;
        let start = clock::ticks();
        let (id, mirrors, ()) = self.begin(Hold::Invalidate, gpa, end, false, |st| {
            if st.covered(gpa, end) {
                Ok(())
            } else {
                Err(Error::OutsideRegions { gpa, end })
            }
        })?;
        Self::fan_out(
            &mirrors,
            &Invalidation {
                id,
                kind: InvalidationKind::Range { gpa, len },
            },
        );
        let mut pos = gpa;
        let mut zapped = 0;
        while pos < end {
            let mut spare = None;
            let (next, n) =
                self.lock(Hold::Invalidate)
                    .zap(pos, end, self.config.zap_batch, &mut spare);
            drop(spare);
            pos = next;
            zapped += n;
        }
        self.end(id);
        Stats::bump(&self.stats.invalidations, 1);
        Stats::bump(&self.stats.entries_zapped, zapped);
        self.stats
            .invalidate_ns
            .record(clock::ticks_to_ns(clock::ticks().wrapping_sub(start)));
        Ok(zapped)
    }

    /// O(1) teardown of every region: one generation bump makes every
    /// translation obsolete, every mirror gets one generation notice, and
    /// the reclaimer frees the old entries later in small batches.
    pub fn teardown_all(&self) -> Result<TeardownReport, Error> {
        self.teardown(Scope::All, false)
    }

    /// O(1) teardown of one region.
    pub fn teardown_region(&self, id: RegionId) -> Result<TeardownReport, Error> {
        self.teardown(Scope::Region(id), false)
    }

    fn teardown(&self, scope: Scope, removed: bool) -> Result<TeardownReport, Error> {
        let start = clock::ticks();
        let (mut gpa, mut end) = (0, u64::MAX);
        if let Scope::Region(id) = scope {
            let st = self.lock(Hold::Teardown);
            let r = &st.regions[st.region_by_id(id)?];
            (gpa, end) = (r.gpa, r.end());
        }
        let (id, mirrors, generation) = self.begin(Hold::Teardown, gpa, end, true, |st| {
            let generation = st.next_gen + 1;
            let mut hit = false;
            for r in st.regions.iter_mut().filter(|r| !r.removed) {
                if scope == Scope::All || scope == Scope::Region(r.id) {
                    r.valid_gen = generation;
                    r.live = 0;
                    r.reclaim_cursor = 0;
                    r.removed = removed;
                    hit = true;
                }
            }
            if let (Scope::Region(id), false) = (scope, hit) {
                return Err(Error::NoSuchRegion(id));
            }
            st.next_gen = generation;
            Ok(generation)
        })?;
        Self::fan_out(
            &mirrors,
            &Invalidation {
                id,
                kind: InvalidationKind::Generation {
                    scope,
                    generation,
                    removed,
                },
            },
        );
        self.end(id);
        let ns = clock::ticks_to_ns(clock::ticks().wrapping_sub(start));
        self.kick_reclaimer();
        Stats::bump(&self.stats.teardowns, 1);
        self.stats.teardown_ns.record(ns);
        Ok(TeardownReport { id, generation, ns })
    }

    /// The O(n) baseline the generation scheme replaces: zap every entry of
    /// every region in one lock hold, then tell the mirrors. For
    /// benchmarks; vCPU faults stall for the whole walk.
    pub fn teardown_all_by_walk(&self) -> Result<TeardownReport, Error> {
        let start = clock::ticks();
        let (id, mirrors, (zapped, generation, dead)) =
            self.begin(Hold::Teardown, 0, u64::MAX, true, |st| {
                let mut zapped = 0;
                let mut dead = LeafList::default();
                for r in st.regions.iter_mut().filter(|r| !r.removed) {
                    for si in 0..r.dir.len() {
                        let gen = r.valid_gen;
                        let Some(leaf) = r.dir[si].current_mut(gen) else {
                            continue;
                        };
                        for i in 0..ENTRIES_PER_LEAF {
                            if leaf.entries[i].present() {
                                leaf.set(i, Entry::EMPTY);
                                zapped += 1;
                            }
                        }
                        dead.push(r.dir[si].leaf.take().expect("checked above"));
                    }
                    r.live = 0;
                }
                Ok((zapped, st.next_gen, dead))
            })?;
        Self::fan_out(
            &mirrors,
            &Invalidation {
                id,
                kind: InvalidationKind::Range {
                    gpa: 0,
                    len: u64::MAX,
                },
            },
        );
        self.end(id);
        let ns = clock::ticks_to_ns(clock::ticks().wrapping_sub(start));
        // Freed outside the lock and outside the measurement, as the
        // generation path leaves freeing to the reclaimer.
        drop(dead);
        Stats::bump(&self.stats.entries_zapped, zapped);
        Ok(TeardownReport { id, generation, ns })
    }

    // ---- reclaim -------------------------------------------------------

    fn kick_reclaimer(&self) {
        let mut f = self.reclaim.flags.lock().unwrap();
        f.0 = true;
        self.reclaim.cv.notify_one();
    }

    /// One reclaim batch: in one lock hold, detach at most `reclaim_batch`
    /// obsolete leaves (examining at most `reclaim_scan` directory slots);
    /// then, without the lock, report them to the mirrors and free them.
    pub fn reclaim_step(&self) -> ReclaimProgress {
        let batch = self.config.reclaim_batch.max(1);
        // Preallocated so detaching neither allocates nor writes to the
        // (cold) leaves under the lock.
        let mut detached: Vec<Box<Leaf>> = Vec::with_capacity(batch);
        let mut finished = None;
        let mut dead_dir: Vec<Slot> = Vec::new();
        let (mirrors, more) = {
            let mut st = self.lock(Hold::Reclaim);
            while detached.len() < batch {
                match st.obsolete.pop() {
                    Some(leaf) => detached.push(leaf),
                    None => break,
                }
            }
            let mut scanned = 0;
            while detached.len() < batch && scanned < self.config.reclaim_scan {
                let n = st.regions.len();
                let Some(ri) = (0..n)
                    .map(|k| (st.scan_region + k) % n)
                    .find(|&i| st.regions[i].reclaim_cursor < st.regions[i].dir.len())
                else {
                    break;
                };
                st.scan_region = ri;
                let r = &mut st.regions[ri];
                while r.reclaim_cursor < r.dir.len()
                    && detached.len() < batch
                    && scanned < self.config.reclaim_scan
                {
                    let i = r.reclaim_cursor;
                    if r.slot_obsolete(i) {
                        detached.push(r.dir[i].leaf.take().expect("obsolete slot has a leaf"));
                    }
                    r.reclaim_cursor += 1;
                    scanned += 1;
                }
            }
            // Report a region once its scan is complete and no leaf of it
            // can still sit on the obsolete list.
            if st.obsolete.is_empty() {
                if let Some(ri) = st.regions.iter().position(|r| {
                    r.reclaim_cursor == r.dir.len()
                        && (r.reclaimed_below != r.valid_gen || r.removed)
                }) {
                    let r = &mut st.regions[ri];
                    r.reclaimed_below = r.valid_gen;
                    finished = Some((r.id, r.valid_gen));
                    if r.removed {
                        dead_dir = std::mem::take(&mut st.regions.remove(ri).dir);
                        st.scan_region = 0;
                    }
                }
            }
            let more = !st.obsolete.is_empty()
                || st.regions.iter().any(|r| {
                    r.reclaim_cursor < r.dir.len() || r.reclaimed_below != r.valid_gen || r.removed
                });
            (st.mirrors.clone(), more)
        };

        let mut extents = Vec::new();
        let mut entries = 0;
        let leaves = detached.len() as u64;
        let mut recycled = detached;
        for leaf in recycled.iter_mut() {
            entries += leaf.extents(&mut extents);
            leaf.reset(RegionId(0), 0);
        }
        if !extents.is_empty() {
            for (_, m) in mirrors.iter() {
                m.reclaimed(&extents);
            }
        }
        if let Some((region, below)) = finished {
            for (_, m) in mirrors.iter() {
                m.generation_reclaimed(region, below);
            }
        }
        if !recycled.is_empty() {
            let mut st = self.lock(Hold::Reclaim);
            while st.free.len() < FREE_LEAVES_MAX {
                match recycled.pop() {
                    Some(leaf) => st.free.push(leaf),
                    None => break,
                }
            }
        }
        drop(recycled);
        drop(dead_dir);
        if leaves > 0 || finished.is_some() {
            Stats::bump(&self.stats.reclaim_batches, 1);
            Stats::bump(&self.stats.leaves_reclaimed, leaves);
            Stats::bump(&self.stats.entries_reclaimed, entries);
        }
        ReclaimProgress {
            leaves,
            entries,
            more,
        }
    }

    /// Run `reclaim_step` until nothing obsolete is left (tests and
    /// benchmarks; the background thread does this on its own).
    pub fn reclaim_all(&self) -> ReclaimProgress {
        let mut total = ReclaimProgress::default();
        loop {
            let p = self.reclaim_step();
            total.leaves += p.leaves;
            total.entries += p.entries;
            if !p.more {
                return total;
            }
        }
    }

    /// Whether obsolete state is still waiting for the reclaimer.
    pub fn reclaim_pending(&self) -> bool {
        let st = self.lock(Hold::Other);
        !st.obsolete.is_empty()
            || st.regions.iter().any(|r| {
                r.reclaim_cursor < r.dir.len() || r.reclaimed_below != r.valid_gen || r.removed
            })
    }
}

impl Drop for Mmu {
    fn drop(&mut self) {
        {
            let mut f = self.reclaim.flags.lock().unwrap();
            f.1 = true;
            self.reclaim.cv.notify_one();
        }
        let handle = self.reclaimer.lock().unwrap().take();
        if let Some(h) = handle {
            // The reclaimer may itself hold the last reference.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

fn reclaimer_thread(mmu: Weak<Mmu>, signal: Arc<ReclaimSignal>) {
    loop {
        {
            let mut f = signal.flags.lock().unwrap();
            while !f.0 && !f.1 {
                f = signal.cv.wait(f).unwrap();
            }
            if f.1 {
                return;
            }
            f.0 = false;
        }
        let Some(mmu) = mmu.upgrade() else { return };
        while mmu.reclaim_step().more {
            if signal.flags.lock().unwrap().1 {
                return;
            }
            // Let faulting threads at the lock between batches.
            std::thread::yield_now();
        }
    }
}

/// A resolver for memory that needs no populating (ordinary process memory,
/// which the kernel faults in on first touch): installs `region hva +
/// offset` for every page.
pub struct DirectResolver {
    mmu: Arc<Mmu>,
}

impl DirectResolver {
    pub fn new(mmu: Arc<Mmu>) -> Self {
        DirectResolver { mmu }
    }
}

impl FaultResolver for DirectResolver {
    fn resolve(&self, gpa: u64, len: u64, _write: bool) -> Result<(), Error> {
        self.mmu
            .fault_in(gpa, len, |t, out| {
                let mut page = t.gpa();
                while page < t.end() {
                    out.push(Translation {
                        gpa: page,
                        hva: t.host_addr(page)?,
                        size: PageSize::Small,
                        writable: true,
                    });
                    page += PAGE_SIZE;
                }
                Ok(())
            })
            .map(|_| ())
    }
}
