//! The protocol itself: [`Mmu`]. The rules it follows are written once, in
//! the crate documentation (`lib.rs`).

use crate::clock;
use crate::config::Config;
use crate::error::Error;
use crate::lock::{Deferred, Guard, LockPolicy, MmuLock};
use crate::mirror::{FaultResolver, Mirror, MirrorId, MirrorRole};
use crate::seq::SeqLog;
use crate::stats::{Hold, Stats};
use crate::sync::{
    callback_depth_ptr, in_callback, prefetch, thread_token, AtomicUsize, Condvar, InCallback,
    Mutex, Ordering, ThreadToken,
};
use crate::table::{leaf_index, Entry, Leaf, LeafList, RegionTable, ENTRIES_PER_LEAF};
use crate::types::*;
use std::sync::Arc;

mod fault;
mod mirrors;
mod reclaim;
mod regions;
mod write;
pub use fault::{DirectResolver, FaultOutcome};
pub use reclaim::ReclaimProgress;

/// Regions per mmu (preallocated so adding one never allocates under the
/// lock). KVM allows more memslots, but a microVM uses a handful.
pub const MAX_REGIONS: usize = 64;
/// Largest region `add_region` accepts (64 TiB: its directory of 2 MiB
/// slots is then 512 MiB). Larger ones are `Err(RegionTooLarge)`.
pub const MAX_REGION_SIZE: u64 = 1 << 46;
/// Reclaim steps `add_region` runs at most to free a removed region's entry.
const ADMIT_STEPS_MAX: usize = 4096;
/// Zeroed leaves kept for reuse so installs rarely allocate.
const FREE_LEAVES_MAX: usize = 256;

/// The subscribed mirrors, each with its role read once at registration
/// (the fan-out then makes no call to tell the passes apart).
type MirrorList = Arc<[(MirrorId, MirrorRole, Arc<dyn Mirror>)]>;

/// `repr(C)`: the scalars a teardown touches come first, next to the lock
/// word, and the sequence log's arrays last (see `Mmu`).
#[repr(C)]
struct State {
    regions: Vec<RegionTable>,
    next_region: u64,
    next_gen: u64,
    mirrors: MirrorList,
    next_mirror: u64,
    /// Obsolete leaves detached by installs, awaiting the reclaimer.
    obsolete: LeafList,
    free: LeafList,
    /// Region the reclaimer's scan is in.
    scan_region: usize,
    /// The thread running a reclaim step, if any: steps are serialized so
    /// a generation is reported reclaimed only after every batch of it was.
    reclaim_owner: Option<ThreadToken>,
    /// Reclaim steps started so far.
    reclaim_epoch: u64,
    /// The step in progress took obsolete state (leaves, or a generation
    /// to report) and has not yet told the mirrors and freed it: until
    /// then `reclaim_pending` stays true.
    reclaim_reporting: bool,
    /// In-flight and recently ended invalidations.
    seq: SeqLog,
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

