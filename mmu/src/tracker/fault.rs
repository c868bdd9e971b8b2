//! The fault side of the protocol: tickets (`read_begin`), `read_retry`,
//! `translate`, `install`, and `fault_in` which runs them in a loop.

use super::*;

/// What `fault_in` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultOutcome {
    pub installed: usize,
    /// Times the install raced with an invalidation and started over.
    pub retries: u32,
}

impl Mmu {
    /// Start resolving a fault on `[gpa, gpa + len)` (page aligned, inside
    /// one region). Sleeps while an invalidation of an overlapping range is
    /// running. The ticket is then good until an overlapping invalidation
    /// starts. `Err(Reentrant)` inside a mirror callback (use
    /// `try_read_begin` there).
    pub fn read_begin(&self, gpa: u64, len: u64) -> Result<Ticket, Error> {
        not_in_callback("read_begin")?;
        loop {
            match self.try_read_begin(gpa, len) {
                Err(Error::Busy { .. }) => {}
                other => return other,
            }
            Stats::bump(&self.stats.read_begin_waits, 1);
            let end = check_range(gpa, len)?;
            if self
                .lock(Hold::Fault)
                .seq
                .active_overlapping_on(gpa, end, thread_token())
            {
                // Waiting would wait for this thread's own invalidation.
                return Err(Error::Reentrant("read_begin"));
            }
            self.wait_until(|st| st.seq.active_overlapping(gpa, end).is_none());
        }
    }

    /// `read_begin` that never sleeps: `Err(Busy)` while an overlapping
    /// invalidation runs (`teardown` says whether it is a teardown).
    pub fn try_read_begin(&self, gpa: u64, len: u64) -> Result<Ticket, Error> {
        let end = check_range(gpa, len)?;
        let st = self.lock(Hold::Fault);
        let ri = st.region_index(gpa, len)?;
        if let Some(s) = st.seq.active_overlapping(gpa, end) {
            return Err(Error::Busy {
                gpa: s.gpa,
                end: s.end,
                teardown: s.teardown,
            });
        }
        let r = &st.regions[ri];
        Ok(Ticket {
            mmu: self.instance,
            seq: st.seq.current(),
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
            // Host pages past the limit would make the reclaimer's extents
            // (and a `Backing` mirror's release) wrap around 2^64.
            below_limit("host", tr.hva, size)?;
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
        not_in_callback("fault_in")?;
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
