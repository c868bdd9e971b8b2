//! The reclaimer: frees the leaves that teardowns made obsolete, in bounded
//! batches, and tells the mirrors (the "Generations" and "Reclaim" sections
//! of the crate documentation).
//!
//! Three rules make its calls safe to act on:
//!
//! * **Fence.** A region with a teardown still being fanned out is skipped,
//!   so an old generation's leaves reach `Mirror::reclaimed` only after every
//!   mirror's `invalidate_wait` for that teardown returned (a `Backing`
//!   mirror may release the memory: no device still uses it). Leaves on the
//!   obsolete list need no check: an install detaches a leaf only when no
//!   teardown of its region is in flight.
//! * **One step at a time.** A step owns the reclaimer from taking its
//!   batch to its last mirror call; another step waits. So
//!   `generation_reclaimed` follows every `reclaimed` batch of that
//!   generation, and `unregister_mirror` knows which step to wait for.
//! * **No wait from a callback.** A step called from inside any mirror
//!   callback does nothing instead of waiting (for itself, or for another
//!   thread's callback that waits for this one).
//! * **Removed regions first.** They are scanned and reported before the
//!   others (several per step), a region is reported once none of its
//!   leaves sits on the obsolete list (a per-region count), and every other
//!   step scans before popping the list, so faults refilling the list
//!   cannot keep removed regions' entries in the region table.

use super::{Hold, MirrorList, Mmu, State, Stats};
use crate::error::Error;
use crate::sync::thread_token;
use crate::table::{Leaf, Slot};
use crate::types::RegionId;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// What one `reclaim_step` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimProgress {
    pub leaves: u64,
    pub entries: u64,
    /// Whether obsolete state that can be reclaimed now remains. Work held
    /// back until a teardown in flight ends is not counted: that teardown
    /// kicks the reclaimer when it ends.
    pub more: bool,
}

/// How often the background reclaimer looks for a teardown's kick: every
/// `RECLAIM_POLL_MIN` after it found work, backing off (doubling) to
/// `RECLAIM_POLL_MAX` while it finds none.
///
/// A teardown only sets a flag. Waking a sleeping thread is a futex
/// syscall and, when its core is idle, an inter-processor interrupt: 14–24
/// µs on the teardown's side on this nested host, ten times the rest of
/// the teardown. Polling instead delays the start of reclaim (the old
/// leaves, `Mirror::reclaimed`) by up to `RECLAIM_POLL_MAX` after a quiet
/// spell, and costs an idle mmu about 1/16 ms timer wake-ups: the teardown
/// example prints that cost (`idle_reclaimer_cpu_us_per_s`); a fixed 2 ms
/// poll measured ~1 % of a core here.
pub(super) const RECLAIM_POLL_MIN: Duration = Duration::from_millis(1);
pub(super) const RECLAIM_POLL_MAX: Duration = Duration::from_millis(16);

/// Stops the background reclaimer thread (it polls for work on its own).
#[derive(Default)]
pub(super) struct ReclaimSignal {
    stop: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

/// What a step took from the table in its lock hold.
struct Batch {
    /// Regions whose old generations are all detached (≤ `FINISH_MAX`).
    finished: Vec<(RegionId, u64)>,
    /// Directories of removed regions among them, freed without the lock.
    dead_dirs: Vec<Vec<Slot>>,
    mirrors: MirrorList,
    more: bool,
}

/// Regions one step may report finished (each costs ≤ 64 region checks in
/// the lock hold).
const FINISH_MAX: usize = 8;

/// Preallocated room for a step's finished regions, so the lock hold does
/// not allocate.
struct Finished {
    finished: Vec<(RegionId, u64)>,
    dead_dirs: Vec<Vec<Slot>>,
}

/// Ends a step's ownership of the reclaimer, even if a mirror callback
/// panics (otherwise every later step and `unregister_mirror` would wait
/// forever).
struct Owned<'a>(&'a Mmu);

