//! Unit tests of the protocol on real threads.

use crate::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn mmu() -> Arc<Mmu> {
    Mmu::new(Config {
        background_reclaim: false,
        ..Config::default()
    })
    .unwrap()
}

fn region(m: &Mmu, gpa: u64, size: u64, hva: u64) -> RegionId {
    m.add_region(RegionSpec {
        name: format!("r{gpa:#x}"),
        gpa,
        size,
        hva,
    })
    .unwrap()
}

fn fault(m: &Mmu, gpa: u64, pages: u64) {
    m.fault_in(gpa, pages * PAGE_SIZE, |t, out| {
        for p in 0..pages {
            let g = t.gpa() + p * PAGE_SIZE;
            out.push(Translation::small(g, t.host_addr(g).unwrap()));
        }
        Ok(())
    })
    .unwrap();
}

/// Records every call, in order.
#[derive(Default)]
struct Recorder {
    name: String,
    role: MirrorRole,
    log: Arc<Mutex<Vec<String>>>,
    reclaimed: AtomicU64,
    finished: Mutex<Vec<(RegionId, u64)>>,
}

impl Mirror for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn role(&self) -> MirrorRole {
        self.role
    }
    fn invalidate_start(&self, inv: &Invalidation) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:start:{}", self.name, inv.id));
    }
    fn invalidate_wait(&self, inv: &Invalidation) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:wait:{}", self.name, inv.id));
    }
    fn reclaimed(&self, extents: &[Extent]) {
        let bytes: u64 = extents.iter().map(|e| e.len).sum();
        self.reclaimed.fetch_add(bytes, Ordering::Relaxed);
    }
    fn generation_reclaimed(&self, region: RegionId, below: u64) {
        self.finished.lock().unwrap().push((region, below));
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let m = mmu();
    let spec = |gpa, size, hva| RegionSpec {
        name: "x".into(),
        gpa,
        size,
        hva,
    };
    assert!(matches!(
        m.add_region(spec(1, MIB, 0)),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        m.add_region(spec(0, 100, 0)),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        m.add_region(spec(0, MIB, 12)),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        m.add_region(spec(0, 0, 0)),
        Err(Error::EmptyRange { .. })
    ));
    assert!(matches!(
        m.add_region(spec(u64::MAX - 4095, 8192, 0)),
        Err(Error::Overflow { .. })
    ));
    region(&m, 0, 4 * MIB, 0x1000_0000);
    let e = m.add_region(spec(2 * MIB, 4 * MIB, 0)).unwrap_err();
    assert!(matches!(e, Error::RegionOverlap { .. }), "{e}");
    assert!(e.to_string().contains("overlaps"));
    assert!(matches!(
        m.read_begin(8 * MIB, PAGE_SIZE),
        Err(Error::OutsideRegions { .. })
    ));
    assert!(matches!(
        m.read_begin(3 * MIB, 2 * MIB),
        Err(Error::OutsideRegions { .. })
    ));
    assert!(matches!(
        m.read_begin(100, PAGE_SIZE),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        m.invalidate(2 * MIB, 4 * MIB),
        Err(Error::OutsideRegions { .. })
    ));
    assert!(matches!(m.invalidate(0, 0), Err(Error::EmptyRange { .. })));
    assert!(matches!(
        m.teardown_region(RegionId(99)),
        Err(Error::NoSuchRegion(_))
    ));
    let t = m.read_begin(0, PAGE_SIZE).unwrap();
    assert!(matches!(
        m.install(&t, &[Translation::small(PAGE_SIZE, 0)]),
        Err(Error::OutsideTicket { .. })
    ));
    assert!(matches!(
        m.install(&t, &[Translation::small(0, 0x123)]),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        m.unregister_mirror(MirrorId(7)),
        Err(Error::NoSuchMirror(7))
    ));
}

#[test]
fn fault_installs_and_lookup_sees_it() {
    let m = mmu();
    region(&m, 2 * MIB, 8 * MIB, 0x7000_0000);
    fault(&m, 3 * MIB, 4);
    let t = m.lookup(3 * MIB + PAGE_SIZE + 5).unwrap();
    assert_eq!(t.gpa, 3 * MIB + PAGE_SIZE);
    assert_eq!(t.hva, 0x7000_0000 + MIB + PAGE_SIZE);
    assert_eq!(m.lookup(3 * MIB + 4 * PAGE_SIZE), None);
    assert_eq!(m.mapped_bytes(), 4 * PAGE_SIZE);
    let s = m.stats().snapshot();
    assert_eq!((s.faults, s.installed, s.retries), (1, 4, 0));
}

