//! Single-threaded reference model with hostile inputs at the edges
//! (0, near ADDRESS_LIMIT, u64::MAX, zero lengths, misaligned values,
//! kept tickets, foreign tickets, removed/re-added regions).

use mmu::*;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

const MIB: u64 = 1 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[derive(Clone, Debug)]
struct MRegion {
    id: RegionId,
    gpa: u64,
    size: u64,
}

#[derive(Default)]
struct Model {
    regions: Vec<MRegion>,
    pages: BTreeMap<u64, (u64, RegionId)>, // page -> (hva, region)
    /// invalidation events: (gpa, end)
    events: Vec<(u64, u64)>,
}

impl Model {
    fn region_of(&self, gpa: u64, len: u64) -> Option<&MRegion> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|e| e <= r.gpa + r.size))
    }
    fn covered(&self, gpa: u64, end: u64) -> bool {
        let mut p = gpa;
        while p < end {
            match self
                .regions
                .iter()
                .find(|r| r.gpa <= p && p < r.gpa + r.size)
            {
                Some(r) => p = r.gpa + r.size,
                None => return false,
            }
        }
        true
    }
    fn collides(&self, seen: usize, gpa: u64, end: u64) -> bool {
        self.events[seen..]
            .iter()
            .any(|(g, e)| *g < end && gpa < *e)
    }
}

fn addr(rng: &mut Rng) -> u64 {
    let a = match rng.below(10) {
        0 => 0,
        1 => ADDRESS_LIMIT - PAGE_SIZE * (1 + rng.below(1024)),
        2 => ADDRESS_LIMIT,
        3 => u64::MAX - rng.below(3 * MIB),
        4 => rng.next(),
        5 => ADDRESS_LIMIT - HUGE_PAGE_SIZE * (1 + rng.below(8)),
        _ => rng.below(96 * MIB),
    };
    match rng.below(8) {
        0 => a, // maybe misaligned
        _ => a & !(PAGE_SIZE - 1),
    }
}

fn len(rng: &mut Rng) -> u64 {
    let l = match rng.below(10) {
        0 => 0,
        1 => u64::MAX - rng.below(MIB),
        2 => HUGE_PAGE_SIZE * (1 + rng.below(4)),
        3 => rng.next(),
        _ => PAGE_SIZE * (1 + rng.below(1024)),
    };
    match rng.below(8) {
        0 => l,
        _ => l & !(PAGE_SIZE - 1),
    }
}

#[derive(Default, Debug)]
struct Counts {
    ops: u64,
    faults: u64,
    invalidations: u64,
    teardowns: u64,
    errors: u64,
}

