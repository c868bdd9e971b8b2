//! Regressions for the reclaimer's contract with mirrors (issue 10 items
//! 1–3), on real threads through the public API; the loom models in
//! `src/loom_tests.rs` check the same rules in every interleaving of a small
//! configuration. Also: callbacks that would wait for themselves get
//! `Err(Reentrant)` instead of hanging.

use mmu::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// Long enough for a wrongly unblocked thread to run ahead.
const SETTLE: Duration = Duration::from_millis(50);

fn mmu(background: bool) -> Arc<Mmu> {
    Mmu::new(Config {
        background_reclaim: background,
        reclaim_batch: 1,
        reclaim_scan: 1,
        ..Config::default()
    })
    .unwrap()
}

/// One 4 KiB page in each of `slots` 2 MiB slots: `slots` leaves.
fn populate(m: &Mmu, slots: u64) {
    m.add_region(RegionSpec {
        name: "ram".into(),
        gpa: 0,
        size: 8 * MIB,
        hva: 0x1000_0000,
    })
    .unwrap();
    for s in 0..slots {
        let gpa = s * HUGE_PAGE_SIZE;
        m.fault_in(gpa, PAGE_SIZE, |t, out| {
            out.push(Translation::small(gpa, t.host_addr(gpa)?));
            Ok(())
        })
        .unwrap();
    }
}

/// A device whose `invalidate_wait` of a generation notice blocks until
/// the test releases it.
struct SlowDevice {
    entered: mpsc::SyncSender<()>,
    release: Mutex<mpsc::Receiver<()>>,
    confirmed: AtomicBool,
}

impl Mirror for SlowDevice {
    fn name(&self) -> &str {
        "slow-device"
    }
    fn invalidate_start(&self, _: &Invalidation) {}
    fn invalidate_wait(&self, inv: &Invalidation) {
        if matches!(inv.kind, InvalidationKind::Generation { .. }) {
            self.entered.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
            self.confirmed.store(true, Ordering::SeqCst);
        }
    }
}

/// Owns the memory: counts what it may release, and when.
struct Owner {
    device: Arc<SlowDevice>,
    early: AtomicU64,
    released: AtomicU64,
}

impl Mirror for Owner {
    fn name(&self) -> &str {
        "owner"
    }
    fn role(&self) -> MirrorRole {
        MirrorRole::Backing
    }
    fn invalidate_start(&self, _: &Invalidation) {}
    fn invalidate_wait(&self, _: &Invalidation) {}
    fn reclaimed(&self, extents: &[Extent]) {
        if !self.device.confirmed.load(Ordering::SeqCst) {
            self.early.fetch_add(1, Ordering::SeqCst);
        }
        let bytes: u64 = extents.iter().map(|e| e.len).sum();
        self.released.fetch_add(bytes, Ordering::SeqCst);
    }
}