    /// Whether a new region `[gpa, end)` fits: no overlap, a free entry.
    fn admits(&self, name: &str, gpa: u64, end: u64) -> Result<(), Error> {
        if let Some(other) = self
            .regions
            .iter()
            .find(|r| !r.removed && r.gpa < end && gpa < r.end())
        {
            return Err(Error::RegionOverlap {
                name: name.to_string(),
                gpa,
                end,
                other: other.name.to_string(),
                other_gpa: other.gpa,
                other_end: other.end(),
            });
        }
        if self.regions.len() == MAX_REGIONS {
            return Err(Error::TooManyRegions {
                max: MAX_REGIONS,
                removed: self.regions.iter().filter(|r| r.removed).count(),
            });
        }
        Ok(())
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

    /// `read_retry`: has an invalidation overlapping the ticket's range
    /// started since the ticket was taken?
    fn collides(&self, t: &Ticket) -> bool {
        debug_assert!(
            t.seq <= self.seq.current(),
            "tickets are only issued by this mmu"
        );
        self.seq.collides(t.seq, t.gpa, t.end())
    }

    /// Whether a teardown of (part of) region `ri` is still being fanned
    /// out: its old generation's leaves must not reach any mirror's
    /// `reclaimed` until every mirror confirmed the notice.
    fn fenced(&self, ri: usize) -> bool {
        let r = &self.regions[ri];
        self.seq.teardown_in_flight(r.gpa, r.end())
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

/// `Err(Reentrant)` inside a mirror callback: `what` may sleep, and a
/// sleeping callback can wait for its own thread (a nested invalidation
/// waiting for in-flight slots it holds) or for another thread's callback
/// that waits for it in turn.
#[inline(always)]
fn not_in_callback(what: &'static str) -> Result<(), Error> {
    if in_callback() {
        Err(Error::Reentrant(what))
    } else {
        Ok(())
    }
}

/// An invalidation in flight. Dropping it ends it — also when a mirror
/// callback panics, so the range never stays odd (and the region fenced)
/// forever; a range invalidation unwinding still zaps its range first.
struct Span<'a> {
    mmu: &'a Mmu,
    kind: Hold,
    id: u64,
    zap: Option<(u64, u64)>,
    /// The lock hold of `begin`, recorded when the span ends.
    begun: Option<Deferred<'a>>,
    /// Ended by `finish`; the drop then does nothing.
    ended: bool,
}

impl<'a> Span<'a> {
    /// End the invalidation; returns the lock holds of its start and end
    /// for the caller to record once its measured work is done.
    #[inline(always)]
    fn finish(mut self) -> [Option<Deferred<'a>>; 2] {
        debug_assert!(self.zap.is_none(), "zapped by the caller first");
        let ended = self.mmu.end_deferred(self.kind, self.id);
        if self.kind == Hold::Teardown {
            self.mmu.kick_reclaimer();
        }
        self.ended = true;
        [self.begun.take(), Some(ended)]
    }
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Some((gpa, end)) = self.zap.take() {
            self.mmu.zap_range(gpa, end);
        }
        self.mmu.end_deferred(self.kind, self.id).record();
        if self.kind == Hold::Teardown {
            self.mmu.kick_reclaimer();
        }
        if let Some(begun) = self.begun.take() {
            begun.record();
        }
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

/// The secondary MMU. See the crate documentation for the protocol.
///
/// `repr(C)` with the fields a teardown touches packed together — the
/// waiter count, the statistics (whose lock-hold histograms end right
/// before the lock), the lock word, the state's scalars: a teardown on cold
/// caches (after the guest ran) then misses on a few adjacent lines of one
/// page instead of lines spread over several.
#[repr(C)]
pub struct Mmu {
    /// This instance's number, stamped into its tickets.
    instance: u64,
    /// Sleepers in `read_begin`/`unregister_mirror`/`begin`: they wait on
    /// `wait_cv` with `wait_mutex` held and re-check under the mmu lock.
    waiting: AtomicUsize,
    /// Set by a teardown that ended; the background reclaimer polls it
    /// (see `reclaim::RECLAIM_POLL_MAX`). Next to `waiting`, which the same
    /// teardown reads: one cache line for both.
    reclaim_kicked: std::sync::atomic::AtomicBool,
    stats: Stats,
    state: MmuLock<State>,
    config: Config,
    wait_mutex: Mutex<()>,
    wait_cv: Condvar,
    reclaim: Arc<reclaim::ReclaimSignal>,
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
            seq: SeqLog::new(),
            reclaim_owner: None,
            reclaim_epoch: 0,
            reclaim_reporting: false,
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
            reclaim_kicked: std::sync::atomic::AtomicBool::new(false),
            wait_mutex: Mutex::new(()),
            wait_cv: Condvar::new(),
            reclaim: Arc::new(reclaim::ReclaimSignal::default()),
            reclaimer: std::sync::Mutex::new(None),
        });
        if background && cfg!(not(loom)) {
            let weak = Arc::downgrade(&mmu);
            let signal = mmu.reclaim.clone();
            let handle = std::thread::Builder::new()
                .name("mmu-reclaim".into())
                .spawn(move || reclaim::reclaimer_thread(weak, signal))
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

    #[inline(always)]
    fn lock(&self, kind: Hold) -> Guard<'_, State> {
        self.state.lock(self.stats.hold(kind))
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

    #[inline(always)]
    fn wake_waiters(&self) {
        // A waiter increments `waiting` before its check under the mmu
        // lock, and our change was made under that lock before this load,
        // so either it saw the change or we see it waiting.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify_waiters();
        }
    }

    #[cold]
    fn notify_waiters(&self) {
        let _g = self.wait_mutex.lock().unwrap();
        self.wait_cv.notify_all();
    }

    // ---- regions -------------------------------------------------------

    // ---- invalidation --------------------------------------------------

    /// Take an in-flight slot and a sequence number for `[gpa, end)`;
    /// `prepare` runs in the same lock hold. Sleeps only while all slots
    /// are taken.
    #[inline(always)]
    fn begin<T>(
        &self,
        kind: Hold,
        gpa: u64,
        end: u64,
        teardown: bool,
        mut prepare: impl FnMut(&mut State) -> Result<T, Error>,
    ) -> Result<(Span<'_>, MirrorList, T), Error> {
        not_in_callback(if teardown { "teardown" } else { "invalidate" })?;
        let me = thread_token();
        loop {
            {
                let mut st = self.lock(kind);
                if !st.seq.full() {
                    // The next lines, while `prepare` works: the regions,
                    // the mirror list, the log slot `end` will write.
                    let regions = st.regions.len().min(8);
                    prefetch(st.regions.as_ptr(), regions * size_of::<RegionTable>());
                    prefetch(Arc::as_ptr(&st.mirrors), 64);
                    prefetch(st.seq.next_log_slot(), 1);
                    let t = prepare(&mut st)?;
                    let id = st.seq.begin(gpa, end, teardown, Some(me));
                    let mirrors = st.mirrors.clone();
                    // The mirrors' own state, which the fan-out touches
                    // first (their code and vtables it cannot name).
                    for (_, _, m) in mirrors.iter().take(4) {
                        prefetch(Arc::as_ptr(m), 1);
                    }
                    let span = Span {
                        mmu: self,
                        kind,
                        id,
                        zap: None,
                        begun: Some(st.release()),
                        ended: false,
                    };
                    return Ok((span, mirrors, t));
                }
            }
            self.wait_until(|st| !st.seq.full());
        }
    }

    /// End invalidation `id`; `kind` is the hold kind its `begin` used (one
    /// histogram for both holds keeps a cold teardown to fewer cache lines).
    /// Returns the lock hold, not yet recorded.
    #[inline(always)]
    fn end_deferred(&self, kind: Hold, id: u64) -> Deferred<'_> {
        let mut st = self.lock(kind);
        st.seq.end(id);
        let held = st.release();
        self.wake_waiters();
        held
    }

