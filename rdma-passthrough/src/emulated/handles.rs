//! What a verbs user holds: protection domains, memory regions (with
//! `ibv_advise_mr`-style prefetch and their deregistration) and queue
//! pairs (posting work requests, checked before they reach the device).

use super::*;

/// A protection domain bound to one address space (a guest's memory, or a
/// process's).
#[derive(Clone)]
pub struct Pd {
    pub(crate) id: u32,
    pub(crate) space: Arc<AddressSpace>,
}

impl Pd {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The address space its memory regions translate in.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }
}

/// A registered memory region.
pub struct Mr {
    pub(super) state: Arc<MrState>,
    pub(super) shared: Weak<Shared>,
}

impl Mr {
    pub fn lkey(&self) -> u32 {
        self.state.key
    }

    pub fn rkey(&self) -> u32 {
        self.state.key
    }

    pub fn iova(&self) -> u64 {
        self.state.iova
    }

    pub fn len(&self) -> u64 {
        self.state.len
    }

    pub fn is_empty(&self) -> bool {
        self.state.len == 0
    }

    pub fn is_odp(&self) -> bool {
        self.state.odp
    }

    pub fn is_implicit(&self) -> bool {
        self.state.implicit
    }

    /// Fenced after an invalidation the device did not confirm in time.
    pub fn is_fenced(&self) -> bool {
        self.state.state.load(Ordering::Acquire) == mr::FENCED
    }

    /// Pages the device currently maps.
    pub fn mapped_pages(&self) -> usize {
        self.state.table.lock().len() as usize
    }

    /// Whether the device maps the page containing `iova`.
    pub fn maps(&self, iova: u64) -> bool {
        self.state.lookup(iova).is_some()
    }

    /// `ibv_advise_mr`: map `ranges` ahead of use. With
    /// `ADVISE_FLAG_FLUSH` it returns once they are mapped; otherwise the
    /// page-fault thread does it.
    pub fn advise(&self, advice: Advice, flags: u32, ranges: &[Sge]) -> Result<(), VerbsError> {
        let shared = self.shared.upgrade().ok_or(VerbsError::Shutdown)?;
        if !self.state.odp {
            return Err(VerbsError::Invalid("advise_mr needs an ODP MR".into()));
        }
        for sge in ranges {
            if sge.lkey != self.state.key {
                return Err(VerbsError::Invalid(format!(
                    "lkey {:#x} is not this MR",
                    sge.lkey
                )));
            }
            if !self.state.contains(sge.addr, u64::from(sge.length)) {
                return Err(VerbsError::Invalid(format!(
                    "[{:#x}, +{:#x}) is outside the MR",
                    sge.addr, sge.length
                )));
            }
        }
        shared.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        for sge in ranges {
            let start = sge.addr & !(mmu::PAGE_SIZE - 1);
            let end = page_end(sge.addr, u64::from(sge.length)).ok_or_else(|| {
                VerbsError::Invalid(format!("[{:#x}, +{:#x}) overflows", sge.addr, sge.length))
            })?;
            if flags & ADVISE_FLAG_FLUSH != 0 || advice == Advice::PrefetchNoFault {
                fault::map_range(
                    &shared,
                    &self.state,
                    start,
                    end,
                    advice == Advice::PrefetchWrite,
                    advice != Advice::PrefetchNoFault,
                )
                .map_err(|e| VerbsError::Memory(e.to_string()))?;
            } else {
                shared.queue_fault(FaultRequest {
                    mr: self.state.clone(),
                    start,
                    end,
                    write: advice == Advice::PrefetchWrite,
                });
            }
        }
        Ok(())
    }

    /// Deregister: stop invalidations reaching it, make the device drop
    /// it, unpin what was pinned.
    pub fn dereg(self) {
        // Drop does it.
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        if let Some(id) = self.state.mirror.lock().take() {
            let _ = self.state.space.mmu.unregister_mirror(id);
        }
        self.state.state.store(DEAD, Ordering::Release);
        if let Some(shared) = self.shared.upgrade() {
            shared.mrs.write().remove(&self.state.key);
            let done = Arc::new(Completion::new());
            shared.post(Command::Dereg {
                mr: self.state.key,
                done: done.clone(),
            });
            done.wait(shared.config.poll, Instant::now() + Duration::from_secs(5));
        }
        for (hva, len) in self.state.pinned.lock().drain(..) {
            // SAFETY: the range was mlocked by reg_mr and is still mapped
            // (the address space outlives its MRs).
            unsafe { libc_munlock(hva, len) };
        }
    }
}

/// The page boundary at or after `addr + len`; None if it is past the end
/// of the address space.
pub(crate) fn page_end(addr: u64, len: u64) -> Option<u64> {
    addr.checked_add(len)?
        .checked_next_multiple_of(mmu::PAGE_SIZE)
}

pub(super) fn libc_mlock(hva: u64, len: u64) -> bool {
    // SAFETY: mlock only changes residency of an existing mapping; a bad
    // range makes it fail with ENOMEM.
    unsafe { libc::mlock(hva as *const libc::c_void, len as usize) == 0 }
}

/// # Safety
/// The range must be a live mapping of this process.
unsafe fn libc_munlock(hva: u64, len: u64) {
    // SAFETY: the caller guarantees the range; munlock only changes
    // residency.
    unsafe {
        libc::munlock(hva as *const libc::c_void, len as usize);
    }
}

/// An RC queue pair.
pub struct Qp {
    pub(crate) state: Arc<QpState>,
    pub(super) shared: Weak<Shared>,
}

impl Qp {
    pub fn qpn(&self) -> u32 {
        self.state.qpn
    }

    pub fn in_error(&self) -> bool {
        self.state.error.load(Ordering::Acquire)
    }

    /// Send WQEs the device finished so far (completed, failed or
    /// flushed; signaled or not). RC runs the send queue in order, so the
    /// first `send_retired()` WQEs posted are done.
    pub fn send_retired(&self) -> u64 {
        self.state.send_retired.load(Ordering::Acquire)
    }

    fn check_sges(&self, sges: &[Sge]) -> Result<(), VerbsError> {
        if sges.len() > self.state.caps.max_sge {
            return Err(VerbsError::Invalid(format!(
                "{} SGEs, the QP allows {}",
                sges.len(),
                self.state.caps.max_sge
            )));
        }
        Ok(())
    }

    /// `ibv_post_send`. Queues the WR; the device executes it.
    pub fn post_send(&self, wr: SendWr) -> Result<(), VerbsError> {
        let shared = self.shared.upgrade().ok_or(VerbsError::Shutdown)?;
        self.check_sges(&wr.sges)?;
        {
            let mut sq = self.state.sq.lock();
            if sq.len() >= self.state.caps.max_send_wr {
                return Err(VerbsError::QueueFull);
            }
            sq.push_back(wr);
        }
        shared.ring();
        Ok(())
    }

    /// `ibv_post_recv`.
    pub fn post_recv(&self, wr: RecvWr) -> Result<(), VerbsError> {
        let shared = self.shared.upgrade().ok_or(VerbsError::Shutdown)?;
        self.check_sges(&wr.sges)?;
        {
            let mut rq = self.state.rq.lock();
            if rq.len() >= self.state.caps.max_recv_wr {
                return Err(VerbsError::QueueFull);
            }
            rq.push_back(wr);
        }
        shared.ring();
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        self.state.destroyed.store(true, Ordering::Release);
        if let Some(shared) = self.shared.upgrade() {
            shared.qps.write().remove(&self.state.qpn);
            shared.qp_epoch.fetch_add(1, Ordering::SeqCst);
            shared.ring();
        }
    }
}
