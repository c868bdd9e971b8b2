//! Memory regions: keys, bounds, access rights, the device page table, and
//! the ODP MR as an mmu mirror.

use super::{Command, Completion, Shared};
use crate::space::AddressSpace;
use crate::verbs::Access;
use mmu::{Invalidation, InvalidationKind, Mirror, MirrorId, Scope, PAGE_SIZE};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

/// MR lifecycle as the device sees it.
pub(crate) const LIVE: u8 = 0;
/// Did not confirm an invalidation in time: every access fails until the
/// device answers again and the MR is re-registered (`Command::Recover`).
pub(crate) const FENCED: u8 = 1;
/// Deregistered.
pub(crate) const DEAD: u8 = 2;

pub(crate) use super::page_table::PageTable;

pub(crate) struct MrState {
    pub(crate) key: u32,
    pub(crate) pd: u32,
    pub(crate) iova: u64,
    /// Bytes; `u64::MAX - iova` for an implicit ODP MR.
    pub(crate) len: u64,
    pub(crate) access: Access,
    pub(crate) odp: bool,
    pub(crate) implicit: bool,
    pub(crate) space: Arc<AddressSpace>,
    /// The device's update lock: installs (after `read_retry`) and zaps
    /// both happen under it.
    pub(crate) table: Mutex<PageTable>,
    pub(crate) state: AtomicU8,
    pub(crate) mirror: Mutex<Option<MirrorId>>,
    /// Host ranges `mlock`ed for a pinned MR.
    pub(crate) pinned: Mutex<Vec<(u64, u64)>>,
}

impl MrState {
    pub(crate) fn end(&self) -> u64 {
        self.iova.saturating_add(self.len)
    }

    pub(crate) fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.iova && addr.checked_add(len).is_some_and(|e| e <= self.end())
    }

    pub(crate) fn live(&self) -> bool {
        self.state.load(Ordering::Acquire) == LIVE
    }

    /// Fenced (an invalidation went unconfirmed): it comes back, with an
    /// empty table, once the device answers again.
    pub(crate) fn fenced(&self) -> bool {
        self.state.load(Ordering::Acquire) == FENCED
    }

    /// Host address of the page containing `iova`, if mapped.
    pub(crate) fn lookup(&self, iova: u64) -> Option<u64> {
        let page = iova & !(PAGE_SIZE - 1);
        self.table.lock().get(page)
    }

    /// Zap `[start, end)` (device side of an invalidation).
    pub(crate) fn zap(&self, start: u64, end: u64) -> u64 {
        let mut t = self.table.lock();
        t.zap(start, end)
    }

    /// O(1) teardown: swap the table for an empty one. The old table's
    /// leaves go to the pool (`page_table.rs`): pointer moves, outside the
    /// table lock, and nothing handed back to the kernel (bench: `odpvm
    /// bench teardown --mirrors rnic`).
    pub(crate) fn zap_all(&self) -> u64 {
        let old = std::mem::take(&mut *self.table.lock());
        let n = old.len();
        drop(old);
        n
    }
}

/// An ODP MR's subscription to its address space's invalidations.
pub(crate) struct MrMirror {
    pub(crate) mr: Arc<MrState>,
    pub(crate) shared: Weak<Shared>,
    name: String,
    pending: Mutex<HashMap<u64, Arc<Completion>>>,
}

impl MrMirror {
    pub(crate) fn new(mr: Arc<MrState>, shared: Weak<Shared>) -> Self {
        MrMirror {
            name: format!("rnic-mr-{:#x}", mr.key),
            mr,
            shared,
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn affects(&self, inv: &Invalidation) -> Option<Command> {
        let mr = self.mr.clone();
        match inv.kind {
            InvalidationKind::Range { gpa, len } => {
                let (s, e) = (gpa.max(mr.iova), gpa.saturating_add(len).min(mr.end()));
                (s < e).then(|| Command::Invalidate {
                    mr,
                    start: s,
                    end: e,
                    done: Arc::new(Completion::new()),
                })
            }
            InvalidationKind::Generation { scope, .. } => {
                let hit = match scope {
                    Scope::All => true,
                    Scope::Region(id) => self
                        .mr
                        .space
                        .mmu
                        .regions()
                        .iter()
                        .any(|r| r.id == id && r.gpa < mr.end() && mr.iova < r.gpa + r.size),
                };
                hit.then(|| Command::Generation {
                    mr,
                    done: Arc::new(Completion::new()),
                })
            }
        }
    }
}

impl Mirror for MrMirror {
    fn name(&self) -> &str {
        &self.name
    }

    /// Post the invalidation to the device's command queue and ring it.
    fn invalidate_start(&self, inv: &Invalidation) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        if !self.mr.live() {
            return; // fenced or dead: nothing maps through it any more
        }
        match self.affects(inv) {
            Some(cmd) => {
                let done = cmd.completion().expect("invalidations complete").clone();
                self.pending.lock().insert(inv.id, done);
                shared.post(cmd);
            }
            None => {
                shared
                    .stats
                    .invalidations_skipped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Wait for the device's confirmation; fence the MR if it does not
    /// come within the bound.
    fn invalidate_wait(&self, inv: &Invalidation) {
        let Some(done) = self.pending.lock().remove(&inv.id) else {
            return;
        };
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let deadline = Instant::now() + shared.config.fence_timeout;
        if done.wait(shared.config.poll, deadline) {
            shared
                .stats
                .invalidate_rtt_ns
                .record(done.posted.elapsed().as_nanos() as u64);
            return;
        }
        // The device copies a page only while holding this lock and after
        // checking the MR is live under it (`engine.rs`, `copy_page`):
        // taking it waits for a copy in progress, and once FENCED is set
        // under it no copy through this MR can start. So when this returns
        // nothing the device does lands in (or reads) the invalidated pages.
        let mut table = self.mr.table.lock();
        if self
            .mr
            .state
            .compare_exchange(LIVE, FENCED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return; // already fenced (or dead) by someone else
        }
        let dropped = std::mem::take(&mut *table);
        drop(table);
        drop(dropped);
        shared.stats.fenced_mrs.fetch_add(1, Ordering::Relaxed);
        log::error!(
            "rnic {}: MR {:#x} did not confirm invalidation {} within {:?}; fenced until the device answers again",
            shared.config.name,
            self.mr.key,
            inv.id,
            shared.config.fence_timeout
        );
        // Queued behind the invalidation the device missed: the device
        // reaches it only once it answers commands again.
        shared.post(Command::Recover {
            mr: self.mr.clone(),
        });
    }
}