    /// Invalidate `[gpa, gpa + len)`: mark it (faults on it wait or retry),
    /// tell every mirror (two passes, outside the lock, may sleep), zap the
    /// table's entries in bounded batches, end. On return no translation in
    /// the range that existed before the call is visible in the table or
    /// used by any mirror. The range must lie inside regions.
    pub fn invalidate(&self, gpa: u64, len: u64) -> Result<u64, Error> {
        let end = check_range(gpa, len)?;
        let start = clock::ticks();
        let (mut span, mirrors, ()) = self.begin(Hold::Invalidate, gpa, end, false, |st| {
            if st.covered(gpa, end) {
                Ok(())
            } else {
                Err(Error::OutsideRegions { gpa, end })
            }
        })?;
        span.zap = Some((gpa, end));
        Self::fan_out(
            &mirrors,
            &Invalidation {
                id: span.id,
                kind: InvalidationKind::Range { gpa, len },
            },
        );
        span.zap = None;
        let zapped = self.zap_range(gpa, end);
        drop(span);
        Stats::bump(&self.stats.invalidations, 1);
        Stats::bump(&self.stats.entries_zapped, zapped);
        self.stats
            .invalidate_ns
            .record(clock::ticks_to_ns(clock::ticks().wrapping_sub(start)));
        Ok(zapped)
    }

