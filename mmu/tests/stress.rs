//! Multi-threaded stress with stamped pages.
//!
//! Every page's content is modelled by a version: the backing mirror bumps a
//! page's version when it discards the page (range invalidation) and bumps a
//! global epoch on a teardown. Faults install `hva = stamp(version, page)`.
//! A device-like cache mirror keeps its own table filled through the fault
//! protocol and, on every use of an entry, checks that the version it
//! recorded is still the page's current version. After its `wait` returns
//! for a range it must never use that range again until a newer install.

use mmu::*;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BASE: u64 = 2 * MIB;
const PAGES: u64 = 8192;

fn stamp(version: u64, page: u64) -> u64 {
    (version << 26) | (page << 12)
}
fn unstamp(hva: u64) -> u64 {
    hva >> 26
}

struct Backing {
    epoch: AtomicU64,
    pages: Vec<AtomicU64>,
}

impl Backing {
    fn version(&self, page: u64) -> u64 {
        (self.epoch.load(Ordering::SeqCst) << 20) | self.pages[page as usize].load(Ordering::SeqCst)
    }
}

impl Mirror for Backing {
    fn name(&self) -> &str {
        "backing"
    }
    fn role(&self) -> MirrorRole {
        MirrorRole::Backing
    }
    fn invalidate_start(&self, inv: &Invalidation) {
        match inv.kind {
            InvalidationKind::Range { gpa, len } => {
                for p in (gpa - BASE) / PAGE_SIZE..(gpa - BASE + len) / PAGE_SIZE {
                    self.pages[p as usize].fetch_add(1, Ordering::SeqCst);
                }
            }
            InvalidationKind::Generation { .. } => {
                self.epoch.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    fn invalidate_wait(&self, _: &Invalidation) {}
}

#[derive(Clone, Copy)]
struct DevEntry {
    version: u64,
    gen: u64,
}

struct DevTable {
    gen: u64,
    entries: Vec<Option<DevEntry>>,
}

/// A device with its own page table (an RNIC's, in effect).
struct Device {
    table: Mutex<DevTable>,
    zap_starts: AtomicU64,
}

impl Mirror for Device {
    fn name(&self) -> &str {
        "device"
    }
    fn invalidate_start(&self, _: &Invalidation) {
        self.zap_starts.fetch_add(1, Ordering::Relaxed);
    }
    fn invalidate_wait(&self, inv: &Invalidation) {
        let mut t = self.table.lock();
        match inv.kind {
            InvalidationKind::Range { gpa, len } => {
                for p in (gpa - BASE) / PAGE_SIZE..(gpa - BASE + len) / PAGE_SIZE {
                    t.entries[p as usize] = None;
                }
            }
            InvalidationKind::Generation { .. } => t.gen += 1,
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn resolve(m: &Mmu, b: &Backing, gpa: u64) -> Result<FaultOutcome, Error> {
    m.fault_in(gpa, PAGE_SIZE, |t, out| {
        let page = (t.gpa() - BASE) / PAGE_SIZE;
        out.push(Translation::small(t.gpa(), stamp(b.version(page), page)));
        Ok(())
    })
}

#[test]
fn stamped_pages_are_never_used_stale() {
    let m = Mmu::new(Config::default()).unwrap();
    m.add_region(RegionSpec {
        name: "ram".into(),
        gpa: BASE,
        size: PAGES * PAGE_SIZE,
        hva: 0,
    })
    .unwrap();
    let backing = Arc::new(Backing {
        epoch: AtomicU64::new(1),
        pages: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
    });
    let dev = Arc::new(Device {
        table: Mutex::new(DevTable {
            gen: 0,
            entries: vec![None; PAGES as usize],
        }),
        zap_starts: AtomicU64::new(0),
    });
    m.register_mirror(backing.clone());
    m.register_mirror(dev.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let uses = Arc::new(AtomicU64::new(0));
    let stale = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    // Device workers: fault pages into the device table, then use them.
    for seed in 1..=2u64 {
        let (m, b, dev, stop, uses, stale) = (
            m.clone(),
            backing.clone(),
            dev.clone(),
            stop.clone(),
            uses.clone(),
            stale.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            while !stop.load(Ordering::Relaxed) {
                let page = rng.next() % PAGES;
                let gpa = BASE + page * PAGE_SIZE;
                {
                    let t = dev.table.lock();
                    if let Some(e) = t.entries[page as usize].filter(|e| e.gen == t.gen) {
                        uses.fetch_add(1, Ordering::Relaxed);
                        if e.version != b.version(page) {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                }
                // Device fault: the ib_umem_odp_map_dma_and_lock shape.
                loop {
                    let ticket = m.read_begin(gpa, PAGE_SIZE).unwrap();
                    let tr = match m.translate(&ticket, gpa) {
                        Err(Error::Stale) => continue,
                        Err(e) => panic!("{e}"),
                        Ok(Some(tr)) => tr,
                        Ok(None) => {
                            resolve(&m, &b, gpa).unwrap();
                            continue;
                        }
                    };
                    let mut t = dev.table.lock();
                    if m.read_retry(&ticket) {
                        continue;
                    }
                    let gen = t.gen;
                    t.entries[page as usize] = Some(DevEntry {
                        version: unstamp(tr.hva),
                        gen,
                    });
                    break;
                }
            }
        }));
    }
    // A vCPU-like faulter straight into the mmu.
    {
        let (m, b, stop) = (m.clone(), backing.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(77);
            while !stop.load(Ordering::Relaxed) {
                let page = rng.next() % PAGES;
                resolve(&m, &b, BASE + page * PAGE_SIZE).unwrap();
            }
        }));
    }
    // Invalidator and teardowns.
    {
        let (m, stop) = (m.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(4242);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if n.is_multiple_of(200) {
                    m.teardown_all().unwrap();
                } else {
                    let page = rng.next() % PAGES;
                    let pages = 1 + rng.next() % 64.min(PAGES - page);
                    m.invalidate(BASE + page * PAGE_SIZE, pages * PAGE_SIZE)
                        .unwrap();
                }
            }
        }));
    }

    let run = std::env::var("MMU_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let deadline = Instant::now() + Duration::from_secs(run);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }

    // Quiescent: every translation still in the table is current.
    for page in 0..PAGES {
        if let Some(tr) = m.lookup(BASE + page * PAGE_SIZE) {
            assert_eq!(unstamp(tr.hva), backing.version(page), "page {page}");
        }
    }
    let s = m.stats().snapshot();
    println!(
        "uses {} stale {} faults {} retries {} invalidations {} teardowns {} reclaimed {} lock p99.9 {} ns",
        uses.load(Ordering::Relaxed),
        stale.load(Ordering::Relaxed),
        s.faults,
        s.retries,
        s.invalidations,
        s.teardowns,
        s.entries_reclaimed,
        s.lock_hold_ns.p999
    );
    assert_eq!(
        stale.load(Ordering::Relaxed),
        0,
        "the device used a stale page"
    );
    assert!(uses.load(Ordering::Relaxed) > 1000);
    assert!(s.invalidations > 100 && s.teardowns > 0);
    assert!(dev.zap_starts.load(Ordering::Relaxed) > 100);
}