#[test]
fn install_after_an_overlapping_invalidation_is_stale() {
    let m = mmu();
    region(&m, 0, 4 * MIB, 0x1000_0000);
    let t = m.read_begin(0, 2 * PAGE_SIZE).unwrap();
    let other = m.read_begin(MIB, PAGE_SIZE).unwrap();
    m.invalidate(PAGE_SIZE, PAGE_SIZE).unwrap();
    assert!(m.read_retry(&t));
    assert_eq!(
        m.install(&t, &[Translation::small(0, 0x1000_0000)]),
        Err(Error::Stale)
    );
    assert_eq!(m.translate(&t, 0), Err(Error::Stale));
    // A disjoint invalidation does not disturb the other ticket.
    assert!(!m.read_retry(&other));
    assert_eq!(
        m.install(&other, &[Translation::small(MIB, 0x1010_0000)]),
        Ok(1)
    );
    assert_eq!(m.lookup(0), None);
    assert_eq!(m.stats().snapshot().retries, 1);
}

#[test]
fn a_ticket_older_than_the_log_is_conservatively_stale() {
    let m = mmu();
    region(&m, 0, 4 * MIB, 0x1000_0000);
    let t = m.read_begin(0, PAGE_SIZE).unwrap();
    for _ in 0..65 {
        m.invalidate(MIB, PAGE_SIZE).unwrap(); // never overlaps t
    }
    assert!(m.read_retry(&t));
}

#[test]
fn invalidation_zaps_exactly_its_range() {
    let m = mmu();
    region(&m, 0, 8 * MIB, 0x1000_0000);
    fault(&m, 0, 1024); // 4 MiB, two leaves
    assert_eq!(m.invalidate(MIB, 2 * MIB).unwrap(), 512);
    for page in 0..1024u64 {
        let gpa = page * PAGE_SIZE;
        let gone = (MIB..3 * MIB).contains(&gpa);
        assert_eq!(m.lookup(gpa).is_none(), gone, "page {page}");
    }
    assert_eq!(m.mapped_bytes(), 2 * MIB);
}

#[test]
fn invalidation_across_regions_and_huge_split() {
    let m = mmu();
    region(&m, 0, 4 * MIB, 0x4000_0000);
    region(&m, 4 * MIB, 4 * MIB, 0x8000_0000);
    let t = m.read_begin(2 * MIB, 2 * MIB).unwrap();
    m.install(&t, &[Translation::huge(2 * MIB, 0x4020_0000)])
        .unwrap();
    fault(&m, 4 * MIB, 16);
    assert_eq!(m.lookup(3 * MIB).unwrap().size, PageSize::Huge);
    // Zap the last 8 KiB of the huge page and the first page of region 2.
    m.invalidate(4 * MIB - 2 * PAGE_SIZE, 3 * PAGE_SIZE)
        .unwrap();
    let kept = m.lookup(4 * MIB - 3 * PAGE_SIZE).unwrap();
    assert_eq!(kept.size, PageSize::Small);
    assert_eq!(kept.hva, 0x4020_0000 + 2 * MIB - 3 * PAGE_SIZE);
    assert_eq!(m.lookup(2 * MIB).unwrap().hva, 0x4020_0000);
    assert!(m.lookup(4 * MIB - PAGE_SIZE).is_none());
    assert!(m.lookup(4 * MIB).is_none());
    assert!(m.lookup(4 * MIB + PAGE_SIZE).is_some());
    assert_eq!(m.mapped_bytes(), 2 * MIB - 2 * PAGE_SIZE + 15 * PAGE_SIZE);
    // A whole huge entry goes in one piece.
    let t = m.read_begin(0, 2 * MIB).unwrap();
    m.install(&t, &[Translation::huge(0, 0x4000_0000)]).unwrap();
    m.invalidate(0, 2 * MIB).unwrap();
    assert!(m.lookup(0).is_none());
}

