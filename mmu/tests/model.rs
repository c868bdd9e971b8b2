//! Property test: any sequence of region changes, faults, invalidations,
//! teardowns and reclaim steps leaves exactly the translations a plain
//! reference model (a map from page to host address) predicts.

use mmu::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
/// Candidate regions: (gpa, size, hva).
const REGIONS: [(u64, u64, u64); 3] = [
    (0, 4 * MIB, 0x10_0000_0000),
    (4 * MIB, 2 * MIB, 0x20_0000_0000),
    (8 * MIB, 3 * MIB, 0x30_0000_0000),
];
const SPACE: u64 = 12 * MIB;
const PAGES: u64 = SPACE / PAGE_SIZE;

#[derive(Clone, Debug)]
enum Op {
    Add(usize),
    Remove(usize),
    Fault { page: u64, pages: u64 },
    HugeFault { slot: u64 },
    Invalidate { page: u64, pages: u64 },
    StaleInstall { page: u64 },
    TeardownAll,
    TeardownRegion(usize),
    Reclaim,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize).prop_map(Op::Add),
        (0..3usize).prop_map(Op::Remove),
        (0..PAGES, 1..40u64).prop_map(|(page, pages)| Op::Fault { page, pages }),
        (0..SPACE / HUGE_PAGE_SIZE).prop_map(|slot| Op::HugeFault { slot }),
        (0..PAGES, 1..700u64).prop_map(|(page, pages)| Op::Invalidate { page, pages }),
        (0..PAGES).prop_map(|page| Op::StaleInstall { page }),
        Just(Op::TeardownAll),
        (0..3usize).prop_map(Op::TeardownRegion),
        Just(Op::Reclaim),
    ]
}

struct Harness {
    mmu: Arc<Mmu>,
    ids: [Option<RegionId>; 3],
    model: BTreeMap<u64, u64>,
    stamp: u64,
}

impl Harness {
    fn region_of(&self, gpa: u64, len: u64) -> Option<usize> {
        (0..3).find(|&k| {
            let (g, s, _) = REGIONS[k];
            self.ids[k].is_some() && gpa >= g && gpa + len <= g + s
        })
    }

    fn drop_pages(&mut self, gpa: u64, end: u64) {
        let keys: Vec<u64> = self.model.range(gpa..end).map(|(k, _)| *k).collect();
        for k in keys {
            self.model.remove(&k);
        }
    }

    fn apply(&mut self, op: &Op) {
        self.stamp += 1;
        let m = self.mmu.clone();
        match *op {
            Op::Add(k) => {
                let (gpa, size, hva) = REGIONS[k];
                let r = m.add_region(RegionSpec {
                    name: format!("r{k}"),
                    gpa,
                    size,
                    hva,
                });
                assert_eq!(r.is_ok(), self.ids[k].is_none(), "{r:?}");
                if let Ok(id) = r {
                    self.ids[k] = Some(id);
                }
            }
            Op::Remove(k) => {
                let Some(id) = self.ids[k].take() else {
                    return;
                };
                m.remove_region(id).unwrap();
                let (gpa, size, _) = REGIONS[k];
                self.drop_pages(gpa, gpa + size);
            }
            Op::Fault { page, pages } => {
                let (gpa, len) = (page * PAGE_SIZE, pages * PAGE_SIZE);
                let r = m.fault_in(gpa, len, |t, out| {
                    for p in 0..pages {
                        let hva = (self.stamp * 4096 + p) * PAGE_SIZE;
                        out.push(Translation::small(t.gpa() + p * PAGE_SIZE, hva));
                    }
                    Ok(())
                });
                assert_eq!(r.is_ok(), self.region_of(gpa, len).is_some(), "{r:?}");
                if r.is_ok() {
                    for p in 0..pages {
                        self.model
                            .insert(gpa + p * PAGE_SIZE, (self.stamp * 4096 + p) * PAGE_SIZE);
                    }
                }
            }
            Op::HugeFault { slot } => {
                let gpa = slot * HUGE_PAGE_SIZE;
                let hva = self.stamp * HUGE_PAGE_SIZE;
                let r = m.fault_in(gpa, HUGE_PAGE_SIZE, |t, out| {
                    out.push(Translation::huge(t.gpa(), hva));
                    Ok(())
                });
                assert_eq!(r.is_ok(), self.region_of(gpa, HUGE_PAGE_SIZE).is_some());
                if r.is_ok() {
                    for p in 0..512 {
                        self.model.insert(gpa + p * PAGE_SIZE, hva + p * PAGE_SIZE);
                    }
                }
            }
            Op::Invalidate { page, pages } => {
                let (gpa, end) = (page * PAGE_SIZE, (page + pages).min(PAGES) * PAGE_SIZE);
                let covered = (gpa..end)
                    .step_by(PAGE_SIZE as usize)
                    .all(|g| self.region_of(g, PAGE_SIZE).is_some());
                let r = m.invalidate(gpa, end - gpa);
                assert_eq!(r.is_ok(), covered, "{r:?}");
                if covered {
                    self.drop_pages(gpa, end);
                }
            }
            Op::StaleInstall { page } => {
                let gpa = page * PAGE_SIZE;
                if self.region_of(gpa, PAGE_SIZE).is_none() {
                    return;
                }
                let t = m.read_begin(gpa, PAGE_SIZE).unwrap();
                m.invalidate(gpa, PAGE_SIZE).unwrap();
                self.model.remove(&gpa);
                assert_eq!(
                    m.install(&t, &[Translation::small(gpa, 0)]),
                    Err(Error::Stale)
                );
            }
            Op::TeardownAll => {
                m.teardown_all().unwrap();
                self.model.clear();
            }
            Op::TeardownRegion(k) => {
                let r = self.ids[k].map(|id| m.teardown_region(id));
                if let Some(r) = r {
                    r.unwrap();
                    let (gpa, size, _) = REGIONS[k];
                    self.drop_pages(gpa, gpa + size);
                }
            }
            Op::Reclaim => {
                m.reclaim_step();
            }
        }
    }

    fn check(&self) {
        for page in 0..PAGES {
            let gpa = page * PAGE_SIZE;
            let got = self.mmu.lookup(gpa).map(|t| t.hva + (gpa - t.gpa));
            assert_eq!(got, self.model.get(&gpa).copied(), "page {gpa:#x}");
        }
        assert_eq!(self.mmu.mapped_bytes(), self.model.len() as u64 * PAGE_SIZE);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness {
            mmu: Mmu::new(Config { background_reclaim: false, reclaim_batch: 2, reclaim_scan: 3, ..Config::default() }).unwrap(),
            ids: [None; 3],
            model: BTreeMap::new(),
            stamp: 0,
        };
        h.apply(&Op::Add(0));
        for op in &ops {
            h.apply(op);
            h.check();
        }
        h.mmu.reclaim_all();
        h.check();
        prop_assert!(!h.mmu.reclaim_pending());
    }
}