    /// Zap `[gpa, end)` in lock holds of at most `zap_batch` entries;
    /// returns the entries zapped.
    fn zap_range(&self, gpa: u64, end: u64) -> u64 {
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
        zapped
    }

    /// O(1) teardown of every region: one generation bump makes every
    /// translation obsolete, every mirror gets one generation notice, and
    /// the reclaimer frees the old entries later in small batches.
    #[inline]
    pub fn teardown_all(&self) -> Result<TeardownReport, Error> {
        self.teardown(Scope::All, false)
    }

    /// O(1) teardown of one region.
    #[inline]
    pub fn teardown_region(&self, id: RegionId) -> Result<TeardownReport, Error> {
        self.teardown(Scope::Region(id), false)
    }

    fn teardown(&self, scope: Scope, removed: bool) -> Result<TeardownReport, Error> {
        let start = clock::ticks();
        // The lines this call will miss on first, all at once (see
        // `prefetch`): the thread's callback depth, the waiter count and
        // kick flag, the lock word with the state's scalars and the first
        // in-flight slots.
        prefetch(callback_depth_ptr(), 1);
        prefetch(&self.waiting, 1);
        prefetch(&self.state, 384);
        let (mut gpa, mut end) = (0, u64::MAX);
        if let Scope::Region(id) = scope {
            let st = self.lock(Hold::Teardown);
            let r = &st.regions[st.region_by_id(id)?];
            (gpa, end) = (r.gpa, r.end());
        }
        let (span, mirrors, generation) = self.begin(Hold::Teardown, gpa, end, true, |st| {
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
                id: span.id,
                kind: InvalidationKind::Generation {
                    scope,
                    generation,
                    removed,
                },
            },
        );
        let id = span.id;
        let holds = span.finish();
        let ns = self.state.ns(clock::ticks().wrapping_sub(start));
        self.count_teardown(holds, ns);
        Ok(TeardownReport { id, generation, ns })
    }

    /// A teardown's bookkeeping, after its measured part (each histogram
    /// bucket is a cache miss on a cold teardown) and out of line (so the
    /// teardown's own code spans fewer instruction cache lines).
    #[inline(never)]
    fn count_teardown(&self, holds: [Option<Deferred<'_>>; 2], ns: u64) {
        for hold in holds.into_iter().flatten() {
            hold.record();
        }
        Stats::bump(&self.stats.teardowns, 1);
        self.stats.teardown_ns.record(ns);
    }

    /// The O(n) baseline the generation scheme replaces: zap every entry of
    /// every region in one lock hold, then tell the mirrors. For
    /// benchmarks; vCPU faults stall for the whole walk.
    pub fn teardown_all_by_walk(&self) -> Result<TeardownReport, Error> {
        let start = clock::ticks();
        let (span, mirrors, (zapped, generation, dead)) =
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
                id: span.id,
                kind: InvalidationKind::Range {
                    gpa: 0,
                    len: u64::MAX,
                },
            },
        );
        let id = span.id;
        drop(span);
        let ns = clock::ticks_to_ns(clock::ticks().wrapping_sub(start));
        // Freed outside the lock and outside the measurement, as the
        // generation path leaves freeing to the reclaimer.
        drop(dead);
        Stats::bump(&self.stats.entries_zapped, zapped);
        Ok(TeardownReport { id, generation, ns })
    }
}