impl Owned<'_> {
    /// The normal end of a step: give back up to `FREE_LEAVES_MAX` leaves
    /// for reuse and end the ownership in one lock hold (every hold is a
    /// chance for the holder to be preempted with faults waiting).
    fn release(self, recycled: &mut Vec<Box<Leaf>>) {
        let mmu = self.0;
        std::mem::forget(self);
        {
            let mut st = mmu.lock(Hold::Reclaim);
            while st.free.len() < super::FREE_LEAVES_MAX {
                match recycled.pop() {
                    Some(leaf) => st.free.push(leaf),
                    None => break,
                }
            }
            st.reclaim_owner = None;
            st.reclaim_reporting = false;
        }
        mmu.wake_waiters();
    }
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        {
            let mut st = self.0.lock(Hold::Reclaim);
            st.reclaim_owner = None;
            st.reclaim_reporting = false;
        }
        self.0.wake_waiters();
    }
}

impl State {
    /// Whether region `ri` holds obsolete state (leaves, or a generation
    /// not yet reported).
    fn reclaim_due(&self, ri: usize) -> bool {
        let r = &self.regions[ri];
        r.reclaim_cursor < r.dir.len() || r.reclaimed_below != r.valid_gen || r.removed
    }

    /// Obsolete state a step may take now (not fenced by a teardown).
    fn reclaimable(&self) -> bool {
        !self.obsolete.is_empty()
            || (0..self.regions.len()).any(|ri| self.reclaim_due(ri) && !self.fenced(ri))
    }

    /// One lock hold's work: detach at most `batch` obsolete leaves into
    /// `out`, examining at most `scan` directory slots, and pick at most
    /// one region whose old generations are now all detached.
    fn detach(
        &mut self,
        batch: usize,
        scan: usize,
        out: &mut Vec<Box<Leaf>>,
        spare: &mut Finished,
    ) -> Batch {
        // Every other step scans the directories first: faults that keep
        // refilling the obsolete list must not starve the scan (and with
        // it the removed regions waiting to free their entry).
        if self.reclaim_epoch.is_multiple_of(2) {
            self.detach_listed(batch, out);
            self.detach_scanned(batch, scan, out);
        } else {
            self.detach_scanned(batch, scan, out);
            self.detach_listed(batch, out);
        }
        // Report regions whose scan is complete and no leaf of which still
        // sits on the obsolete list (counted per region, so faults that
        // keep the list busy in other regions cannot hold them back);
        // removed regions first, several per step, so their entries in the
        // region table come free as fast as regions are removed.
        let mut finished = std::mem::take(&mut spare.finished);
        let mut dead_dirs = std::mem::take(&mut spare.dead_dirs);
        while finished.len() < FINISH_MAX {
            let ready = |ri: usize| {
                let r = &self.regions[ri];
                r.reclaim_cursor == r.dir.len()
                    && r.on_obsolete_list == 0
                    && (r.reclaimed_below != r.valid_gen || r.removed)
                    && !self.fenced(ri)
            };
            let n = self.regions.len();
            let Some(ri) = (0..n)
                .find(|&ri| self.regions[ri].removed && ready(ri))
                .or_else(|| (0..n).find(|&ri| ready(ri)))
            else {
                break;
            };
            let r = &mut self.regions[ri];
            r.reclaimed_below = r.valid_gen;
            finished.push((r.id, r.valid_gen));
            if r.removed {
                // Freed by the caller once the lock is dropped.
                dead_dirs.push(std::mem::take(&mut self.regions.remove(ri).dir));
                self.scan_region = 0;
            }
        }
        Batch {
            finished,
            dead_dirs,
            mirrors: self.mirrors.clone(),
            more: self.reclaimable(),
        }
    }

    /// Detach leaves from the obsolete list until `out` holds `batch`.
    fn detach_listed(&mut self, batch: usize, out: &mut Vec<Box<Leaf>>) {
        while out.len() < batch {
            match self.obsolete.pop() {
                Some(leaf) => {
                    if let Some(r) = self.regions.iter_mut().find(|r| r.id == leaf.region) {
                        r.on_obsolete_list -= 1;
                    }
                    out.push(leaf);
                }
                None => break,
            }
        }
    }