#[test]
fn teardown_hides_everything_then_reclaim_frees_in_bounded_batches() {
    let m = Mmu::new(Config {
        background_reclaim: false,
        reclaim_batch: 3,
        ..Config::default()
    })
    .unwrap();
    let rec = Arc::new(Recorder {
        name: "rec".into(),
        ..Default::default()
    });
    m.register_mirror(rec.clone());
    let r = region(&m, 0, 64 * MIB, 0x1_0000_0000);
    fault(&m, 0, 512 * 10); // ten leaves
    let before = m.lookup(5 * MIB).unwrap();
    let report = m.teardown_all().unwrap();
    assert!(m.lookup(5 * MIB).is_none());
    assert_eq!(m.mapped_bytes(), 0);
    assert!(rec
        .log
        .lock()
        .unwrap()
        .contains(&format!("rec:wait:{}", report.id)));
    // New faults see the new generation while old leaves are still around.
    fault(&m, 5 * MIB, 1);
    assert_eq!(m.lookup(5 * MIB).unwrap().hva, before.hva);
    assert!(m.reclaim_pending());
    let mut leaves = 0;
    loop {
        let p = m.reclaim_step();
        assert!(p.leaves <= 3);
        leaves += p.leaves;
        if !p.more {
            break;
        }
    }
    assert_eq!(leaves, 10);
    assert_eq!(rec.reclaimed.load(Ordering::Relaxed), 10 * 2 * MIB);
    assert_eq!(*rec.finished.lock().unwrap(), vec![(r, report.generation)]);
    assert!(!m.reclaim_pending());
    // The page faulted after the teardown survived the reclaim.
    assert!(m.lookup(5 * MIB).is_some());
    let s = m.stats().snapshot();
    assert_eq!(
        (s.teardowns, s.leaves_reclaimed, s.entries_reclaimed),
        (1, 10, 5120)
    );
    assert!(s.reclaim_hold_ns.count > 0);
}

#[test]
fn teardown_of_one_region_spares_the_others_and_remove_frees_it() {
    let m = mmu();
    let a = region(&m, 0, 4 * MIB, 0x1000_0000);
    let b = region(&m, 4 * MIB, 4 * MIB, 0x2000_0000);
    fault(&m, 0, 4);
    fault(&m, 4 * MIB, 4);
    m.teardown_region(a).unwrap();
    assert!(m.lookup(0).is_none());
    assert!(m.lookup(4 * MIB).is_some());
    m.remove_region(b).unwrap();
    assert!(m.lookup(4 * MIB).is_none());
    assert!(matches!(
        m.read_begin(4 * MIB, PAGE_SIZE),
        Err(Error::OutsideRegions { .. })
    ));
    // The range can be registered again at once.
    let c = region(&m, 4 * MIB, 2 * MIB, 0x3000_0000);
    fault(&m, 4 * MIB, 1);
    m.reclaim_all();
    assert_eq!(m.regions().len(), 2);
    assert_eq!(m.lookup(4 * MIB).unwrap().hva, 0x3000_0000);
    assert!(m.regions().iter().any(|r| r.id == c));
}

#[test]
fn fan_out_is_two_pass_caches_before_backing() {
    let m = mmu();
    region(&m, 0, 4 * MIB, 0x1000_0000);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mk = |name: &str, role| {
        Arc::new(Recorder {
            name: name.into(),
            role,
            log: log.clone(),
            ..Default::default()
        })
    };
    m.register_mirror(mk("kvm", MirrorRole::Backing));
    m.register_mirror(mk("nic0", MirrorRole::Cache));
    m.register_mirror(mk("nic1", MirrorRole::Cache));
    let id = m.invalidate(0, PAGE_SIZE).map(|_| 1).unwrap();
    assert_eq!(id, 1);
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            "nic0:start:1",
            "nic1:start:1",
            "nic0:wait:1",
            "nic1:wait:1",
            "kvm:start:1",
            "kvm:wait:1"
        ]
    );
}