/// Issue 10 item 1: while a device has not confirmed a teardown, neither
/// the background reclaimer nor a caller's `reclaim_all` hands the old
/// generation's memory to its owner.
#[test]
fn backing_memory_is_released_only_after_every_device_confirmed() {
    let m = mmu(true);
    populate(&m, 3);
    let (etx, erx) = mpsc::sync_channel(1);
    let (rtx, rrx) = mpsc::channel();
    let device = Arc::new(SlowDevice {
        entered: etx,
        release: Mutex::new(rrx),
        confirmed: AtomicBool::new(false),
    });
    let owner = Arc::new(Owner {
        device: device.clone(),
        early: AtomicU64::new(0),
        released: AtomicU64::new(0),
    });
    m.register_mirror(device.clone());
    m.register_mirror(owner.clone());
    let teardown = {
        let m = m.clone();
        std::thread::spawn(move || m.teardown_all().unwrap())
    };
    erx.recv().unwrap();
    // The generation moved; the device is still flushing.
    let p = m.reclaim_all();
    assert_eq!(p.leaves, 0, "leaves taken before the device confirmed");
    std::thread::sleep(SETTLE);
    assert!(m.reclaim_pending());
    assert_eq!(owner.released.load(Ordering::SeqCst), 0);
    rtx.send(()).unwrap();
    teardown.join().unwrap();
    m.reclaim_all();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while m.reclaim_pending() {
        assert!(std::time::Instant::now() < deadline, "reclaim never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(owner.early.load(Ordering::SeqCst), 0);
    assert_eq!(owner.released.load(Ordering::SeqCst), 3 * PAGE_SIZE);
}

/// A mirror whose first `reclaimed` call blocks until released; counts
/// entries once each call returns, and checks the generation report.
struct Stalling {
    entered: mpsc::SyncSender<()>,
    release: Mutex<mpsc::Receiver<()>>,
    blocked_once: AtomicBool,
    entries: AtomicU64,
    expect: u64,
    unregistered: AtomicBool,
    late_calls: AtomicU64,
    reports: AtomicU64,
}

impl Stalling {
    fn new(expect: u64) -> (Arc<Self>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (etx, erx) = mpsc::sync_channel(1);
        let (rtx, rrx) = mpsc::channel();
        let s = Arc::new(Stalling {
            entered: etx,
            release: Mutex::new(rrx),
            blocked_once: AtomicBool::new(false),
            entries: AtomicU64::new(0),
            expect,
            unregistered: AtomicBool::new(false),
            late_calls: AtomicU64::new(0),
            reports: AtomicU64::new(0),
        });
        (s, erx, rtx)
    }

    fn called(&self) {
        if self.unregistered.load(Ordering::SeqCst) {
            self.late_calls.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Mirror for Stalling {
    fn name(&self) -> &str {
        "stalling"
    }
    fn invalidate_start(&self, _: &Invalidation) {}
    fn invalidate_wait(&self, _: &Invalidation) {}
    fn reclaimed(&self, extents: &[Extent]) {
        self.called();
        if !self.blocked_once.swap(true, Ordering::SeqCst) {
            self.entered.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
        let n: u64 = extents.iter().map(|e| e.len / PAGE_SIZE).sum();
        self.entries.fetch_add(n, Ordering::SeqCst);
    }
    fn generation_reclaimed(&self, _: RegionId, _: u64) {
        self.called();
        assert_eq!(
            self.entries.load(Ordering::SeqCst),
            self.expect,
            "generation reported before its last reclaimed batch returned"
        );
        self.reports.fetch_add(1, Ordering::SeqCst);
    }
}

/// Issue 10 item 2: `unregister_mirror` returns only after a reclaim step
/// that took the mirror list before it has made its last call.
#[test]
fn unregister_waits_for_a_reclaim_step_in_flight() {
    let m = mmu(false);
    populate(&m, 2);
    let (mirror, entered, release) = Stalling::new(2);
    let id = m.register_mirror(mirror.clone());
    m.teardown_all().unwrap();
    let stepper = {
        let m = m.clone();
        std::thread::spawn(move || m.reclaim_all())
    };
    entered.recv().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let unreg = {
        let (m, done, mirror) = (m.clone(), done.clone(), mirror.clone());
        std::thread::spawn(move || {
            m.unregister_mirror(id).unwrap();
            mirror.unregistered.store(true, Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(SETTLE);
    assert!(
        !done.load(Ordering::SeqCst),
        "unregister returned while a reclaim step was inside the mirror"
    );
    release.send(()).unwrap();
    stepper.join().unwrap();
    unreg.join().unwrap();
    assert_eq!(mirror.late_calls.load(Ordering::SeqCst), 0);
    assert_eq!(m.mirror_count(), 0);
}

/// Issue 10 item 3: a caller's `reclaim_all` overlaps a step stalled inside
/// `reclaimed`; the generation is reported once, after both batches.
#[test]
fn overlapping_reclaim_steps_report_a_generation_after_its_last_batch() {
    let m = mmu(false);
    populate(&m, 2);
    let (mirror, entered, release) = Stalling::new(2);
    m.register_mirror(mirror.clone());
    m.teardown_all().unwrap();
    let first = {
        let m = m.clone();
        std::thread::spawn(move || m.reclaim_step())
    };
    entered.recv().unwrap();
    let second = {
        let m = m.clone();
        std::thread::spawn(move || m.reclaim_all())
    };
    std::thread::sleep(SETTLE);
    assert_eq!(mirror.reports.load(Ordering::SeqCst), 0);
    release.send(()).unwrap();
    first.join().unwrap();
    second.join().expect("generation reported too early");
    m.reclaim_all();
    assert_eq!(mirror.reports.load(Ordering::SeqCst), 1);
    assert_eq!(mirror.entries.load(Ordering::SeqCst), 2);
    assert!(m.stats().snapshot().reclaim_waits >= 1);
}

/// Calls back into the mmu from inside its callbacks.
struct Reentering {
    mmu: Mutex<Weak<Mmu>>,
    id: Mutex<Option<MirrorId>>,
    entries: AtomicU64,
    expect: u64,
    reports: AtomicU64,
    results: Mutex<Vec<String>>,
}

impl Reentering {
    fn mmu(&self) -> Arc<Mmu> {
        self.mmu.lock().unwrap().upgrade().unwrap()
    }

    fn record(&self, what: &str, r: Result<(), Error>) {
        self.results.lock().unwrap().push(format!("{what}: {r:?}"));
    }
}

impl Mirror for Reentering {
    fn name(&self) -> &str {
        "reentering"
    }
    fn invalidate_start(&self, inv: &Invalidation) {
        let m = self.mmu();
        let id = self.id.lock().unwrap().unwrap();
        self.record("unregister in invalidate", m.unregister_mirror(id));
        if let InvalidationKind::Range { gpa, len } = inv.kind {
            self.record(
                "read_begin in invalidate",
                m.read_begin(gpa, len).map(|_| ()),
            );
        }
    }
    fn invalidate_wait(&self, _: &Invalidation) {}
    fn reclaimed(&self, extents: &[Extent]) {
        let m = self.mmu();
        let id = self.id.lock().unwrap().unwrap();
        self.record("unregister in reclaimed", m.unregister_mirror(id));
        // Nested steps do nothing; the outer step still reports in order.
        m.reclaim_step();
        m.reclaim_all();
        let n: u64 = extents.iter().map(|e| e.len / PAGE_SIZE).sum();
        self.entries.fetch_add(n, Ordering::SeqCst);
    }
    fn generation_reclaimed(&self, _: RegionId, _: u64) {
        assert_eq!(
            self.entries.load(Ordering::SeqCst),
            self.expect,
            "generation reported before its last reclaimed batch returned"
        );
        self.reports.fetch_add(1, Ordering::SeqCst);
    }
}

/// Issue 10 item 3 (a step from inside a callback) and the self-waits a
/// callback could otherwise fall into: `unregister_mirror` and an
/// overlapping `read_begin` from inside an invalidation, and
/// `unregister_mirror`/`reclaim_*` from inside `reclaimed`.
#[test]
fn callbacks_calling_back_never_wait_for_themselves() {
    let m = mmu(false);
    populate(&m, 2);
    let mirror = Arc::new(Reentering {
        mmu: Mutex::new(Arc::downgrade(&m)),
        id: Mutex::new(None),
        entries: AtomicU64::new(0),
        expect: 2,
        reports: AtomicU64::new(0),
        results: Mutex::new(Vec::new()),
    });
    let id = m.register_mirror(mirror.clone());
    *mirror.id.lock().unwrap() = Some(id);
    m.invalidate(4 * MIB, PAGE_SIZE).unwrap();
    m.teardown_all().unwrap();
    m.reclaim_all();
    assert!(!m.reclaim_pending());
    assert_eq!(mirror.reports.load(Ordering::SeqCst), 1);
    let results = mirror.results.lock().unwrap().clone();
    let reentrant = |what: &str| {
        results
            .iter()
            .filter(|r| r.starts_with(what))
            .all(|r| r.contains("Reentrant"))
            && results.iter().any(|r| r.starts_with(what))
    };
    assert!(reentrant("unregister in invalidate"), "{results:?}");
    assert!(reentrant("read_begin in invalidate"), "{results:?}");
    assert!(reentrant("unregister in reclaimed"), "{results:?}");
    // Still registered: a refused unregister changes nothing.
    assert_eq!(m.mirror_count(), 1);
    m.unregister_mirror(id).unwrap();
}

/// A step that has taken the last obsolete leaf but not yet told the
/// mirrors about it is still reclaim in progress: `reclaim_pending` stays
/// true until `reclaimed` has returned and the statistics count the leaf,
/// so a caller that waits for `!reclaim_pending()` (the teardown bench,
/// a VMM giving memory back) never runs ahead of the mirrors.
#[test]
fn reclaim_is_pending_until_the_mirrors_are_told() {
    // Default batch and scan: one step takes the leaf and finishes the
    // generation, so nothing obsolete is left in the table meanwhile.
    let m = Mmu::new(Config {
        background_reclaim: false,
        ..Config::default()
    })
    .unwrap();
    populate(&m, 1);
    let (mirror, entered, release) = Stalling::new(1);
    m.register_mirror(mirror.clone());
    m.teardown_all().unwrap();
    assert!(m.reclaim_pending());
    let stepper = {
        let m = m.clone();
        std::thread::spawn(move || m.reclaim_all())
    };
    entered.recv().unwrap();
    // The only leaf is detached and the step is inside `reclaimed`.
    assert!(
        m.reclaim_pending(),
        "reclaim reported done while a mirror had not been told"
    );
    assert_eq!(m.stats().snapshot().leaves_reclaimed, 0);
    release.send(()).unwrap();
    assert_eq!(stepper.join().unwrap().leaves, 1);
    assert!(!m.reclaim_pending());
    assert_eq!(m.stats().snapshot().leaves_reclaimed, 1);
    assert_eq!(mirror.entries.load(Ordering::SeqCst), 1);
    assert_eq!(mirror.reports.load(Ordering::SeqCst), 1);
}
