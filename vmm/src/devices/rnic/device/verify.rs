//! Checking what guest RDMA WRITEs left on the peer: each WRITE is
//! remembered when posted and checked once the RNIC retired it (in order,
//! signaled or not), so the device holds at most what its rings bound.

use super::{QpCtx, RnicDevice};
use std::sync::atomic::Ordering;

/// An RDMA WRITE posted to the RNIC, to check on the host once it retires.
pub(super) struct Posted {
    /// Its place in the QP's send queue (0-based, in posting order).
    pub(super) seq: u64,
    pub(super) remote: u64,
    pub(super) len: u64,
}

impl RnicDevice {
    /// Check and forget the WRITEs the RNIC finished (in order, signaled or
    /// not): O(1) per WRITE. After an error nothing is checked: what a
    /// failed or flushed WRITE left behind is not the guest's to vouch for.
    pub(super) fn retire_writes(&self, q: &mut QpCtx) {
        let Some(qp) = q.qp.as_ref() else {
            q.writes.clear();
            return;
        };
        if qp.in_error() {
            q.writes.clear();
            return;
        }
        let retired = qp.send_retired();
        while q.writes.front().is_some_and(|p| p.seq < retired) {
            let p = q.writes.pop_front().expect("checked");
            self.verify_write(&p);
        }
    }

    /// Check the host-peer pages an RDMA WRITE landed in: each must be
    /// zero (the guest discarded it) or carry the stamp of this position
    /// with an iteration no older than the last one seen there.
    fn verify_write(&self, p: &Posted) {
        let guest = self.guest_peer.read();
        let (base, len) = match guest.as_ref() {
            Some(g) => (g.base, g.len),
            None => (self.window.base, self.window.len),
        };
        let Some(off) = p.remote.checked_sub(base) else {
            return;
        };
        if off.saturating_add(p.len) > len / 2 {
            return; // outside the write half: nothing of ours to check
        }
        let first = off.div_ceil(mmu::PAGE_SIZE);
        let last = off.saturating_add(p.len) / mmu::PAGE_SIZE;
        for page in first..last {
            let at = base + page * mmu::PAGE_SIZE;
            let v = match guest.as_ref() {
                Some(g) => {
                    let mut b = [0u8; 8];
                    if g.mem.read(at, &mut b).is_err() {
                        continue;
                    }
                    u64::from_le_bytes(b)
                }
                // SAFETY: the page lies inside the peer's live host buffer.
                None => unsafe { std::ptr::read_volatile(at as *const u64) },
            };
            self.stats.pages_verified.fetch_add(1, Ordering::Relaxed);
            if v == 0 {
                self.stats.pages_zero.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (iter, place) = (v >> 32, v & 0xffff_ffff);
            let Some(seen) = self.seen.get(page as usize) else {
                continue;
            };
            let prev = seen.fetch_max(iter, Ordering::Relaxed);
            if place != page || iter < prev {
                self.stats.stale_accesses.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.bytes_written.fetch_add(p.len, Ordering::Relaxed);
    }
}