    /// Detach obsolete leaves found in the directories until `out` holds
    /// `batch`, examining at most `scan` slots.
    fn detach_scanned(&mut self, batch: usize, scan: usize, out: &mut Vec<Box<Leaf>>) {
        let mut scanned = 0;
        while out.len() < batch && scanned < scan {
            // Removed regions first (finishing one frees its entry in the
            // region table), then the others in turn: a step ends its scan
            // with the next region's turn, so a region torn down over and
            // over (its cursor reset each time) cannot starve the rest.
            let n = self.regions.len();
            let pending = |i: usize| {
                self.regions[i].reclaim_cursor < self.regions[i].dir.len() && !self.fenced(i)
            };
            let Some(ri) = (0..n)
                .find(|&i| self.regions[i].removed && pending(i))
                .or_else(|| {
                    (0..n)
                        .map(|k| (self.scan_region + k) % n)
                        .find(|&i| pending(i))
                })
            else {
                break;
            };
            self.scan_region = (ri + 1) % n;
            let r = &mut self.regions[ri];
            while r.reclaim_cursor < r.dir.len() && out.len() < batch && scanned < scan {
                let i = r.reclaim_cursor;
                if r.slot_obsolete(i) {
                    if let Some(leaf) = r.dir[i].leaf.take() {
                        out.push(leaf);
                    }
                }
                r.reclaim_cursor += 1;
                scanned += 1;
            }
        }
    }
}

impl Mmu {
    /// Tell the background reclaimer there may be work: a store, no
    /// syscall (it polls the flag, see `RECLAIM_POLL_MAX`).
    #[inline(always)]
    pub(super) fn kick_reclaimer(&self) {
        self.reclaim_kicked.store(true, Ordering::Release);
    }

    /// One reclaim batch: in one lock hold, detach at most `reclaim_batch`
    /// obsolete leaves (examining at most `reclaim_scan` directory slots);
    /// then, without the lock, report them to the mirrors and free them.
    /// Waits (sleeps) while another thread's step is in progress; called
    /// from inside a mirror callback it does nothing.
    pub fn reclaim_step(&self) -> ReclaimProgress {
        self.step().unwrap_or_else(|_| ReclaimProgress {
            more: self.reclaim_pending(),
            ..ReclaimProgress::default()
        })
    }

    /// `reclaim_step`, or `Err(Reentrant)` from inside a mirror callback.
    pub(super) fn step(&self) -> Result<ReclaimProgress, Error> {
        super::not_in_callback("reclaim_step")?;
        let batch_max = self.config.reclaim_batch;
        // Preallocated so detaching neither allocates nor writes to the
        // (cold) leaves under the lock.
        let mut detached: Vec<Box<Leaf>> = Vec::with_capacity(batch_max);
        let mut spare = Finished {
            finished: Vec::with_capacity(FINISH_MAX),
            dead_dirs: Vec::with_capacity(FINISH_MAX),
        };
        let me = thread_token();
        let batch = loop {
            {
                let mut st = self.lock(Hold::Reclaim);
                match st.reclaim_owner {
                    Some(owner) if owner == me => return Err(Error::Reentrant("reclaim_step")),
                    Some(_) => {}
                    None => {
                        st.reclaim_owner = Some(me);
                        st.reclaim_epoch += 1;
                        let batch = st.detach(
                            batch_max,
                            self.config.reclaim_scan,
                            &mut detached,
                            &mut spare,
                        );
                        st.reclaim_reporting = !detached.is_empty() || !batch.finished.is_empty();
                        break batch;
                    }
                }
            }
            Stats::bump(&self.stats.reclaim_waits, 1);
            self.wait_until(|st| st.reclaim_owner.is_none());
        };
        let owned = Owned(self);
        let inside = crate::sync::InCallback::enter();

        let mut extents = Vec::new();
        let mut entries = 0;
        let leaves = detached.len() as u64;
        for leaf in detached.iter_mut() {
            entries += leaf.extents(&mut extents);
            leaf.reset(RegionId(0), 0);
        }
        if !extents.is_empty() {
            for (_, _, m) in batch.mirrors.iter() {
                m.reclaimed(&extents);
            }
        }
        for &(region, below) in &batch.finished {
            for (_, _, m) in batch.mirrors.iter() {
                m.generation_reclaimed(region, below);
            }
        }
        drop(inside);
        owned.release(&mut detached);
        // Freed outside the lock.
        drop(detached);
        drop(batch.dead_dirs);
        if leaves > 0 || !batch.finished.is_empty() {
            Stats::bump(&self.stats.reclaim_batches, 1);
            Stats::bump(&self.stats.leaves_reclaimed, leaves);
            Stats::bump(&self.stats.entries_reclaimed, entries);
        }
        Ok(ReclaimProgress {
            leaves,
            entries,
            more: batch.more,
        })
    }

