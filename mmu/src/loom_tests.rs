//! loom models of the protocol: every interleaving of small configurations.
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p mmu --release --lib loom`.
//!
//! Page contents are modelled by a version number: a backing mirror bumps
//! it whenever it discards the page (invalidation or teardown), and a fault
//! "resolves" by reading it and installing `hva = version * PAGE_SIZE`. A
//! stale install is then visible as a translation whose version is not the
//! current one.

use crate::*;
use loom::sync::atomic::{AtomicU64, Ordering};
use std::sync::atomic::AtomicU64 as StdCounter;
use std::sync::Arc;

static REACHED_1: StdCounter = StdCounter::new(0);
static REACHED_2: StdCounter = StdCounter::new(0);
static REACHED_3: StdCounter = StdCounter::new(0);

/// Counts executions (across all of a model's interleavings) that took the
/// path a test is about, so a model that never reaches it fails.
fn reached(counter: &StdCounter, yes: bool) {
    if yes {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

const PAGE: u64 = 0x20_0000;

/// The backing: discarding the page makes a new version of it.
struct Backing {
    version: AtomicU64,
}

impl Mirror for Backing {
    fn name(&self) -> &str {
        "backing"
    }
    fn role(&self) -> MirrorRole {
        MirrorRole::Backing
    }
    fn invalidate_start(&self, _: &Invalidation) {
        self.version.fetch_add(1, Ordering::SeqCst);
    }
    fn invalidate_wait(&self, _: &Invalidation) {}
}

fn setup() -> (Arc<Mmu>, Arc<Backing>) {
    let m = Mmu::new(Config {
        background_reclaim: false,
        reclaim_batch: 1,
        reclaim_scan: 1,
        ..Config::default()
    })
    .unwrap();
    m.add_region(RegionSpec {
        name: "ram".into(),
        gpa: 0,
        size: 2 * HUGE_PAGE_SIZE,
        hva: 0,
    })
    .unwrap();
    let b = Arc::new(Backing {
        version: AtomicU64::new(1),
    });
    m.register_mirror(b.clone());
    (m, b)
}

/// One fault attempt on `gpa`; true if it installed.
fn fault_once(m: &Mmu, b: &Backing, gpa: u64) -> bool {
    let t = m.read_begin(gpa, PAGE_SIZE).unwrap();
    let v = b.version.load(Ordering::SeqCst);
    match m.install(&t, &[Translation::small(gpa, v * PAGE_SIZE)]) {
        Ok(_) => true,
        Err(Error::Stale) => false,
        Err(e) => panic!("{e}"),
    }
}

fn assert_fresh(m: &Mmu, b: &Backing, gpa: u64) {
    if let Some(t) = m.lookup(gpa) {
        assert_eq!(
            t.hva / PAGE_SIZE,
            b.version.load(Ordering::SeqCst),
            "a stale translation survived"
        );
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if std::env::var("LOOM_MAX_PREEMPTIONS").is_err() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

#[test]
fn loom_fault_vs_invalidate_never_installs_stale() {
    model(|| {
        let (m, b) = setup();
        let f = {
            let (m, b) = (m.clone(), b.clone());
            loom::thread::spawn(move || fault_once(&m, &b, PAGE))
        };
        m.invalidate(PAGE, PAGE_SIZE).unwrap();
        f.join().unwrap();
        assert_fresh(&m, &b, PAGE);
        reached(&REACHED_1, m.stats().snapshot().retries > 0);
    });
    assert!(
        REACHED_1.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no interleaving made the fault retry"
    );
}

#[test]
fn loom_fault_vs_teardown_never_installs_stale() {
    model(|| {
        let (m, b) = setup();
        let f = {
            let (m, b) = (m.clone(), b.clone());
            loom::thread::spawn(move || fault_once(&m, &b, PAGE))
        };
        m.teardown_all().unwrap();
        f.join().unwrap();
        assert_fresh(&m, &b, PAGE);
        reached(&REACHED_2, m.stats().snapshot().retries > 0);
    });
    assert!(
        REACHED_2.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no interleaving made the fault retry"
    );
}

#[test]
fn loom_fault_vs_reclaim_keeps_new_generation() {
    model(|| {
        let (m, b) = setup();
        assert!(fault_once(&m, &b, PAGE));
        m.teardown_all().unwrap();
        let r = {
            let m = m.clone();
            loom::thread::spawn(move || {
                m.reclaim_step();
                m.reclaim_step();
            })
        };
        let installed = fault_once(&m, &b, PAGE);
        r.join().unwrap();
        assert!(installed, "nothing invalidated after the teardown");
        assert_eq!(
            m.lookup(PAGE).map(|t| t.hva / PAGE_SIZE),
            Some(b.version.load(Ordering::SeqCst))
        );
        m.reclaim_all();
        assert!(!m.reclaim_pending());
        assert!(m.lookup(PAGE).is_some());
    });
}

/// The fault waits in `read_begin` while the invalidation is in flight: a
/// lost wake-up shows up as a loom deadlock.
#[test]
fn loom_read_begin_is_woken() {
    model(|| {
        let (m, b) = setup();
        let f = {
            let (m, b) = (m.clone(), b.clone());
            loom::thread::spawn(move || while !fault_once(&m, &b, PAGE) {})
        };
        m.invalidate(0, 2 * HUGE_PAGE_SIZE).unwrap();
        f.join().unwrap();
        assert_fresh(&m, &b, PAGE);
        reached(&REACHED_3, m.stats().snapshot().read_begin_waits > 0);
    });
    assert!(
        REACHED_3.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no interleaving made read_begin sleep"
    );
}

#[test]
fn loom_overlapping_invalidations_then_fault() {
    model(|| {
        let (m, b) = setup();
        assert!(fault_once(&m, &b, PAGE));
        let i = {
            let m = m.clone();
            loom::thread::spawn(move || {
                m.invalidate(PAGE, HUGE_PAGE_SIZE).unwrap();
            })
        };
        m.invalidate(PAGE, PAGE_SIZE).unwrap();
        i.join().unwrap();
        assert!(m.lookup(PAGE).is_none());
        assert!(fault_once(&m, &b, PAGE));
        assert_fresh(&m, &b, PAGE);
    });
}

// ---- the reclaimer's contract with mirrors (issue 10 items 1-3) ----------

static REACHED_4: StdCounter = StdCounter::new(0);
static REACHED_5: StdCounter = StdCounter::new(0);
static REACHED_6: StdCounter = StdCounter::new(0);
static REACHED_7: StdCounter = StdCounter::new(0);

/// A device (cache mirror) that records when it confirmed a generation
/// notice, and how many reclaim steps had finished when the notice started
/// and when it was confirmed.
struct Device {
    confirmed: AtomicU64,
    steps: Arc<AtomicU64>,
    steps_at_start: AtomicU64,
}

impl Mirror for Device {
    fn name(&self) -> &str {
        "device"
    }
    fn invalidate_start(&self, inv: &Invalidation) {
        if matches!(inv.kind, InvalidationKind::Generation { .. }) {
            let s = self.steps.load(Ordering::SeqCst);
            self.steps_at_start.store(s, Ordering::SeqCst);
        }
    }
    fn invalidate_wait(&self, inv: &Invalidation) {
        if matches!(inv.kind, InvalidationKind::Generation { .. }) {
            // A whole reclaim step ran while this notice was unconfirmed.
            let s = self.steps.load(Ordering::SeqCst);
            reached(&REACHED_4, s > self.steps_at_start.load(Ordering::SeqCst));
            self.confirmed.store(inv.id, Ordering::SeqCst);
        }
    }
}

/// The memory owner: releasing reclaimed memory before the device
/// confirmed the teardown would free memory under live DMA.
struct Releaser {
    device: Arc<Device>,
}

impl Mirror for Releaser {
    fn name(&self) -> &str {
        "releaser"
    }
    fn role(&self) -> MirrorRole {
        MirrorRole::Backing
    }
    fn invalidate_start(&self, _: &Invalidation) {}
    fn invalidate_wait(&self, _: &Invalidation) {}
    fn reclaimed(&self, _: &[Extent]) {
        // The model's only teardown takes sequence number 1.
        assert!(
            self.device.confirmed.load(Ordering::SeqCst) >= 1,
            "old memory released before the device confirmed the teardown"
        );
    }
}

/// Two 2 MiB slots; each step takes at most one leaf and examines at most
/// `scan` slots.
fn reclaim_setup(scan: usize) -> Arc<Mmu> {
    let m = Mmu::new(Config {
        background_reclaim: false,
        reclaim_batch: 1,
        reclaim_scan: scan,
        ..Config::default()
    })
    .unwrap();
    m.add_region(RegionSpec {
        name: "ram".into(),
        gpa: 0,
        size: 2 * HUGE_PAGE_SIZE,
        hva: 0,
    })
    .unwrap();
    m
}

fn install_page(m: &Mmu, gpa: u64) {
    let t = m.read_begin(gpa, PAGE_SIZE).unwrap();
    m.install(&t, &[Translation::small(gpa, gpa)]).unwrap();
}

/// Issue 10 item 1: the reclaimer runs while a teardown's fan-out is in
/// progress; no leaf of the old generation reaches a backing mirror's
/// `reclaimed` before the cache mirror's `invalidate_wait` returned.
#[test]
fn loom_reclaim_waits_for_the_cache_mirrors_confirmation() {
    model(|| {
        let m = reclaim_setup(1);
        let steps = Arc::new(AtomicU64::new(0));
        let device = Arc::new(Device {
            confirmed: AtomicU64::new(0),
            steps: steps.clone(),
            steps_at_start: AtomicU64::new(0),
        });
        m.register_mirror(device.clone());
        m.register_mirror(Arc::new(Releaser {
            device: device.clone(),
        }));
        install_page(&m, 0);
        let r = {
            let (m, steps) = (m.clone(), steps.clone());
            loom::thread::spawn(move || {
                for _ in 0..2 {
                    m.reclaim_step();
                    steps.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        m.teardown_all().unwrap();
        r.join().unwrap();
        m.reclaim_all();
        assert!(!m.reclaim_pending());
        assert_eq!(m.stats().snapshot().leaves_reclaimed, 1);
    });
    assert!(
        REACHED_4.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no reclaim step ran while the notice was unconfirmed"
    );
}

/// Calls after `unregister_mirror` returned are calls into freed memory.
struct Watched {
    unregistering: AtomicU64,
    freed: AtomicU64,
}

impl Watched {
    fn called(&self) {
        assert_eq!(
            self.freed.load(Ordering::SeqCst),
            0,
            "called after unregister_mirror returned"
        );
        reached(&REACHED_5, self.unregistering.load(Ordering::SeqCst) != 0);
    }
}

impl Mirror for Watched {
    fn name(&self) -> &str {
        "watched"
    }
    fn invalidate_start(&self, _: &Invalidation) {}
    fn invalidate_wait(&self, _: &Invalidation) {}
    fn reclaimed(&self, _: &[Extent]) {
        self.called();
    }
    fn generation_reclaimed(&self, _: RegionId, _: u64) {
        self.called();
    }
}

/// Issue 10 item 2: `unregister_mirror` races a reclaim step that already
/// took the mirror list; it returns only after that step's last call.
#[test]
fn loom_unregister_waits_for_a_reclaim_step() {
    model(|| {
        // One step both reclaims the leaf (in the last slot) and reports
        // the generation.
        let m = reclaim_setup(2);
        let w = Arc::new(Watched {
            unregistering: AtomicU64::new(0),
            freed: AtomicU64::new(0),
        });
        let id = m.register_mirror(w.clone());
        install_page(&m, HUGE_PAGE_SIZE);
        m.teardown_all().unwrap();
        let r = {
            let m = m.clone();
            loom::thread::spawn(move || {
                m.reclaim_step();
            })
        };
        w.unregistering.store(1, Ordering::SeqCst);
        m.unregister_mirror(id).unwrap();
        w.freed.store(1, Ordering::SeqCst);
        r.join().unwrap();
    });
    assert!(
        REACHED_5.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no reclaim step called the mirror while it was being unregistered"
    );
}

/// Counts reclaimed entries; the generation report must come after all.
struct Tally {
    entries: AtomicU64,
    expect: u64,
    reports: AtomicU64,
}

impl Mirror for Tally {
    fn name(&self) -> &str {
        "tally"
    }
    fn invalidate_start(&self, _: &Invalidation) {}
    fn invalidate_wait(&self, _: &Invalidation) {}
    fn reclaimed(&self, extents: &[Extent]) {
        let n: u64 = extents.iter().map(|e| e.len / PAGE_SIZE).sum();
        self.entries.fetch_add(n, Ordering::SeqCst);
    }
    fn generation_reclaimed(&self, _: RegionId, _: u64) {
        assert_eq!(
            self.entries.load(Ordering::SeqCst),
            self.expect,
            "generation reported reclaimed before its last batch"
        );
        self.reports.fetch_add(1, Ordering::SeqCst);
    }
}

/// Issue 10 item 3: two reclaim steps overlap (a background reclaimer and
/// a caller); `generation_reclaimed` still comes after every `reclaimed`
/// batch of that generation.
#[test]
fn loom_overlapping_reclaim_steps_report_the_generation_last() {
    model(|| {
        // The first step takes the leaf in slot 0; the second the one in
        // slot 1, completing the scan: it reports the generation.
        let m = reclaim_setup(2);
        let tally = Arc::new(Tally {
            entries: AtomicU64::new(0),
            expect: 2,
            reports: AtomicU64::new(0),
        });
        m.register_mirror(tally.clone());
        install_page(&m, 0);
        install_page(&m, HUGE_PAGE_SIZE);
        m.teardown_all().unwrap();
        let in_step = Arc::new(AtomicU64::new(0));
        let r = {
            let (m, in_step) = (m.clone(), in_step.clone());
            loom::thread::spawn(move || {
                in_step.store(1, Ordering::SeqCst);
                m.reclaim_step();
                in_step.store(0, Ordering::SeqCst);
            })
        };
        // The other thread is inside a step as this one starts.
        reached(&REACHED_6, in_step.load(Ordering::SeqCst) == 1);
        m.reclaim_step();
        r.join().unwrap();
        // One step slept until the other's last mirror call returned.
        reached(&REACHED_7, m.stats().snapshot().reclaim_waits > 0);
        m.reclaim_all();
        assert_eq!(tally.reports.load(Ordering::SeqCst), 1);
        assert_eq!(tally.entries.load(Ordering::SeqCst), 2);
    });
    assert!(
        REACHED_6.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the two reclaim steps never overlapped"
    );
    assert!(
        REACHED_7.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no reclaim step ever waited for the other"
    );
}