fn run(seed: u64, steps: usize, counts: &mut Counts) -> Result<(), String> {
    let mut rng = Rng(seed | 1);
    let m = Mmu::new(Config {
        background_reclaim: false,
        install_batch: 1 + rng.below(600) as usize,
        zap_batch: 1 + rng.below(2000) as usize,
        reclaim_batch: 1 + rng.below(20) as usize,
        reclaim_scan: 1 + rng.below(100) as usize,
        ..Config::default()
    })
    .unwrap();
    let other = Mmu::new(Config {
        background_reclaim: false,
        ..Config::default()
    })
    .unwrap();
    other
        .add_region(RegionSpec {
            name: "o".into(),
            gpa: 0,
            size: 1 << 40,
            hva: 0,
        })
        .ok();
    let mut md = Model::default();
    let mut tickets: Vec<(Ticket, usize)> = Vec::new();
    for step in 0..steps {
        counts.ops += 1;
        let op = rng.below(100);
        let res = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
            match op {
                0..=7 => {
                    // add region (sizes kept small so the directory fits)
                    let gpa = addr(&mut rng);
                    let size = match rng.below(6) {
                        0 => len(&mut rng),
                        1 => ADDRESS_LIMIT.wrapping_sub(gpa),
                        _ => PAGE_SIZE * (1 + rng.below(4096)),
                    };
                    let hva = if rng.below(5) == 0 {
                        addr(&mut rng)
                    } else {
                        1 << 41
                    };
                    let expect_ok = gpa.is_multiple_of(PAGE_SIZE)
                        && size.is_multiple_of(PAGE_SIZE)
                        && size > 0
                        && hva.is_multiple_of(PAGE_SIZE)
                        && gpa.checked_add(size).is_some_and(|e| e <= ADDRESS_LIMIT)
                        && hva.checked_add(size).is_some_and(|e| e <= ADDRESS_LIMIT)
                        && !md
                            .regions
                            .iter()
                            .any(|r| r.gpa < gpa + size && gpa < r.gpa + r.size);
                    let passes_checks = gpa.is_multiple_of(PAGE_SIZE)
                        && size.is_multiple_of(PAGE_SIZE)
                        && size > 0
                        && hva.is_multiple_of(PAGE_SIZE)
                        && gpa.checked_add(size).is_some_and(|e| e <= ADDRESS_LIMIT)
                        && hva.checked_add(size).is_some_and(|e| e <= ADDRESS_LIMIT);
                    if passes_checks && size > 64 << 30 {
                        return Ok(()); // directory too large for this machine (see adversary.rs)
                    }
                    let r = m.add_region(RegionSpec {
                        name: "x".into(),
                        gpa,
                        size,
                        hva,
                    });
                    match (r, expect_ok) {
                        (Ok(id), true) => md.regions.push(MRegion { id, gpa, size }),
                        (Err(Error::OutsideRegions { .. }), true) => {
                            // region slots full (removed regions pending): reclaim, retry
                            m.reclaim_all();
                            if let Ok(id) = m.add_region(RegionSpec {
                                name: "x".into(),
                                gpa,
                                size,
                                hva,
                            }) {
                                md.regions.push(MRegion { id, gpa, size });
                            }
                        }
                        (Err(_), false) => counts.errors += 1,
                        (r, e) => {
                            return Err(format!(
                                "add_region({gpa:#x},{size:#x},{hva:#x}) = {r:?}, model ok={e}"
                            ))
                        }
                    }
                }
                8..=10 => {
                    if md.regions.is_empty() || rng.below(4) == 0 {
                        let bogus = RegionId(rng.next());
                        if m.remove_region(bogus).is_ok()
                            && !md.regions.iter().any(|r| r.id == bogus)
                        {
                            return Err("remove_region of a bogus id succeeded".into());
                        }
                        return Ok(());
                    }
                    let i = rng.below(md.regions.len() as u64) as usize;
                    let r = md.regions.remove(i);
                    m.remove_region(r.id)
                        .map_err(|e| format!("remove_region: {e:?}"))?;
                    md.pages.retain(|_, (_, reg)| *reg != r.id);
                    md.events.push((r.gpa, r.gpa + r.size));
                    counts.teardowns += 1;
                }
                11..=40 => {
                    // fault: a range inside a region (or hostile)
                    let (gpa, l) = if md.regions.is_empty() || rng.below(6) == 0 {
                        (addr(&mut rng), len(&mut rng))
                    } else {
                        let r = md.regions[rng.below(md.regions.len() as u64) as usize].clone();
                        let pages = r.size / PAGE_SIZE;
                        let n = 1 + rng.below(pages.min(1100));
                        let p = rng.below(pages - n + 1);
                        (r.gpa + p * PAGE_SIZE, n * PAGE_SIZE)
                    };
                    let t = m.read_begin(gpa, l);
                    let reg = md.region_of(gpa, l).cloned();
                    let ok = gpa.is_multiple_of(PAGE_SIZE)
                        && l % PAGE_SIZE == 0
                        && l > 0
                        && reg.is_some();
                    let t = match (t, ok) {
                        (Ok(t), true) => t,
                        (Err(_), false) => {
                            counts.errors += 1;
                            return Ok(());
                        }
                        (r, e) => {
                            return Err(format!(
                                "read_begin({gpa:#x},{l:#x}) = {r:?}, model ok={e}"
                            ))
                        }
                    };
                    let reg = reg.unwrap();
                    if t.region() != reg.id || t.gpa() != gpa || t.len() != l {
                        return Err(format!("ticket {t:?} for {gpa:#x}+{l:#x} in {reg:?}"));
                    }
                    // translations: mostly inside, some hostile
                    let mut trs = Vec::new();
                    let mut hostile = false;
                    let mut page = gpa;
                    while page < gpa + l {
                        if page % HUGE_PAGE_SIZE == 0
                            && page + HUGE_PAGE_SIZE <= gpa + l
                            && rng.below(2) == 0
                        {
                            trs.push(Translation::huge(
                                page,
                                (1 << 42) + rng.below(1 << 10) * HUGE_PAGE_SIZE,
                            ));
                            page += HUGE_PAGE_SIZE;
                        } else {
                            trs.push(Translation::small(
                                page,
                                (1 << 42) + rng.below(1 << 20) * PAGE_SIZE,
                            ));
                            page += PAGE_SIZE;
                        }
                    }
                    if rng.below(10) == 0 {
                        let g = match rng.below(4) {
                            0 => gpa + l,
                            1 => gpa.wrapping_sub(PAGE_SIZE),
                            2 => !(PAGE_SIZE - 1),
                            _ => gpa + 1,
                        };
                        trs.push(if rng.below(2) == 0 {
                            Translation::small(g, 0)
                        } else {
                            Translation::huge(g & !(HUGE_PAGE_SIZE - 1), 0)
                        });
                        let h = *trs.last().unwrap();
                        let sz = h.size.bytes();
                        hostile = !(h.gpa.is_multiple_of(sz)
                            && h.hva.is_multiple_of(sz)
                            && h.gpa >= gpa
                            && h.gpa.checked_add(sz).is_some_and(|e| e <= gpa + l));
                        if rng.below(2) == 0 {
                            let n = trs.len() - 1;
                            trs.swap(0, n);
                        }
                    }
                    let mut seen = md.events.len();
                    if rng.below(5) == 0 {
                        // keep it; use an older kept ticket instead
                        tickets.push((t.clone(), seen));
                        if tickets.len() > 8 {
                            tickets.remove(0);
                        }
                    }
                    let (t, seen2) = if rng.below(6) == 0 && !tickets.is_empty() {
                        tickets[rng.below(tickets.len() as u64) as usize].clone()
                    } else {
                        (t, seen)
                    };
                    seen = seen2;
                    if !(t.gpa() == gpa && t.len() == l) {
                        // an older ticket: translations for its own range
                        trs = (0..t.len() / PAGE_SIZE)
                            .map(|i| {
                                Translation::small(
                                    t.gpa() + i * PAGE_SIZE,
                                    (1 << 43) + rng.below(1 << 20) * PAGE_SIZE,
                                )
                            })
                            .collect();
                        hostile = false;
                    }
                    let treg = md.regions.iter().find(|r| r.id == t.region()).cloned();
                    let stale = md.collides(seen, t.gpa(), t.end()) || treg.is_none();
                    let r = m.install(&t, &trs);
                    let r2 = m.install(&t, &trs); // idempotent re-install
                    match (&r, hostile, stale) {
                        (Err(Error::OutsideTicket { .. } | Error::Misaligned { .. }), true, _) => counts.errors += 1,
                        (Err(Error::Stale), false, true) => {}
                        (Ok(0), false, true) if trs.is_empty() => {}
                        (Err(Error::Stale), false, false) if md.events.len() - seen > 60 => {}
                        (Ok(n), false, false) => {
                            if *n != trs.len() || r2 != r {
                                return Err(format!("install returned {r:?} then {r2:?} for {}", trs.len()));
                            }
                            counts.faults += 1;
                            for tr in &trs {
                                for i in 0..tr.size.bytes() / PAGE_SIZE {
                                    md.pages.insert(tr.gpa + i * PAGE_SIZE, (tr.hva + i * PAGE_SIZE, t.region()));
                                }
                            }
                        }
                        _ => return Err(format!("install({t:?}, {} trs, hostile={hostile}) = {r:?}, model stale={stale}", trs.len())),
                    }
                    // read back through the ticket
                    if r.is_ok() {
                        let mut out = Vec::new();
                        let mut pos = t.gpa();
                        loop {
                            match m.translate_range(&t, pos, t.end(), &mut out) {
                                Ok(Some(miss)) => {
                                    return Err(format!("translate_range: miss at {miss:#x}"))
                                }
                                Ok(None) => {
                                    let last = out.last().map(|x| x.0 + PAGE_SIZE).unwrap_or(pos);
                                    if last >= t.end() {
                                        break;
                                    }
                                    if last == pos {
                                        return Err("translate_range made no progress".into());
                                    }
                                    pos = last;
                                }
                                Err(e) => return Err(format!("translate_range: {e:?}")),
                            }
                        }
                        for (p, h) in out {
                            if md.pages.get(&p).map(|x| x.0) != Some(h) {
                                return Err(format!(
                                    "translate_range {p:#x} -> {h:#x}, model {:?}",
                                    md.pages.get(&p)
                                ));
                            }
                        }
                    }
                    // foreign ticket
                    if let Ok(ft) = other.read_begin(t.gpa(), t.len()) {
                        if !matches!(
                            m.install(&ft, &[Translation::small(t.gpa(), 0)]),
                            Err(Error::ForeignTicket)
                        ) {
                            return Err("foreign ticket accepted".into());
                        }
                        if !m.read_retry(&ft) {
                            return Err("foreign ticket not stale".into());
                        }
                    }
                }
                41..=55 => {
                    let (gpa, l) = if md.regions.is_empty() || rng.below(4) == 0 {
                        (addr(&mut rng), len(&mut rng))
                    } else {
                        let r = md.regions[rng.below(md.regions.len() as u64) as usize].clone();
                        let pages = r.size / PAGE_SIZE;
                        let n = 1 + rng.below(pages);
                        let p = rng.below(pages - n + 1);
                        (r.gpa + p * PAGE_SIZE, n * PAGE_SIZE)
                    };
                    let ok = gpa.is_multiple_of(PAGE_SIZE)
                        && l % PAGE_SIZE == 0
                        && l > 0
                        && gpa.checked_add(l).is_some_and(|e| md.covered(gpa, e));
                    let r = m.invalidate(gpa, l);
                    match (&r, ok) {
                        (Ok(z), true) => {
                            let before = md.pages.len();
                            md.pages.retain(|p, _| !(*p >= gpa && *p < gpa + l));
                            if *z != (before - md.pages.len()) as u64 {
                                return Err(format!(
                                    "invalidate zapped {z}, model {}",
                                    before - md.pages.len()
                                ));
                            }
                            md.events.push((gpa, gpa + l));
                            counts.invalidations += 1;
                        }
                        (Err(_), false) => counts.errors += 1,
                        _ => {
                            return Err(format!(
                                "invalidate({gpa:#x},{l:#x}) = {r:?}, model ok={ok}"
                            ))
                        }
                    }
                }
                56..=60 => {
                    if rng.below(3) == 0 || md.regions.is_empty() {
                        m.teardown_all().map_err(|e| format!("{e:?}"))?;
                        md.pages.clear();
                        md.events.push((0, u64::MAX));
                    } else {
                        let r = md.regions[rng.below(md.regions.len() as u64) as usize].clone();
                        m.teardown_region(r.id).map_err(|e| format!("{e:?}"))?;
                        md.pages.retain(|_, (_, reg)| *reg != r.id);
                        md.events.push((r.gpa, r.gpa + r.size));
                    }
                    counts.teardowns += 1;
                }
                61..=70 => {
                    m.reclaim_step();
                }
                71..=72 => {
                    // set_region_hva hostile
                    if let Some(r) = md.regions.first() {
                        let h = addr(&mut rng);
                        let ok = h.is_multiple_of(PAGE_SIZE)
                            && h.checked_add(r.size).is_some_and(|e| e <= ADDRESS_LIMIT);
                        let res = m.set_region_hva(r.id, h);
                        if res.is_ok() != ok {
                            return Err(format!(
                                "set_region_hva({h:#x}) = {res:?}, size {:#x}",
                                r.size
                            ));
                        }
                    }
                }
                _ => {
                    // lookups
                    for _ in 0..8 {
                        let g = if rng.below(2) == 0 || md.pages.is_empty() {
                            addr(&mut rng)
                        } else {
                            let k = rng.below(md.pages.len() as u64) as usize;
                            *md.pages.keys().nth(k).unwrap() + rng.below(PAGE_SIZE)
                        };
                        let got = m
                            .lookup(g)
                            .map(|tr| tr.hva + ((g & !(PAGE_SIZE - 1)) - tr.gpa));
                        let want = md.pages.get(&(g & !(PAGE_SIZE - 1))).map(|x| x.0);
                        if got != want {
                            return Err(format!("lookup({g:#x}) = {got:?}, model {want:?}"));
                        }
                    }
                    let mapped: u64 = md.pages.len() as u64 * PAGE_SIZE;
                    if m.mapped_bytes() != mapped {
                        return Err(format!("mapped_bytes {} model {mapped}", m.mapped_bytes()));
                    }
                    let per: u64 = m.regions().iter().map(|r| r.mapped_bytes).sum();
                    if per != mapped {
                        return Err(format!("regions() mapped {per} model {mapped}"));
                    }
                }
            }
            Ok(())
        }));
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("seed {seed:#x} step {step} op {op}: {e}")),
            Err(_) => return Err(format!("seed {seed:#x} step {step} op {op}: PANIC")),
        }
    }
    m.reclaim_all();
    if m.reclaim_pending() {
        return Err(format!("seed {seed:#x}: reclaim_pending after reclaim_all"));
    }
    Ok(())
}

#[test]
fn reference_model_with_hostile_inputs() {
    let seeds: u64 = std::env::var("ADV_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut counts = Counts::default();
    let mut fails = Vec::new();
    for s in 0..seeds {
        if let Err(e) = run(0x5EED_0000 + s * 7919, 400, &mut counts) {
            fails.push(e);
        }
    }
    eprintln!("model: {counts:?}, {} failing seeds", fails.len());
    for f in fails.iter().take(8) {
        eprintln!("  {f}");
    }
    assert!(fails.is_empty());
}
