//! How RoCE traffic touches memory: through the local RNIC's memory regions
//! and their device page tables, a page at a time, each page copied while
//! holding the MR's update lock.
//!
//! Holding that lock is what keeps invalidations stale-free: the device
//! thread zaps an MR's pages under the same lock (`MrState::zap`,
//! `zap_all`), so once an invalidation is confirmed no copy through the
//! zapped pages is running or can start (the next lookup misses).
//! Proven by `tests/roce.rs::invalidations_under_incoming_writes_leave_nothing_stale`.
//!
//! A page the table does not map is a device page fault: it is queued to
//! the RNIC's page-fault thread (which resolves it through the mmu) and the
//! caller backs off — a responder answers with an RNR NAK. So does an MR
//! the RNIC fenced (its device thread missed an invalidation's deadline,
//! e.g. starved on a loaded host): it is re-registered once the device
//! answers, so that is "not ready", not an access error
//! (`tests/roce.rs::a_fenced_mr_on_the_responder_answers_rnr_until_it_recovers`).

use crate::emulated::mr::MrState;
use crate::emulated::{FaultRequest, Shared};
use crate::verbs::{Access, Sge};
use mmu::PAGE_SIZE;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A checked piece of a buffer: `len` bytes at `addr` of `mr`.
#[derive(Clone)]
pub(crate) struct Seg {
    pub(crate) mr: Arc<MrState>,
    pub(crate) addr: u64,
    pub(crate) len: u64,
}

/// Why an access did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    /// The page at this iova is not mapped: fault it in and retry.
    Page { key: u32, iova: u64 },
    /// The MR is fenced: retry once the device answers again.
    Fenced,
    /// The MR is deregistered.
    Dead,
}

/// Why a key or buffer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Bad key, domain, rights or bounds.
    Access,
    /// Valid, but its MR is fenced for now.
    Fenced,
}

fn not_live(mr: &MrState) -> Miss {
    if mr.fenced() {
        Miss::Fenced
    } else {
        Miss::Dead
    }
}

/// Validate an SGE list against `pd`'s MRs (`write`: needs LOCAL_WRITE).
/// Returns the segments and their total length.
pub(crate) fn local_segs(
    shared: &Shared,
    pd: u32,
    sges: &[Sge],
    write: bool,
) -> Result<(Vec<Seg>, u64), Refused> {
    let mrs = shared.mrs.read();
    let mut out = Vec::with_capacity(sges.len());
    let mut total = 0u64;
    let mut fenced = false;
    for s in sges {
        let len = u64::from(s.length);
        let mr = mrs.get(&s.lkey).ok_or(Refused::Access)?;
        if mr.pd != pd || (write && !mr.access.contains(Access::LOCAL_WRITE)) {
            return Err(Refused::Access);
        }
        if !mr.contains(s.addr, len) {
            return Err(Refused::Access);
        }
        if !mr.live() {
            if !mr.fenced() {
                return Err(Refused::Access);
            }
            fenced = true;
        }
        total += len;
        if len > 0 {
            out.push(Seg {
                mr: mr.clone(),
                addr: s.addr,
                len,
            });
        }
    }
    if fenced {
        return Err(Refused::Fenced);
    }
    Ok((out, total))
}

/// The MR `rkey` names, if `pd` owns it, it grants `need`, it is live and
/// `[va, va + len)` lies inside it and inside memory the address space
/// backs (an implicit MR covers everything, but only backed pages can
/// fault in).
pub(crate) fn remote_mr(
    shared: &Shared,
    pd: u32,
    rkey: u32,
    va: u64,
    len: u64,
    need: Access,
) -> Result<Arc<MrState>, Refused> {
    let mr = shared.mrs.read().get(&rkey).ok_or(Refused::Access)?.clone();
    if mr.pd != pd || !mr.access.contains(need) || !mr.contains(va, len) {
        return Err(Refused::Access);
    }
    if len > 0 && !backed(&mr, va, len) {
        return Err(Refused::Access);
    }
    if !mr.live() {
        return Err(match not_live(&mr) {
            Miss::Fenced => Refused::Fenced,
            _ => Refused::Access,
        });
    }
    Ok(mr)
}

/// Whether every byte of `[va, va + len)` lies in a region of the MR's
/// address space.
fn backed(mr: &MrState, va: u64, len: u64) -> bool {
    let regions = mr.space.mmu.regions();
    let end = va.saturating_add(len);
    let mut pos = va;
    while pos < end {
        match regions
            .iter()
            .find(|r| r.gpa <= pos && pos < r.gpa + r.size)
        {
            Some(r) => pos = r.gpa + r.size,
            None => return false,
        }
    }
    true
}

/// Copy `data` to `iova..` of `mr`, or report the first page that is not
/// mapped (pages before it are written; a retry rewrites them).
pub(crate) fn write(mr: &MrState, iova: u64, data: &[u8]) -> Result<(), Miss> {
    let mut done = 0usize;
    while done < data.len() {
        let at = iova + done as u64;
        let n = (data.len() - done).min((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize);
        let table = mr.table.lock();
        if !mr.live() {
            return Err(not_live(mr));
        }
        let Some(page) = table.get(at & !(PAGE_SIZE - 1)) else {
            return Err(Miss::Page {
                key: mr.key,
                iova: at,
            });
        };
        let dst = page + (at & (PAGE_SIZE - 1));
        // SAFETY: `page` is a host page the mmu translated for this MR and
        // it stays mapped while the table maps it; the table lock is held,
        // so no invalidation can zap it during the copy. `n` stays within
        // the page; `data` is a separate Rust buffer (no overlap).
        unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), dst as *mut u8, n) };
        drop(table);
        done += n;
    }
    Ok(())
}

