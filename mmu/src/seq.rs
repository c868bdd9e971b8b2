//! The sequence log: which invalidations are in flight and which ended
//! recently, so `read_retry` can tell whether one collided with a ticket
//! (the "Sequence numbers" section of the crate documentation).
//!
//! Plain data with no locking of its own: the mmu keeps it under the mmu
//! lock. Fixed capacity (`MAX_ACTIVE` in flight, `LOG_LEN` ended), so no
//! operation allocates — they all run under a spinlock.

use crate::sync::ThreadToken;

/// Invalidations in flight at once; more wait for a free slot.
pub(crate) const MAX_ACTIVE: usize = 64;
/// Ended invalidations remembered for `read_retry`. A ticket older than
/// everything remembered is conservatively stale.
pub(crate) const LOG_LEN: usize = 64;

/// An invalidation or teardown in flight or recently ended.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Span {
    /// Sequence number it took; 0 marks an empty log slot.
    pub(crate) id: u64,
    pub(crate) gpa: u64,
    pub(crate) end: u64,
    pub(crate) teardown: bool,
    /// The thread running its mirror callbacks (the caller of `invalidate`
    /// or `teardown_*`), so a wait on it from that very thread is refused
    /// instead of hanging.
    pub(crate) thread: Option<ThreadToken>,
}

impl Span {
    pub(crate) fn overlaps(&self, gpa: u64, end: u64) -> bool {
        self.gpa < end && gpa < self.end
    }
}

/// `repr(C)`: the scalars first, then the in-flight slots (the first ones
/// are the hot ones), then the log.
#[repr(C)]
pub(crate) struct SeqLog {
    /// Sequence numbers handed out so far (one per invalidation/teardown).
    seq: u64,
    active_len: usize,
    log_next: usize,
    /// Largest id evicted from `log`.
    log_floor: u64,
    /// `active[..active_len]` are in flight. Inline, not a `Vec`: one
    /// allocation fewer to miss in cache on a cold teardown.
    active: [Span; MAX_ACTIVE],
    log: [Span; LOG_LEN],
}

impl SeqLog {
    pub(crate) fn new() -> Self {
        SeqLog {
            seq: 0,
            active: [Span::default(); MAX_ACTIVE],
            active_len: 0,
            log: [Span::default(); LOG_LEN],
            log_next: 0,
            log_floor: 0,
        }
    }

    fn in_flight(&self) -> &[Span] {
        &self.active[..self.active_len]
    }

    /// The last sequence number handed out: what a ticket taken now sees.
    pub(crate) fn current(&self) -> u64 {
        self.seq
    }

    /// Whether every in-flight slot is taken (`begin` must wait).
    pub(crate) fn full(&self) -> bool {
        self.active_len >= MAX_ACTIVE
    }

    /// An in-flight invalidation overlapping `[gpa, end)`, if any.
    pub(crate) fn active_overlapping(&self, gpa: u64, end: u64) -> Option<&Span> {
        self.in_flight().iter().find(|s| s.overlaps(gpa, end))
    }

    /// Whether a teardown overlapping `[gpa, end)` is in flight: its
    /// mirrors have not all confirmed yet.
    pub(crate) fn teardown_in_flight(&self, gpa: u64, end: u64) -> bool {
        self.in_flight()
            .iter()
            .any(|s| s.teardown && s.overlaps(gpa, end))
    }

    /// An in-flight invalidation that started at or before `id`, if any.
    pub(crate) fn active_up_to(&self, id: u64) -> Option<&Span> {
        self.in_flight().iter().find(|s| s.id <= id)
    }

    /// Whether `thread` is running an in-flight invalidation (so it is
    /// inside one of that invalidation's mirror callbacks).
    pub(crate) fn active_on(&self, thread: ThreadToken) -> bool {
        self.in_flight().iter().any(|s| s.thread == Some(thread))
    }

    /// Whether an in-flight invalidation overlapping `[gpa, end)` is run
    /// by `thread`.
    pub(crate) fn active_overlapping_on(&self, gpa: u64, end: u64, thread: ThreadToken) -> bool {
        self.in_flight()
            .iter()
            .any(|s| s.thread == Some(thread) && s.overlaps(gpa, end))
    }

