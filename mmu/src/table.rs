//! The translation table: per region, a directory of 2 MiB slots; a slot is
//! empty, one huge (2 MiB) entry, or a leaf of 512 4 KiB entries.
//!
//! A leaf is the analogue of a KVM shadow page: it records the generation of
//! its region when it was created and is obsolete, together with all its
//! entries, as soon as the region's generation moves on. No per-page heap
//! allocation: one 4 KiB leaf per 2 MiB of mapped guest memory.

use crate::types::{PageSize, RegionId, Translation, HUGE_PAGE_SIZE, PAGE_SIZE};

pub(crate) const ENTRIES_PER_LEAF: usize = (HUGE_PAGE_SIZE / PAGE_SIZE) as usize;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const ADDR_MASK: u64 = !(PAGE_SIZE - 1);

/// A packed table entry: host page address | flags. Zero means not present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry(u64);

impl Entry {
    pub(crate) const EMPTY: Entry = Entry(0);

    pub(crate) fn new(hva: u64, writable: bool) -> Self {
        debug_assert_eq!(hva & !ADDR_MASK, 0);
        Entry(hva | PRESENT | if writable { WRITABLE } else { 0 })
    }

    pub(crate) fn present(self) -> bool {
        self.0 & PRESENT != 0
    }

    pub(crate) fn hva(self) -> u64 {
        self.0 & ADDR_MASK
    }

    pub(crate) fn writable(self) -> bool {
        self.0 & WRITABLE != 0
    }
}

pub(crate) struct Leaf {
    pub(crate) region: RegionId,
    /// Guest-physical address of `entries[0]`.
    pub(crate) gpa: u64,
    pub(crate) present: u32,
    /// One 2 MiB entry in `entries[0]` instead of 512 4 KiB entries.
    pub(crate) huge: bool,
    /// Link for the obsolete and free lists (intrusive: pushing never
    /// allocates, so it can happen under the spinlock).
    next: Option<Box<Leaf>>,
    pub(crate) entries: [Entry; ENTRIES_PER_LEAF],
}

impl Leaf {
    pub(crate) fn boxed() -> Box<Leaf> {
        Box::new(Leaf {
            region: RegionId(0),
            gpa: 0,
            present: 0,
            huge: false,
            next: None,
            entries: [Entry::EMPTY; ENTRIES_PER_LEAF],
        })
    }

    pub(crate) fn reset(&mut self, region: RegionId, gpa: u64) {
        if self.present != 0 {
            self.entries.fill(Entry::EMPTY);
        }
        self.present = 0;
        self.huge = false;
        self.region = region;
        self.gpa = gpa;
    }

    pub(crate) fn set(&mut self, i: usize, e: Entry) {
        let was = self.entries[i].present();
        self.entries[i] = e;
        match (was, e.present()) {
            (false, true) => self.present += 1,
            (true, false) => self.present -= 1,
            _ => {}
        }
    }

    /// Append the present entries as coalesced extents (host- and
    /// guest-contiguous runs) to `out`. Returns the number of entries.
    pub(crate) fn extents(&self, out: &mut Vec<Extent>) -> u64 {
        if self.huge {
            if self.entries[0].present() {
                push_extent(
                    out,
                    self.region,
                    self.gpa,
                    self.entries[0].hva(),
                    HUGE_PAGE_SIZE,
                );
                return ENTRIES_PER_LEAF as u64;
            }
            return 0;
        }
        let mut n = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if !e.present() {
                continue;
            }
            n += 1;
            let gpa = self.gpa + i as u64 * PAGE_SIZE;
            push_extent(out, self.region, gpa, e.hva(), PAGE_SIZE);
        }
        n
    }
}

/// A guest-physical run mapped to a host-contiguous run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub region: RegionId,
    pub gpa: u64,
    pub hva: u64,
    pub len: u64,
}

pub(crate) fn push_extent(out: &mut Vec<Extent>, region: RegionId, gpa: u64, hva: u64, len: u64) {
    if let Some(last) = out.last_mut() {
        // Checked: a run ending at the top of either space is never
        // contiguous with one starting at 0.
        if last.region == region
            && last.gpa.checked_add(last.len) == Some(gpa)
            && last.hva.checked_add(last.len) == Some(hva)
        {
            last.len += len;
            return;
        }
    }
    out.push(Extent {
        region,
        gpa,
        hva,
        len,
    });
}

/// An intrusive singly-linked list of leaves.
#[derive(Default)]
pub(crate) struct LeafList {
    head: Option<Box<Leaf>>,
    len: usize,
}

impl LeafList {
    pub(crate) fn push(&mut self, mut leaf: Box<Leaf>) {
        leaf.next = self.head.take();
        self.head = Some(leaf);
        self.len += 1;
    }

