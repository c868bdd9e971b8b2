//! Regions: adding one (checked before anything is allocated), removing
//! one (a teardown of it, then its slot is freed once drained), listing
//! them, moving one's host address, and what they map.

use super::*;
impl Mmu {
    /// Register a region. Called any time. Sleeps only when removed
    /// regions awaiting the reclaimer fill the region table: it then runs
    /// reclaim steps itself (which may wait for another thread's step)
    /// until an entry is free — except inside a mirror callback, where it
    /// reports the full table. Errors on
    /// misalignment, overflow, a size above [`MAX_REGION_SIZE`], overlap
    /// with an existing region, a full region table
    /// ([`Error::TooManyRegions`]; removed regions hold their entry until
    /// the reclaimer freed their table) or a directory that cannot be
    /// allocated ([`Error::NoMemory`]). Every check that needs no memory
    /// runs before the directory is allocated (outside the lock).
    pub fn add_region(&self, spec: RegionSpec) -> Result<RegionId, Error> {
        let end = check_range(spec.gpa, spec.size)?;
        below_limit("guest-physical", spec.gpa, spec.size)?;
        aligned("host address", spec.hva, PAGE_SIZE)?;
        below_limit("host", spec.hva, spec.size)?;
        if spec.size > MAX_REGION_SIZE {
            return Err(Error::RegionTooLarge {
                size: spec.size,
                max: MAX_REGION_SIZE,
            });
        }
        self.admit(&spec.name, spec.gpa, end)?;
        let mut table = RegionTable::try_new(
            RegionId(0),
            spec.name.into(),
            spec.gpa,
            spec.size,
            spec.hva,
            0,
        )
        .ok_or(Error::NoMemory {
            what: "region directory",
            bytes: (spec.size / HUGE_PAGE_SIZE + 2)
                * std::mem::size_of::<crate::table::Slot>() as u64,
        })?;
        let mut st = loop {
            // Again: another thread may have added a region meanwhile.
            let st = self.lock(Hold::Other);
            match st.admits(&table.name, spec.gpa, end) {
                Ok(()) => break st,
                Err(Error::TooManyRegions { removed, .. }) if removed > 0 => {
                    drop(st);
                    self.admit(&table.name, spec.gpa, end)?;
                }
                Err(e) => return Err(e),
            }
        };
        table.id = RegionId(st.next_region);
        st.next_region += 1;
        table.valid_gen = st.next_gen;
        table.reclaimed_below = st.next_gen;
        let id = table.id;
        st.regions.push(table);
        Ok(id)
    }

    /// `State::admits`; when only removed regions (awaiting the
    /// reclaimer) fill the table, first runs reclaim steps until one entry
    /// is free or nothing more can be reclaimed now (a teardown in flight),
    /// so remove/re-add cycles never fail for want of a reclaimer turn.
    fn admit(&self, name: &str, gpa: u64, end: u64) -> Result<(), Error> {
        // Bounds the help under a load that keeps the reclaimer busy with
        // other regions (removed ones go first, so this is rarely reached).
        for _ in 0..ADMIT_STEPS_MAX {
            match self.lock(Hold::Other).admits(name, gpa, end) {
                Err(Error::TooManyRegions { removed, .. }) if removed > 0 && !in_callback() => {}
                other => return other,
            }
            match self.step() {
                Ok(p) if p.more || p.leaves > 0 => {}
                // Nothing left to reclaim now: report the full table.
                _ => break,
            }
        }
        self.lock(Hold::Other).admits(name, gpa, end)
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
}
