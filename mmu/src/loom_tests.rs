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
