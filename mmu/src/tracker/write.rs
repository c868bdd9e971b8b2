//! Table edits under the mmu lock: writing one translation, zapping a range
//! in bounded batches. Neither allocates (leaves come from the free list)
//! nor calls out.

use super::*;

impl State {
    /// Write one translation. `Err(())` means a fresh leaf is needed and
    /// the free list is empty: drop the lock, allocate, come back.
    pub(super) fn install_one(&mut self, ri: usize, tr: &Translation) -> Result<(), ()> {
        let region = &mut self.regions[ri];
        let si = region.slot_index(tr.gpa);
        let gen = region.valid_gen;
        if region.dir[si].current(gen).is_none() {
            let mut leaf = self.free.pop().ok_or(())?;
            leaf.reset(region.id, region.slot_gpa(si));
            let slot = &mut region.dir[si];
            slot.gen = gen;
            if let Some(old) = slot.leaf.replace(leaf) {
                self.obsolete.push(old);
                region.on_obsolete_list += 1;
            }
        }
        let leaf = region.dir[si]
            .current_mut(gen)
            .expect("slot was just filled");
        let entry = Entry::new(tr.hva, tr.writable);
        match tr.size {
            PageSize::Small => {
                if leaf.huge {
                    split_huge(leaf);
                }
                let i = leaf_index(tr.gpa);
                if !leaf.entries[i].present() {
                    region.live += 1;
                }
                leaf.set(i, entry);
            }
            PageSize::Huge if leaf.present == 0 || leaf.huge => {
                if leaf.present == 0 {
                    region.live += ENTRIES_PER_LEAF as u64;
                }
                leaf.huge = true;
                leaf.set(0, entry);
            }
            PageSize::Huge => {
                // Some 4 KiB entries of this 2 MiB exist: keep the leaf in
                // 4 KiB form and fill all of it.
                for i in 0..ENTRIES_PER_LEAF {
                    if !leaf.entries[i].present() {
                        region.live += 1;
                    }
                    leaf.set(i, Entry::new(tr.hva + i as u64 * PAGE_SIZE, tr.writable));
                }
            }
        }
        Ok(())
    }

    /// Zap current entries in `[pos, end)`, examining at most about
    /// `budget` entries. Returns where to continue and entries zapped.
    pub(super) fn zap(
        &mut self,
        mut pos: u64,
        end: u64,
        mut budget: usize,
        spare: &mut Option<Box<Leaf>>,
    ) -> (u64, u64) {
        let mut zapped = 0;
        while pos < end && budget > 0 {
            let Some(ri) = self
                .regions
                .iter()
                .position(|r| !r.removed && r.gpa <= pos && pos < r.end())
            else {
                // A hole (a region was removed meanwhile): skip to the next one.
                pos = self
                    .regions
                    .iter()
                    .filter(|r| !r.removed && r.gpa > pos)
                    .map(|r| r.gpa)
                    .min()
                    .unwrap_or(end)
                    .min(end);
                continue;
            };
            let region = &mut self.regions[ri];
            let si = region.slot_index(pos);
            let slot_start = region.slot_gpa(si);
            let zend = end.min(region.end()).min(slot_start + HUGE_PAGE_SIZE);
            let gen = region.valid_gen;
            match region.dir[si].current_mut(gen) {
                Some(leaf) => {
                    if leaf.huge {
                        if pos <= slot_start && zend >= slot_start + HUGE_PAGE_SIZE {
                            let leaf = region.dir[si].leaf.take().expect("checked above");
                            region.live -= ENTRIES_PER_LEAF as u64;
                            zapped += ENTRIES_PER_LEAF as u64;
                            if self.free.len() < FREE_LEAVES_MAX {
                                self.free.push(leaf);
                            } else {
                                // Freed by the caller once the lock is dropped.
                                *spare = Some(leaf);
                                budget = 0;
                            }
                            budget = budget.saturating_sub(ENTRIES_PER_LEAF);
                            pos = zend;
                            continue;
                        }
                        // Part of a huge entry goes: keep the rest as 4 KiB entries.
                        split_huge(leaf);
                    }
                    let mut page = pos;
                    while page < zend {
                        let i = leaf_index(page);
                        if leaf.entries[i].present() {
                            leaf.set(i, Entry::EMPTY);
                            region.live -= 1;
                            zapped += 1;
                        }
                        page += PAGE_SIZE;
                    }
                    budget = budget.saturating_sub(((zend - pos) / PAGE_SIZE) as usize);
                }
                None => budget = budget.saturating_sub(1),
            }
            pos = zend;
        }
        (pos, zapped)
    }
}

fn split_huge(leaf: &mut Leaf) {
    let e = leaf.entries[0];
    leaf.huge = false;
    leaf.present = 0;
    leaf.entries[0] = Entry::EMPTY;
    if e.present() {
        for i in 0..ENTRIES_PER_LEAF {
            leaf.set(i, Entry::new(e.hva() + i as u64 * PAGE_SIZE, e.writable()));
        }
    }
}