/// Copy `out.len()` bytes from `iova..` of `mr` into `out`.
pub(crate) fn read(mr: &MrState, iova: u64, out: &mut [u8]) -> Result<(), Miss> {
    let mut done = 0usize;
    while done < out.len() {
        let at = iova + done as u64;
        let n = (out.len() - done).min((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize);
        let table = mr.table.lock();
        if !mr.live() {
            return Err(not_live(mr));
        }
        let Some(page) = table.get(at & !(PAGE_SIZE - 1)) else {
            return Err(Miss::Page {
                key: mr.key,
                iova: at,
            });
        };
        let src = page + (at & (PAGE_SIZE - 1));
        // SAFETY: as in `write`: a mapped page of the MR, held mapped by
        // the table lock; `n` stays within it; `out` is a Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, out[done..].as_mut_ptr(), n) };
        drop(table);
        done += n;
    }
    Ok(())
}

/// The first unmapped page of `[va, va + len)` of `mr`, if any.
pub(crate) fn first_missing(mr: &MrState, va: u64, len: u64) -> Result<Option<u64>, Miss> {
    if len == 0 {
        return Ok(None);
    }
    let table = mr.table.lock();
    if !mr.live() {
        return Err(not_live(mr));
    }
    let mut p = va & !(PAGE_SIZE - 1);
    while p < va + len {
        if !table.contains(p) {
            return Ok(Some(p.max(va)));
        }
        p += PAGE_SIZE;
    }
    Ok(None)
}

/// Scatter `data` into `segs` starting at byte `offset` of the list.
pub(crate) fn scatter(segs: &[Seg], offset: u64, data: &[u8]) -> Result<(), Miss> {
    let mut skip = offset;
    let mut done = 0usize;
    for s in segs {
        if done == data.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = ((s.len - skip) as usize).min(data.len() - done);
        write(&s.mr, s.addr + skip, &data[done..done + n])?;
        done += n;
        skip = 0;
    }
    Ok(())
}

/// Gather `out.len()` bytes from `segs` starting at byte `offset`.
pub(crate) fn gather(segs: &[Seg], offset: u64, out: &mut [u8]) -> Result<(), Miss> {
    let mut skip = offset;
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = ((s.len - skip) as usize).min(out.len() - done);
        read(&s.mr, s.addr + skip, &mut out[done..done + n])?;
        done += n;
        skip = 0;
    }
    Ok(())
}

/// The first unmapped page of a whole segment list (to fault in before a
/// request goes out).
pub(crate) fn segs_missing(segs: &[Seg]) -> Result<Option<(Arc<MrState>, u64, u64)>, Miss> {
    for s in segs {
        if let Some(iova) = first_missing(&s.mr, s.addr, s.len)? {
            return Ok(Some((s.mr.clone(), iova, s.addr + s.len)));
        }
    }
    Ok(None)
}

/// Device page faults this port queued and not yet seen resolved, so one
/// missing page is not queued once per retransmission.
pub(crate) struct Faults {
    pending: HashMap<(u32, u64), Instant>,
    /// A fault not resolved in this long is queued again.
    requeue_after: Duration,
}

impl Faults {
    pub(crate) fn new() -> Faults {
        Faults {
            pending: HashMap::new(),
            requeue_after: Duration::from_millis(5),
        }
    }

    /// Queue a fault for the page holding `iova` and what follows it up to
    /// `end` (fault-around, bounded by the RNIC's `max_fault_pages`).
    /// Returns true if a new fault was queued.
    pub(crate) fn request(
        &mut self,
        shared: &Shared,
        mr: &Arc<MrState>,
        iova: u64,
        end: u64,
        write: bool,
    ) -> bool {
        let page = iova & !(PAGE_SIZE - 1);
        let now = Instant::now();
        if self.pending.len() > 4096 {
            self.pending
                .retain(|_, t| now.duration_since(*t) < self.requeue_after);
        }
        if let Some(t) = self.pending.get(&(mr.key, page)) {
            if now.duration_since(*t) < self.requeue_after {
                return false;
            }
        }
        self.pending.insert((mr.key, page), now);
        // `iova` and `end` come from the wire: near the top of the space
        // the arithmetic saturates instead of wrapping (the fault still
        // covers at least this page; the mmu refuses what is not RAM).
        let limit = page.saturating_add(
            shared
                .config
                .max_fault_pages
                .max(1)
                .saturating_mul(PAGE_SIZE),
        );
        let fault_end = end
            .checked_next_multiple_of(PAGE_SIZE)
            .unwrap_or(!(PAGE_SIZE - 1))
            .min(limit)
            .max(page.saturating_add(PAGE_SIZE));
        shared
            .stats
            .device_faults
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        shared.queue_fault(FaultRequest {
            mr: mr.clone(),
            start: page,
            end: fault_end,
            write,
        });
        true
    }
}
