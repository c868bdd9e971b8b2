//! The device page table of one MR: iova page → host page, as a two-level
//! radix (a small map of 2 MiB leaves, each a flat array of 512 entries),
//! the shape of an RNIC's own MTT.
//!
//! Why not one flat hash map: at 4 GiB mapped that map is one 32 MiB
//! allocation. Growing it reallocates (tens of MiB copied while the device
//! installs pages) and freeing it after a teardown is a `munmap`, which
//! holds the process's mmap lock while the kernel frees the pages; with the
//! freeing thread preempted inside, the VMM's page moves and every vCPU
//! fault queued behind it (a 3.6 ms guest stall at 4 GiB in `odpvm bench
//! teardown`, traced with `perf sched`). Leaves are 4 KiB heap blocks:
//! never handed back to the kernel one by one, and recycled through a
//! process-wide pool, so a teardown's old table costs pointer moves only.
//! Test: `page_table::tests`, and `vmm/tests/teardown.rs` for the stall.

use parking_lot::Mutex;
use std::collections::HashMap;

/// Pages per leaf (one leaf covers 2 MiB of iova).
const LEAF_PAGES: usize = 512;
const LEAF_SHIFT: u32 = 21;
const PAGE_SHIFT: u32 = 12;
const PAGE_MASK: u64 = (1 << PAGE_SHIFT) - 1;
/// Leaves the pool keeps for reuse (64 MiB: the tables of 32 GiB of
/// mapped iova); leaves beyond it go back to the allocator.
const POOL_CAP: usize = 16 * 1024;

/// 512 host page addresses; 0 is "not mapped" (no host page lives at 0).
struct Leaf {
    hva: [u64; LEAF_PAGES],
    mapped: u32,
}

/// Leaves of released tables, handed out again zeroed.
static POOL: Mutex<Vec<Box<Leaf>>> = Mutex::new(Vec::new());

impl Leaf {
    fn take() -> Box<Leaf> {
        match POOL.lock().pop() {
            Some(mut leaf) => {
                leaf.hva.fill(0);
                leaf.mapped = 0;
                leaf
            }
            None => Box::new(Leaf {
                hva: [0; LEAF_PAGES],
                mapped: 0,
            }),
        }
    }
}

#[derive(Default)]
pub(crate) struct PageTable {
    leaves: HashMap<u64, Box<Leaf>>,
    mapped: u64,
}

fn split(page: u64) -> (u64, usize) {
    (
        page >> LEAF_SHIFT,
        ((page >> PAGE_SHIFT) as usize) & (LEAF_PAGES - 1),
    )
}

impl PageTable {
    /// Host page of the iova page `page` (page-aligned), if mapped.
    pub(crate) fn get(&self, page: u64) -> Option<u64> {
        let (leaf, slot) = split(page);
        let hva = self.leaves.get(&leaf)?.hva[slot];
        (hva != 0).then_some(hva)
    }

    pub(crate) fn contains(&self, page: u64) -> bool {
        self.get(page).is_some()
    }

    /// Map iova page `page` to host page `hva` (non-zero).
    pub(crate) fn insert(&mut self, page: u64, hva: u64) {
        debug_assert!(hva != 0, "host page 0 cannot be mapped");
        let (leaf, slot) = split(page);
        let l = self.leaves.entry(leaf).or_insert_with(Leaf::take);
        if l.hva[slot] == 0 {
            l.mapped += 1;
            self.mapped += 1;
        }
        l.hva[slot] = hva;
    }

    /// Pages mapped.
    pub(crate) fn len(&self) -> u64 {
        self.mapped
    }

    /// Unmap every page overlapping `[start, end)`; returns how many were
    /// mapped.
    pub(crate) fn zap(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let (first, last) = (split(start & !PAGE_MASK), split((end - 1) & !PAGE_MASK));
        let keys: Vec<u64> = if last.0 - first.0 < self.leaves.len() as u64 {
            (first.0..=last.0)
                .filter(|k| self.leaves.contains_key(k))
                .collect()
        } else {
            let range = first.0..=last.0;
            let mut k: Vec<u64> = self
                .leaves
                .keys()
                .copied()
                .filter(|k| range.contains(k))
                .collect();
            k.sort_unstable();
            k
        };
        let mut zapped = 0;
        let mut emptied = Vec::new();
        for key in keys {
            let lo = if key == first.0 { first.1 } else { 0 };
            let hi = if key == last.0 {
                last.1
            } else {
                LEAF_PAGES - 1
            };
            let leaf = self.leaves.get_mut(&key).expect("key listed above");
            for e in &mut leaf.hva[lo..=hi] {
                if *e != 0 {
                    *e = 0;
                    leaf.mapped -= 1;
                    zapped += 1;
                }
            }
            if leaf.mapped == 0 {
                emptied.extend(self.leaves.remove(&key));
            }
        }
        recycle(emptied);
        self.mapped -= zapped;
        zapped
    }

