//! Property test: any sequence of region changes, faults, invalidations,
//! teardowns and reclaim steps leaves exactly the translations a plain
//! reference model (a map from page to host address) predicts — including
//! regions at the top of the supported address space, addresses near
//! `u64::MAX`, hostile installs and tickets of another mmu, which must all
//! be errors that change nothing (issue 10 items 4 and 5).

use mmu::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
/// Where the high window of the model starts: 4 MiB below the limit.
const HIGH: u64 = ADDRESS_LIMIT - 4 * MIB;
/// Candidate regions: (gpa, size, hva, accepted).
const REGIONS: [(u64, u64, u64, bool); 6] = [
    (0, 4 * MIB, 0x10_0000_0000, true),
    (4 * MIB, 2 * MIB, 0x20_0000_0000, true),
    (8 * MIB, 3 * MIB, 0x30_0000_0000, true),
    // Ends exactly at the limit, in both address spaces; not 2 MiB aligned.
    (
        HIGH + MIB + PAGE_SIZE,
        3 * MIB - PAGE_SIZE,
        HIGH + MIB + PAGE_SIZE,
        true,
    ),
    // Past the limit, or ending just below 2^64: refused.
    (u64::MAX - 4 * MIB + 1, 2 * MIB, 0x40_0000_0000, false),
    (HIGH, 8 * MIB, 0x50_0000_0000, false),
];
const LOW_PAGES: u64 = 12 * MIB / PAGE_SIZE;
/// The high window reaches 1 MiB past the limit.
const HIGH_PAGES: u64 = 5 * MIB / PAGE_SIZE;

/// A page-aligned address: mostly where regions may be, sometimes near
/// `u64::MAX`, sometimes anywhere.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0..LOW_PAGES).prop_map(|p| p * PAGE_SIZE),
        3 => (0..HIGH_PAGES).prop_map(|p| HIGH + p * PAGE_SIZE),
        1 => (0..2048u64).prop_map(|k| u64::MAX - PAGE_SIZE + 1 - k * PAGE_SIZE),
        1 => any::<u64>().prop_map(|a| a & !(PAGE_SIZE - 1)),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Add(usize),
    Remove(usize),
    Fault {
        gpa: u64,
        pages: u64,
    },
    HugeFault {
        gpa: u64,
    },
    Invalidate {
        gpa: u64,
        pages: u64,
    },
    StaleInstall {
        gpa: u64,
    },
    /// Install, translate and translate_range outside the ticket's range.
    HostileInstall {
        gpa: u64,
        at: u64,
        huge: bool,
    },
    /// A ticket of another mmu covering the same addresses.
    ForeignTicket {
        gpa: u64,
    },
    /// Any address at all, aligned or not.
    Lookup {
        addr: u64,
    },
    TeardownAll,
    TeardownRegion(usize),
    Reclaim,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..REGIONS.len()).prop_map(Op::Add),
        (0..REGIONS.len()).prop_map(Op::Remove),
        (addr(), 1..40u64).prop_map(|(gpa, pages)| Op::Fault { gpa, pages }),
        addr().prop_map(|a| Op::HugeFault {
            gpa: a & !(HUGE_PAGE_SIZE - 1)
        }),
        (addr(), 1..700u64).prop_map(|(gpa, pages)| Op::Invalidate { gpa, pages }),
        addr().prop_map(|gpa| Op::StaleInstall { gpa }),
        (addr(), addr(), any::<bool>()).prop_map(|(gpa, at, huge)| Op::HostileInstall {
            gpa,
            at,
            huge
        }),
        addr().prop_map(|gpa| Op::ForeignTicket { gpa }),
        prop_oneof![addr(), any::<u64>()].prop_map(|addr| Op::Lookup { addr }),
        Just(Op::TeardownAll),
        (0..REGIONS.len()).prop_map(Op::TeardownRegion),
        Just(Op::Reclaim),
    ]
}

struct Harness {
    mmu: Arc<Mmu>,
    /// Another mmu with every accepted region, for foreign tickets.
    other: Arc<Mmu>,
    ids: [Option<RegionId>; REGIONS.len()],
    model: BTreeMap<u64, u64>,
    stamp: u64,
}

fn new_mmu() -> Arc<Mmu> {
    Mmu::new(Config {
        background_reclaim: false,
        reclaim_batch: 2,
        reclaim_scan: 3,
        ..Config::default()
    })
    .unwrap()
}

impl Harness {
    fn new() -> Self {
        let other = new_mmu();
        for (k, &(gpa, size, hva, ok)) in REGIONS.iter().enumerate() {
            if ok {
                let name = format!("other{k}");
                other
                    .add_region(RegionSpec {
                        name,
                        gpa,
                        size,
                        hva,
                    })
                    .unwrap();
            }
        }
        Harness {
            mmu: new_mmu(),
            other,
            ids: [None; REGIONS.len()],
            model: BTreeMap::new(),
            stamp: 0,
        }
    }

    /// The registered region holding all of `[gpa, gpa + len)`.
    fn region_of(&self, gpa: u64, len: u64) -> Option<usize> {
        let end = gpa.checked_add(len)?;
        (0..REGIONS.len()).find(|&k| {
            let (g, s, _, _) = REGIONS[k];
            self.ids[k].is_some() && gpa >= g && end <= g + s
        })
    }