    pub(crate) fn pop(&mut self) -> Option<Box<Leaf>> {
        let mut leaf = self.head.take()?;
        self.head = leaf.next.take();
        self.len -= 1;
        Some(leaf)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for LeafList {
    fn drop(&mut self) {
        // Iteratively: a recursive drop of a long chain overflows the stack.
        while self.pop().is_some() {}
    }
}

/// A directory slot: a leaf (huge or 4 KiB entries) or none, and the
/// generation of the region when the leaf was installed. The generation
/// sits in the directory, not the leaf, so telling an obsolete slot from a
/// current one (the reclaimer's scan, under the lock) reads the directory
/// sequentially and never touches a cold leaf.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) gen: u64,
    pub(crate) leaf: Option<Box<Leaf>>,
}

impl Slot {
    /// The leaf, if it belongs to generation `gen`.
    pub(crate) fn current(&self, gen: u64) -> Option<&Leaf> {
        self.leaf.as_deref().filter(|_| self.gen == gen)
    }

    pub(crate) fn current_mut(&mut self, gen: u64) -> Option<&mut Leaf> {
        if self.gen == gen {
            self.leaf.as_deref_mut()
        } else {
            None
        }
    }
}

/// One region's bookkeeping, protected by the mmu lock.
pub(crate) struct RegionTable {
    pub(crate) id: RegionId,
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) gpa: u64,
    pub(crate) size: u64,
    pub(crate) hva: u64,
    pub(crate) valid_gen: u64,
    /// 4 KiB pages with a current translation.
    pub(crate) live: u64,
    /// Guest-physical address of slot 0 (the region start rounded down to
    /// 2 MiB).
    pub(crate) dir_base: u64,
    pub(crate) dir: Vec<Slot>,
    /// Removed regions stay (invisible) until the reclaimer has emptied
    /// their directory.
    pub(crate) removed: bool,
    /// Next directory slot the reclaimer will examine; `dir.len()` = done.
    pub(crate) reclaim_cursor: usize,
    /// The oldest generation whose leaves may still be in `dir`.
    pub(crate) reclaimed_below: u64,
    /// Leaves of this region on the mmu's obsolete list: the region's old
    /// generations are reported reclaimed (and a removed region freed)
    /// only when this is 0, however busy the list is with other regions.
    pub(crate) on_obsolete_list: u64,
}

impl RegionTable {
    /// `None` if the directory cannot be allocated. The caller bounds
    /// `size` (`MAX_REGION_SIZE`) and keeps `gpa + size` below
    /// `ADDRESS_LIMIT`, so the arithmetic here cannot overflow.
    pub(crate) fn try_new(
        id: RegionId,
        name: std::sync::Arc<str>,
        gpa: u64,
        size: u64,
        hva: u64,
        gen: u64,
    ) -> Option<Self> {
        let dir_base = gpa & !(HUGE_PAGE_SIZE - 1);
        let dir_end = (gpa + size).next_multiple_of(HUGE_PAGE_SIZE);
        let slots = ((dir_end - dir_base) / HUGE_PAGE_SIZE) as usize;
        let mut dir = Vec::new();
        dir.try_reserve_exact(slots).ok()?;
        dir.resize_with(slots, Slot::default);
        Some(RegionTable {
            id,
            name,
            gpa,
            size,
            hva,
            valid_gen: gen,
            live: 0,
            dir_base,
            dir,
            removed: false,
            reclaim_cursor: slots,
            reclaimed_below: gen,
            on_obsolete_list: 0,
        })
    }

    pub(crate) fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// Whether `[gpa, gpa + len)` lies inside the region; never overflows,
    /// whatever the arguments.
    pub(crate) fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa && gpa <= self.end() && len <= self.end() - gpa
    }

    pub(crate) fn slot_index(&self, gpa: u64) -> usize {
        ((gpa - self.dir_base) / HUGE_PAGE_SIZE) as usize
    }

    pub(crate) fn slot_gpa(&self, index: usize) -> u64 {
        self.dir_base + index as u64 * HUGE_PAGE_SIZE
    }

    /// The current translation of the page containing `gpa`, if any.
    pub(crate) fn lookup(&self, gpa: u64) -> Option<Translation> {
        let leaf = self.dir[self.slot_index(gpa)].current(self.valid_gen)?;
        if leaf.huge {
            let e = leaf.entries[0];
            return e.present().then(|| Translation {
                gpa: leaf.gpa,
                hva: e.hva(),
                size: PageSize::Huge,
                writable: e.writable(),
            });
        }
        let e = leaf.entries[leaf_index(gpa)];
        e.present().then(|| Translation {
            gpa: gpa & !(PAGE_SIZE - 1),
            hva: e.hva(),
            size: PageSize::Small,
            writable: e.writable(),
        })
    }

    /// Whether slot `i` holds state of an obsolete generation.
    pub(crate) fn slot_obsolete(&self, i: usize) -> bool {
        let slot = &self.dir[i];
        slot.leaf.is_some() && (slot.gen != self.valid_gen || self.removed)
    }
}

/// Index of the 4 KiB entry for `gpa` within its leaf.
pub(crate) fn leaf_index(gpa: u64) -> usize {
    ((gpa / PAGE_SIZE) % ENTRIES_PER_LEAF as u64) as usize
}
