//! Device page faults of the engine: a WQE that touches a page its MR does
//! not map yet is parked while the page-fault thread resolves it through
//! the mmu; a fenced MR is recovered once its mirror answers again.

use super::*;
impl Engine {
    /// Re-register a fenced MR: the device has answered every command
    /// queued before this one, including the invalidation it missed. Its
    /// table starts empty (it was emptied by the fence, and nothing can be
    /// installed while fenced); faults refill it through the mmu protocol,
    /// whose `read_retry` catches any invalidation that went by meanwhile.
    pub(super) fn recover(&mut self, mr: &MrState) {
        let mut table = mr.table.lock();
        let emptied = std::mem::take(&mut *table);
        if mr
            .state
            .compare_exchange(
                super::super::mr::FENCED,
                super::super::mr::LIVE,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return; // deregistered meanwhile
        }
        drop(table);
        drop(emptied);
        let n = self
            .shared
            .stats
            .mr_recoveries
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        log::warn!(
            "rnic {}: MR {:#x} answered again; re-registered ({n} recoveries so far)",
            self.shared.config.name,
            mr.key
        );
    }

    pub(super) fn fault_done(&mut self, key: u32, start: u64, end: u64, ok: bool) {
        self.inflight.retain(|f| *f != (key, start, end));
        for i in 0..self.runs.len() {
            if let Wait::Fault { mr, page, remote } = self.runs[i].wait {
                if mr == key && page >= start && page < end {
                    self.runs[i].wait = Wait::None;
                    if !ok {
                        let status = if remote {
                            WcStatus::RemAccessErr
                        } else {
                            WcStatus::LocProtErr
                        };
                        self.fail(i, status);
                    }
                }
            }
        }
    }

    /// Queue a device fault for `seg` at `iova` unless one covering it is
    /// already in flight; stall run `i` on it. The WQE fails instead if
    /// the page cannot be named as a range (the last page of the address
    /// space, which no memory region can back).
    pub(super) fn fault(
        &mut self,
        i: usize,
        seg_mr: &Arc<MrState>,
        seg_end: u64,
        iova: u64,
        write: bool,
        remote: bool,
    ) {
        let page = iova & !(PAGE_SIZE - 1);
        let Some(page_after) = page.checked_add(PAGE_SIZE) else {
            let status = if remote {
                WcStatus::RemAccessErr
            } else {
                WcStatus::LocProtErr
            };
            return self.fail(i, status);
        };
        let key = seg_mr.key;
        if !self
            .inflight
            .iter()
            .any(|&(k, s, e)| k == key && page >= s && page < e)
        {
            let limit =
                page.saturating_add(self.shared.config.max_fault_pages.saturating_mul(PAGE_SIZE));
            // A segment ending in the last page rounds down instead of
            // wrapping: the fault covers at least this page either way.
            let seg_end = seg_end
                .checked_next_multiple_of(PAGE_SIZE)
                .unwrap_or(!(PAGE_SIZE - 1));
            let end = seg_end.min(limit).max(page_after);
            self.inflight.push((key, page, end));
            self.shared
                .stats
                .device_faults
                .fetch_add(1, Ordering::Relaxed);
            self.shared.queue_fault(FaultRequest {
                mr: seg_mr.clone(),
                start: page,
                end,
                write,
            });
        }
        self.runs[i].wait = Wait::Fault {
            mr: key,
            page,
            remote,
        };
    }
}