    /// Every mapping, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.leaves.iter().flat_map(|(&key, leaf)| {
            leaf.hva
                .iter()
                .enumerate()
                .filter(|(_, &h)| h != 0)
                .map(move |(i, &h)| ((key << LEAF_SHIFT) | ((i as u64) << PAGE_SHIFT), h))
        })
    }

    /// Whether it holds any leaf (an empty table owns no memory).
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }
}

impl Drop for PageTable {
    /// Every leaf goes to the pool: pointer moves, no memory handed back
    /// to the kernel (~30 µs for the 8192 leaves of 16 GiB).
    fn drop(&mut self) {
        recycle(self.leaves.drain().map(|(_, leaf)| leaf).collect());
    }
}

/// Put `leaves` in the pool; those beyond its cap go back to the allocator.
fn recycle(mut leaves: Vec<Box<Leaf>>) {
    let excess = {
        let mut pool = POOL.lock();
        let room = POOL_CAP.saturating_sub(pool.len()).min(leaves.len());
        pool.extend(leaves.drain(..room));
        leaves
    };
    drop(excess);
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    /// Pages overlapping `[s, e)` go.
    fn model_zap(m: &mut std::collections::BTreeMap<u64, u64>, s: u64, e: u64) -> u64 {
        if s >= e {
            return 0;
        }
        let keys: Vec<u64> = m.range(s & !(P - 1)..e).map(|(k, _)| *k).collect();
        for k in &keys {
            m.remove(k);
        }
        keys.len() as u64
    }

    #[test]
    fn matches_a_plain_map_under_random_inserts_and_zaps() {
        let mut t = PageTable::default();
        let mut m = std::collections::BTreeMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..20_000 {
            let page = (rnd() % 4096) * P + (rnd() % 4) * (1 << 40);
            if step % 5 == 4 {
                let len = (rnd() % 3000) * P + rnd() % P;
                let e = page.saturating_add(len);
                assert_eq!(
                    t.zap(page, e),
                    model_zap(&mut m, page, e),
                    "zap {page:#x}..{e:#x}"
                );
            } else {
                let hva = (rnd() | 1) << 12;
                t.insert(page, hva);
                m.insert(page, hva);
            }
            assert_eq!(t.len(), m.len() as u64);
        }
        for (k, v) in &m {
            assert_eq!(t.get(*k), Some(*v));
        }
        let mut all: Vec<_> = t.iter().collect();
        all.sort_unstable();
        assert_eq!(all, m.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>());
        assert_eq!(t.zap(0, u64::MAX), m.len() as u64);
        assert_eq!(t.len(), 0);
        assert!(t.is_empty(), "an emptied table keeps no leaf");
    }

    #[test]
    fn zap_bounds_are_exact_at_leaf_edges_and_the_top_of_the_address_space() {
        let mut t = PageTable::default();
        let top = !(P - 1);
        for p in [0, P, (1 << 21) - P, 1 << 21, top - P, top] {
            t.insert(p, 0x2000);
        }
        assert_eq!(t.zap(P, 1 << 21), 2, "[4K, 2M) holds 4K and 2M-4K");
        assert!(t.contains(0) && t.contains(1 << 21));
        assert_eq!(t.zap(top - P, u64::MAX), 2, "the last two pages");
        assert_eq!(
            t.zap(2 * P - 1, 2 * P),
            0,
            "[8K-1, 8K) overlaps only page 4K, gone"
        );
        assert_eq!(t.zap(1, 2), 1, "a byte of page 0 takes page 0");
        assert_eq!(t.zap(5, 5), 0);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn recycled_leaves_come_back_empty() {
        let mut t = PageTable::default();
        for i in 0..1024 {
            t.insert(i * P, 0x5000);
        }
        drop(t);
        let mut u = PageTable::default();
        u.insert(0, 0x7000);
        assert_eq!(u.len(), 1);
        assert_eq!(u.iter().count(), 1, "a reused leaf holds nothing old");
        assert_eq!(u.get(P), None);
    }
}