    /// Run `reclaim_step` until nothing reclaimable is left (tests and
    /// benchmarks; the background thread does this on its own). Returns at
    /// once from inside a reclaim callback, and leaves regions alone whose
    /// teardown is still in flight.
    pub fn reclaim_all(&self) -> ReclaimProgress {
        let mut total = ReclaimProgress::default();
        loop {
            let Ok(p) = self.step() else {
                total.more = self.reclaim_pending();
                return total;
            };
            total.leaves += p.leaves;
            total.entries += p.entries;
            if !p.more {
                return total;
            }
        }
    }

    /// Whether obsolete state is still waiting for the reclaimer, or a
    /// step has taken some and not yet told the mirrors (`reclaimed`,
    /// `generation_reclaimed`) and freed it. `false` means every
    /// translation made obsolete so far has reached every mirror and the
    /// statistics count it (test `tests/reclaim_order.rs`
    /// `reclaim_is_pending_until_the_mirrors_are_told`).
    pub fn reclaim_pending(&self) -> bool {
        let st = self.lock(Hold::Other);
        st.reclaim_reporting
            || !st.obsolete.is_empty()
            || (0..st.regions.len()).any(|ri| st.reclaim_due(ri))
    }
}

impl Drop for Mmu {
    fn drop(&mut self) {
        {
            let mut stop = self.reclaim.stop.lock().unwrap_or_else(|e| e.into_inner());
            *stop = true;
            self.reclaim.cv.notify_one();
        }
        let handle = self
            .reclaimer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            // The reclaimer may itself hold the last reference.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

pub(super) fn reclaimer_thread(mmu: Weak<Mmu>, signal: Arc<ReclaimSignal>) {
    let stopped = || *signal.stop.lock().unwrap_or_else(|e| e.into_inner());
    let mut poll = RECLAIM_POLL_MIN;
    loop {
        {
            let stop = signal.stop.lock().unwrap_or_else(|e| e.into_inner());
            let (stop, _) = signal
                .cv
                .wait_timeout_while(stop, poll, |stop| !*stop)
                .unwrap_or_else(|e| e.into_inner());
            if *stop {
                return;
            }
        }
        let Some(mmu) = mmu.upgrade() else { return };
        // Load before swapping: an idle poll then only reads the flag's
        // line, leaving it shared with the teardown that reads beside it.
        if !mmu.reclaim_kicked.load(Ordering::Relaxed)
            || !mmu.reclaim_kicked.swap(false, Ordering::Acquire)
        {
            poll = (poll * 2).min(RECLAIM_POLL_MAX);
            continue;
        }
        poll = RECLAIM_POLL_MIN;
        while mmu.reclaim_step().more {
            if stopped() {
                return;
            }
            // Let faulting threads at the lock between batches.
            std::thread::yield_now();
        }
    }
}