    fn host(&self, k: usize, gpa: u64) -> u64 {
        let (g, _, h, _) = REGIONS[k];
        h + (gpa - g)
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
                let (gpa, size, hva, ok) = REGIONS[k];
                let name = format!("r{k}");
                let r = m.add_region(RegionSpec {
                    name,
                    gpa,
                    size,
                    hva,
                });
                assert_eq!(r.is_ok(), ok && self.ids[k].is_none(), "{r:?}");
                if !ok {
                    assert!(matches!(r, Err(Error::AboveLimit { .. })), "{r:?}");
                }
                if let Ok(id) = r {
                    self.ids[k] = Some(id);
                }
            }
            Op::Remove(k) => {
                let Some(id) = self.ids[k].take() else {
                    assert!(m.remove_region(RegionId(u64::MAX)).is_err());
                    return;
                };
                m.remove_region(id).unwrap();
                let (gpa, size, _, _) = REGIONS[k];
                self.drop_pages(gpa, gpa + size);
            }
            Op::Fault { gpa, pages } => {
                let len = pages * PAGE_SIZE;
                let stamp = self.stamp;
                let r = m.fault_in(gpa, len, |t, out| {
                    for p in 0..pages {
                        let hva = (stamp * 4096 + p) * PAGE_SIZE;
                        out.push(Translation::small(t.gpa() + p * PAGE_SIZE, hva));
                    }
                    Ok(())
                });
                assert_eq!(r.is_ok(), self.region_of(gpa, len).is_some(), "{r:?}");
                if r.is_ok() {
                    for p in 0..pages {
                        self.model
                            .insert(gpa + p * PAGE_SIZE, (stamp * 4096 + p) * PAGE_SIZE);
                    }
                }
            }
            Op::HugeFault { gpa } => {
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
            Op::Invalidate { gpa, pages } => {
                let len = pages * PAGE_SIZE;
                let covered = gpa.checked_add(len).is_some()
                    && (0..pages).all(|p| self.region_of(gpa + p * PAGE_SIZE, PAGE_SIZE).is_some());
                let r = m.invalidate(gpa, len);
                assert_eq!(r.is_ok(), covered, "{r:?}");
                if covered {
                    self.drop_pages(gpa, gpa + len);
                }
            }
            Op::StaleInstall { gpa } => {
                if self.region_of(gpa, PAGE_SIZE).is_none() {
                    assert!(m.read_begin(gpa, PAGE_SIZE).is_err());
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
            Op::HostileInstall { gpa, at, huge } => {
                let Some(k) = self.region_of(gpa, PAGE_SIZE) else {
                    return;
                };
                let t = m.read_begin(gpa, PAGE_SIZE).unwrap();
                let tr = if huge {
                    Translation::huge(at & !(HUGE_PAGE_SIZE - 1), 0)
                } else {
                    Translation::small(at, 0)
                };
                let fits = tr.gpa >= t.gpa()
                    && tr
                        .gpa
                        .checked_add(tr.size.bytes())
                        .is_some_and(|e| e <= t.end());
                let r = m.install(&t, &[tr]);
                if fits {
                    // Only a 4 KiB translation of the ticket's own page fits.
                    assert_eq!(r, Ok(1));
                    self.model.insert(gpa, 0);
                } else {
                    assert!(r.is_err(), "{tr:?} outside {:#x}: {r:?}", t.gpa());
                }
                let mut out = Vec::new();
                if at != gpa {
                    assert!(m.translate(&t, at).is_err());
                    assert!(t.host_addr(at).is_err());
                }
                assert!(m
                    .translate_range(&t, gpa, at.max(gpa + PAGE_SIZE + 1), &mut out)
                    .is_err());
                assert_eq!(t.host_addr(gpa), Ok(self.host(k, gpa)));
            }
            Op::ForeignTicket { gpa } => {
                let Ok(t) = self.other.read_begin(gpa, PAGE_SIZE) else {
                    return;
                };
                let tr = Translation::small(gpa, 0);
                assert_eq!(m.install(&t, &[tr]), Err(Error::ForeignTicket));
                assert_eq!(m.translate(&t, gpa), Err(Error::ForeignTicket));
                let mut out = Vec::new();
                assert_eq!(
                    m.translate_range(&t, gpa, gpa + PAGE_SIZE, &mut out),
                    Err(Error::ForeignTicket)
                );
                assert!(m.read_retry(&t));
            }
            Op::Lookup { addr } => {
                let want = self.model.get(&(addr & !(PAGE_SIZE - 1))).copied();
                let got = m
                    .lookup(addr)
                    .map(|t| t.hva + ((addr & !(PAGE_SIZE - 1)) - t.gpa));
                assert_eq!(got, want, "lookup({addr:#x})");
            }
            Op::TeardownAll => {
                m.teardown_all().unwrap();
                self.model.clear();
            }
            Op::TeardownRegion(k) => {
                let r = self.ids[k].map(|id| m.teardown_region(id));
                if let Some(r) = r {
                    r.unwrap();
                    let (gpa, size, _, _) = REGIONS[k];
                    self.drop_pages(gpa, gpa + size);
                }
            }
            Op::Reclaim => {
                m.reclaim_step();
            }
        }
    }

    fn check(&self) {
        let low = (0..LOW_PAGES).map(|p| p * PAGE_SIZE);
        let high = (0..HIGH_PAGES).map(|p| HIGH + p * PAGE_SIZE);
        for gpa in low.chain(high) {
            let got = self.mmu.lookup(gpa).map(|t| t.hva + (gpa - t.gpa));
            assert_eq!(got, self.model.get(&gpa).copied(), "page {gpa:#x}");
        }
        for wild in [u64::MAX, u64::MAX - PAGE_SIZE + 1, ADDRESS_LIMIT] {
            assert_eq!(self.mmu.lookup(wild), None);
        }
        assert_eq!(self.mmu.mapped_bytes(), self.model.len() as u64 * PAGE_SIZE);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        h.apply(&Op::Add(0));
        h.apply(&Op::Add(3));
        for op in &ops {
            h.apply(op);
            h.check();
        }
        h.mmu.reclaim_all();
        h.check();
        prop_assert!(!h.mmu.reclaim_pending());
    }
}