/// A mirror whose wait blocks until the test releases it.
struct Gate {
    entered: mpsc::SyncSender<u64>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Mirror for Gate {
    fn name(&self) -> &str {
        "gate"
    }
    fn invalidate_start(&self, inv: &Invalidation) {
        self.entered.send(inv.id).unwrap();
    }
    fn invalidate_wait(&self, _: &Invalidation) {
        self.release.lock().unwrap().recv().unwrap();
    }
}

#[test]
fn read_begin_sleeps_while_an_overlapping_invalidation_runs() {
    let m = mmu();
    region(&m, 0, 4 * MIB, 0x1000_0000);
    let (etx, erx) = mpsc::sync_channel(4);
    let (rtx, rrx) = mpsc::channel();
    m.register_mirror(Arc::new(Gate {
        entered: etx,
        release: Mutex::new(rrx),
    }));
    let inv = {
        let m = m.clone();
        std::thread::spawn(move || m.invalidate(0, MIB).unwrap())
    };
    erx.recv().unwrap(); // the invalidation is in flight
    assert!(matches!(
        m.try_read_begin(0, PAGE_SIZE),
        Err(Error::Busy { .. })
    ));
    // A disjoint range is not held up.
    m.read_begin(2 * MIB, PAGE_SIZE).unwrap();
    let got = Arc::new(AtomicBool::new(false));
    let reader = {
        let (m, got) = (m.clone(), got.clone());
        std::thread::spawn(move || {
            let t = m.read_begin(PAGE_SIZE, PAGE_SIZE).unwrap();
            got.store(true, Ordering::SeqCst);
            t
        })
    };
    // The reader counts a wait before it sleeps; on a loaded host it may
    // not even run within a fixed delay (this test once failed that way).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while m.stats().snapshot().read_begin_waits == 0 {
        assert!(std::time::Instant::now() < deadline, "reader never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !got.load(Ordering::SeqCst),
        "read_begin returned during the invalidation"
    );
    rtx.send(()).unwrap();
    inv.join().unwrap();
    let t = reader.join().unwrap();
    assert!(!m.read_retry(&t));
    assert!(m.stats().snapshot().read_begin_waits >= 1);
}

#[test]
fn unregister_waits_for_invalidations_that_may_call_the_mirror() {
    let m = mmu();
    region(&m, 0, 4 * MIB, 0x1000_0000);
    let (etx, erx) = mpsc::sync_channel(4);
    let (rtx, rrx) = mpsc::channel();
    let id = m.register_mirror(Arc::new(Gate {
        entered: etx,
        release: Mutex::new(rrx),
    }));
    let inv = {
        let m = m.clone();
        std::thread::spawn(move || m.invalidate(0, MIB).unwrap())
    };
    erx.recv().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let unreg = {
        let (m, done) = (m.clone(), done.clone());
        std::thread::spawn(move || {
            m.unregister_mirror(id).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst));
    rtx.send(()).unwrap();
    inv.join().unwrap();
    unreg.join().unwrap();
    assert_eq!(m.mirror_count(), 0);
    // No longer called.
    m.invalidate(0, MIB).unwrap();
}

#[test]
fn background_reclaimer_finishes_and_mmu_drops_cleanly() {
    let m = Mmu::new(Config::default()).unwrap();
    region(&m, 0, 64 * MIB, 0x1_0000_0000);
    fault(&m, 0, 512 * 8);
    m.teardown_all().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while m.reclaim_pending() {
        assert!(
            std::time::Instant::now() < deadline,
            "reclaimer never finished"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(m.stats().snapshot().leaves_reclaimed, 8);
    drop(m);
}

#[test]
fn walk_baseline_zaps_everything() {
    let m = mmu();
    region(&m, 0, 8 * MIB, 0x1000_0000);
    fault(&m, 0, 1500);
    m.teardown_all_by_walk().unwrap();
    assert_eq!(m.mapped_bytes(), 0);
    assert!(m.lookup(0).is_none());
    assert_eq!(m.stats().snapshot().entries_zapped, 1500);
    fault(&m, 0, 1);
    assert!(m.lookup(0).is_some());
}

#[test]
fn mutex_policy_runs_the_same_protocol() {
    let m = Mmu::new(Config {
        lock: LockPolicy::Mutex,
        background_reclaim: false,
        ..Config::default()
    })
    .unwrap();
    assert_eq!(m.lock_policy(), LockPolicy::Mutex);
    region(&m, 0, 4 * MIB, 0x1000_0000);
    fault(&m, 0, 8);
    m.teardown_all().unwrap();
    assert!(m.lookup(0).is_none());
    m.reclaim_all();
}

#[test]
fn direct_resolver_installs_the_region_mapping() {
    let m = mmu();
    region(&m, 0, 4 * MIB, 0x5000_0000);
    DirectResolver::new(m.clone())
        .resolve(MIB, 2 * PAGE_SIZE, true)
        .unwrap();
    assert_eq!(m.lookup(MIB + PAGE_SIZE).unwrap().hva, 0x5010_1000);
}

#[test]
fn translate_range_stops_at_the_first_hole() {
    let m = mmu();
    region(&m, 0, 4 * MIB, 0x1000_0000);
    fault(&m, 0, 3);
    let t = m.read_begin(0, 8 * PAGE_SIZE).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        m.translate_range(&t, 0, 8 * PAGE_SIZE, &mut out),
        Ok(Some(3 * PAGE_SIZE))
    );
    assert_eq!(
        out,
        vec![(0, 0x1000_0000), (4096, 0x1000_1000), (8192, 0x1000_2000)]
    );
    m.invalidate(0, PAGE_SIZE).unwrap();
    assert_eq!(
        m.translate_range(&t, 0, PAGE_SIZE, &mut out),
        Err(Error::Stale)
    );
    // A teardown flags readers of its range as such.
    let (etx, erx) = mpsc::sync_channel(1);
    let (rtx, rrx) = mpsc::channel();
    m.register_mirror(Arc::new(Gate {
        entered: etx,
        release: Mutex::new(rrx),
    }));
    let td = {
        let m = m.clone();
        std::thread::spawn(move || m.teardown_all().unwrap())
    };
    erx.recv().unwrap();
    assert!(matches!(
        m.try_read_begin(0, PAGE_SIZE),
        Err(Error::Busy { teardown: true, .. })
    ));
    rtx.send(()).unwrap();
    td.join().unwrap();
}