    /// `read_retry` for a ticket that saw `seq` over `[gpa, end)`: has an
    /// overlapping invalidation started since? Never misses one; answers
    /// true spuriously only for tickets older than the log remembers.
    pub(crate) fn collides(&self, seq: u64, gpa: u64, end: u64) -> bool {
        if self.seq == seq {
            return false; // nothing started since: the common case
        }
        if self.log_floor > seq {
            return true; // forgotten invalidations might overlap
        }
        let newer = |s: &Span| s.id > seq && s.overlaps(gpa, end);
        self.in_flight().iter().any(newer) || self.log.iter().any(newer)
    }

    /// Start an invalidation of `[gpa, end)`; returns its id. The caller
    /// checked `!full()`.
    pub(crate) fn begin(
        &mut self,
        gpa: u64,
        end: u64,
        teardown: bool,
        thread: Option<ThreadToken>,
    ) -> u64 {
        debug_assert!(!self.full());
        self.seq += 1;
        let id = self.seq;
        self.active[self.active_len] = Span {
            id,
            gpa,
            end,
            teardown,
            thread,
        };
        self.active_len += 1;
        id
    }

    /// End invalidation `id` (which `begin` returned and nobody ended yet):
    /// it leaves the in-flight set and enters the log.
    /// The log slot the next `end` writes, for `prefetch`.
    pub(crate) fn next_log_slot(&self) -> *const Span {
        &self.log[self.log_next]
    }

    pub(crate) fn end(&mut self, id: u64) {
        let Some(i) = self.in_flight().iter().position(|s| s.id == id) else {
            debug_assert!(false, "ending an invalidation that is not active");
            return;
        };
        let span = self.active[i];
        self.active_len -= 1;
        self.active[i] = self.active[self.active_len];
        let evicted = std::mem::replace(&mut self.log[self.log_next], span);
        self.log_floor = self.log_floor.max(evicted.id);
        self.log_next = (self.log_next + 1) % LOG_LEN;
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const P: u64 = 4096;

    #[test]
    fn a_ticket_collides_only_with_newer_overlapping_invalidations() {
        let mut log = SeqLog::new();
        let old = log.begin(0, 10 * P, false, None);
        log.end(old);
        let seen = log.current();
        assert!(!log.collides(seen, 0, P), "nothing started since");
        let apart = log.begin(20 * P, 30 * P, false, None);
        assert!(!log.collides(seen, 0, 10 * P), "no overlap");
        assert!(log.collides(seen, 25 * P, 26 * P), "in flight, overlapping");
        log.end(apart);
        assert!(
            log.collides(seen, 29 * P, 31 * P),
            "ended, still remembered"
        );
        assert!(!log.collides(seen, 30 * P, 40 * P), "ends are exclusive");
        assert!(
            log.collides(old - 1, 0, P),
            "older tickets see the older span"
        );
    }

    #[test]
    fn in_flight_state_is_visible_until_end() {
        let mut log = SeqLog::new();
        let a = log.begin(0, 4 * P, true, None);
        let b = log.begin(8 * P, 12 * P, false, None);
        assert_eq!(log.active_overlapping(3 * P, 9 * P).map(|s| s.id), Some(a));
        assert!(log.teardown_in_flight(0, P));
        assert!(!log.teardown_in_flight(8 * P, 9 * P), "b is no teardown");
        assert_eq!(log.active_up_to(a).map(|s| s.id), Some(a));
        log.end(a);
        assert!(!log.teardown_in_flight(0, P));
        assert!(log.active_up_to(a).is_none());
        assert_eq!(log.active_up_to(b).map(|s| s.id), Some(b));
        log.end(b);
        assert!(log.active_overlapping(0, u64::MAX).is_none());
    }

    #[test]
    fn a_ticket_older_than_the_log_is_conservatively_stale() {
        let mut log = SeqLog::new();
        let seen = log.current();
        for _ in 0..LOG_LEN {
            let id = log.begin(100 * P, 101 * P, false, None);
            log.end(id);
        }
        assert!(!log.collides(seen, 0, P), "all remembered, none overlaps");
        let id = log.begin(100 * P, 101 * P, false, None);
        log.end(id);
        assert!(log.collides(seen, 0, P), "one forgotten: maybe overlapping");
        assert!(!log.collides(log.current(), 0, P));
    }

    #[test]
    fn slots_run_out_at_max_active_and_come_back() {
        let mut log = SeqLog::new();
        let ids: Vec<u64> = (0..MAX_ACTIVE)
            .map(|i| log.begin(i as u64 * P, (i as u64 + 1) * P, false, None))
            .collect();
        assert!(log.full());
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase");
        log.end(ids[7]);
        assert!(!log.full());
    }
}
