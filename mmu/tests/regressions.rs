//! Regressions found by an adversarial review of the public API (branch
//! `adv-mmu`). Each test failed (panic, abort or hang) before its fix; the
//! comment names the bug it guards against. Everything is bounded by
//! timeouts: a hang is reported as a failure, not waited for.

use mmu::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn mmu(background: bool) -> Arc<Mmu> {
    Mmu::new(Config {
        background_reclaim: background,
        ..Config::default()
    })
    .unwrap()
}

fn spec(gpa: u64, size: u64, hva: u64) -> RegionSpec {
    RegionSpec {
        name: format!("r{gpa:#x}"),
        gpa,
        size,
        hva,
    }
}

/// Run `f` on its own thread; `None` if it did not finish in `secs`
/// (the thread is then left behind, blocked: the test fails anyway).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

#[derive(Default)]
struct Recorder {
    name: &'static str,
    role: MirrorRole,
    reclaimed: Mutex<Vec<Extent>>,
    invalidations: Mutex<Vec<Invalidation>>,
    panic_on_start: AtomicBool,
    panic_on_reclaimed: AtomicBool,
}

impl Mirror for Recorder {
    fn name(&self) -> &str {
        self.name
    }
    fn role(&self) -> MirrorRole {
        self.role
    }
    fn invalidate_start(&self, inv: &Invalidation) {
        if self.panic_on_start.swap(false, SeqCst) {
            panic!("adversary: device driver bug in invalidate_start");
        }
        self.invalidations.lock().unwrap().push(inv.clone());
    }
    fn invalidate_wait(&self, _inv: &Invalidation) {}
    fn reclaimed(&self, extents: &[Extent]) {
        if self.panic_on_reclaimed.swap(false, SeqCst) {
            panic!("adversary: bug in reclaimed");
        }
        self.reclaimed.lock().unwrap().extend_from_slice(extents);
    }
}

// ---------------------------------------------------------------------
// Guarantee 5: a translation's host address is not checked against
// anything but alignment, and the reclaimer's extent coalescing adds
// `hva + len` unchecked.
// ---------------------------------------------------------------------

/// Guards: `install` accepted host addresses near `u64::MAX`; the reclaimer
/// then merged `[2^64 - 4 KiB, 2^64)` and `[0, 4 KiB)` into one extent the
/// Backing mirror was told to release (with overflow checks `reclaim_all`
/// panicked in `push_extent`). Now `install` refuses host pages not below
/// `ADDRESS_LIMIT`, and extents never merge across a wrap.
#[test]
fn install_refuses_host_pages_past_the_limit_and_extents_never_wrap() {
    let m = mmu(false);
    let r = m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    let backing = Arc::new(Recorder {
        name: "backing",
        role: MirrorRole::Backing,
        ..Default::default()
    });
    m.register_mirror(backing.clone());
    let g = 2 * MIB - PAGE_SIZE;
    let t = m.read_begin(g, 2 * PAGE_SIZE).unwrap();
    let top = !(PAGE_SIZE - 1); // the last page below 2^64
    let installed = m.install(
        &t,
        &[
            Translation::small(g, top),
            Translation::small(g + PAGE_SIZE, 0),
        ],
    );
    assert!(
        matches!(installed, Err(Error::AboveLimit { .. })),
        "{installed:?}"
    );
    // The last host page below the limit is fine, and next to a page at 0
    // it stays its own extent.
    let last = ADDRESS_LIMIT - PAGE_SIZE;
    m.install(
        &t,
        &[
            Translation::small(g, last),
            Translation::small(g + PAGE_SIZE, 0),
        ],
    )
    .unwrap();
    m.teardown_region(r).unwrap();
    let res = catch_unwind(AssertUnwindSafe(|| m.reclaim_all()));
    assert!(
        res.is_ok(),
        "reclaim_all panicked (overflow in push_extent)"
    );
    let ext = backing.reclaimed.lock().unwrap().clone();
    assert_eq!(
        ext,
        vec![
            Extent {
                region: r,
                gpa: g,
                hva: last,
                len: PAGE_SIZE
            },
            Extent {
                region: r,
                gpa: g + PAGE_SIZE,
                hva: 0,
                len: PAGE_SIZE
            },
        ],
        "the two pages are not host-contiguous"
    );
}

/// Guards: a huge page at host `2^64 - 2 MiB` followed by any page in the
/// same reclaim batch overflowed `last.hva + last.len` (panic with overflow
/// checks). Now refused by `install`.
#[test]
fn install_refuses_a_huge_page_at_the_top_of_the_host_space() {
    let m = mmu(false);
    let r = m.add_region(spec(0, 4 * MIB, 0x4000_0000)).unwrap();
    let t = m.read_begin(0, 4 * MIB).unwrap();
    let top = !(HUGE_PAGE_SIZE - 1); // the last 2 MiB below 2^64
    let res = m.install(
        &t,
        &[
            Translation::huge(0, top),
            Translation::huge(2 * MIB, 0x4000_0000),
        ],
    );
    assert!(matches!(res, Err(Error::AboveLimit { .. })), "{res:?}");
    m.install(&t, &[Translation::huge(0, ADDRESS_LIMIT - HUGE_PAGE_SIZE)])
        .unwrap();
    m.teardown_region(r).unwrap();
    let res = catch_unwind(AssertUnwindSafe(|| m.reclaim_all()));
    assert!(res.is_ok(), "reclaim_all panicked");
}

// ---------------------------------------------------------------------
// Liveness: a mirror callback that panics.
// ---------------------------------------------------------------------

/// Guards: a Cache mirror's `invalidate_start` panicking (a driver bug the
/// VMM catches) unwound through `invalidate` without ending its in-flight
/// span, so the range stayed odd forever: `try_read_begin` Busy,
/// `read_begin` and `unregister_mirror` hung. The span is now a drop guard
/// (which also zaps the range on unwind).
#[test]
fn a_panicking_invalidate_callback_still_ends_its_span() {
    let m = mmu(false);
    m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    let t = m.read_begin(0, PAGE_SIZE).unwrap();
    m.install(&t, &[Translation::small(0, 0x1000_0000)])
        .unwrap();
    let bad = Arc::new(Recorder {
        name: "bad",
        ..Default::default()
    });
    let id = m.register_mirror(bad.clone());
    bad.panic_on_start.store(true, SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| m.invalidate(0, PAGE_SIZE)));
    assert!(r.is_err(), "the callback panicked through invalidate");
    assert_eq!(
        m.lookup(0),
        None,
        "the unwinding invalidation zapped its range"
    );
    let busy = m.try_read_begin(0, PAGE_SIZE);
    let m2 = m.clone();
    let rb = within(3, move || m2.read_begin(0, PAGE_SIZE).is_ok());
    let m3 = m.clone();
    let un = within(3, move || m3.unregister_mirror(id).is_ok());
    assert!(busy.is_ok(), "try_read_begin after the panic: {busy:?}");
    assert_eq!(
        rb,
        Some(true),
        "read_begin hangs after a panicking callback"
    );
    assert_eq!(un, Some(true), "unregister_mirror hangs");
}

/// Guards: the same for a teardown — the region stayed fenced forever, its
/// old generation was never reclaimed and every fault in it hung.
#[test]
fn a_panicking_teardown_callback_still_ends_its_span() {
    let m = mmu(false);
    let r = m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    let t = m.read_begin(0, 4 * MIB).unwrap();
    m.install(&t, &[Translation::huge(0, 0x1000_0000)]).unwrap();
    let bad = Arc::new(Recorder {
        name: "bad",
        ..Default::default()
    });
    m.register_mirror(bad.clone());
    bad.panic_on_start.store(true, SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| m.teardown_region(r))).is_err());
    m.reclaim_all();
    assert!(!m.reclaim_pending(), "old generation never reclaimed");
    let m2 = m.clone();
    assert_eq!(
        within(3, move || m2.read_begin(0, PAGE_SIZE).is_ok()),
        Some(true),
        "read_begin hangs"
    );
}

/// Holds: a panicking `reclaimed` releases reclaimer ownership. (Records
/// only that later steps and unregister do not hang.)
#[test]
fn a_panicking_reclaimed_callback_does_not_wedge_the_reclaimer() {
    let m = mmu(false);
    let r = m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    let t = m.read_begin(0, 4 * MIB).unwrap();
    m.install(&t, &[Translation::huge(0, 0x1000_0000)]).unwrap();
    let bad = Arc::new(Recorder {
        name: "bad",
        role: MirrorRole::Backing,
        ..Default::default()
    });
    let id = m.register_mirror(bad.clone());
    m.teardown_region(r).unwrap();
    bad.panic_on_reclaimed.store(true, SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| m.reclaim_all())).is_err());
    let m2 = m.clone();
    assert_eq!(
        within(5, move || {
            m2.reclaim_all();
            m2.unregister_mirror(id).is_ok()
        }),
        Some(true)
    );
}

// ---------------------------------------------------------------------
// Liveness: re-entrant invalidations from inside a callback.
// ---------------------------------------------------------------------

struct Nester {
    mmu: std::sync::Weak<Mmu>,
    depth: AtomicUsize,
    max: usize,
    errors: Mutex<Vec<Error>>,
}

impl Mirror for Nester {
    fn name(&self) -> &str {
        "nester"
    }
    fn invalidate_start(&self, inv: &Invalidation) {
        let d = self.depth.fetch_add(1, SeqCst);
        if d < self.max {
            if let (Some(m), InvalidationKind::Range { gpa, .. }) = (self.mmu.upgrade(), &inv.kind)
            {
                // Invalidate the next page (e.g. a device that shoots down a
                // neighbouring mapping it shares a cache line with).
                if let Err(e) = m.invalidate(gpa + PAGE_SIZE, PAGE_SIZE) {
                    self.errors.lock().unwrap().push(e);
                }
            }
        }
        self.depth.fetch_sub(1, SeqCst);
    }
    fn invalidate_wait(&self, _inv: &Invalidation) {}
}

/// Guards: a callback calling `invalidate` (on another page) nested; every
/// level held an in-flight slot and the 65th waited for slots only its own
/// thread could free — a hang. Sleeping methods now return
/// `Err(Reentrant)` from inside a callback.
#[test]
fn invalidate_from_a_callback_is_reentrant_not_a_nested_hang() {
    let m = mmu(false);
    m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    let n = Arc::new(Nester {
        mmu: Arc::downgrade(&m),
        depth: AtomicUsize::new(0),
        max: 70,
        errors: Mutex::new(Vec::new()),
    });
    m.register_mirror(n.clone());
    let m2 = m.clone();
    let done = within(5, move || m2.invalidate(0, PAGE_SIZE).is_ok());
    assert_eq!(
        done,
        Some(true),
        "nested invalidation hung (in-flight slots exhausted by one thread)"
    );
    let errors = n.errors.lock().unwrap().clone();
    assert_eq!(errors, vec![Error::Reentrant("invalidate")]);
}

// ---------------------------------------------------------------------
// Guarantee 5: a region below ADDRESS_LIMIT whose directory cannot be
// allocated aborts the process.
// ---------------------------------------------------------------------

/// Child half of `a_huge_region_is_an_error_not_an_abort`.
#[test]
#[ignore]
fn child_add_huge_region() {
    let m = mmu(false);
    let r = m.add_region(spec(0, 1 << 62, 0));
    assert!(matches!(r, Err(Error::RegionTooLarge { .. })), "{r:?}");
    println!("CHILD-RESULT {:?}", r.map(|_| ()));
}

/// Guards: `add_region` of a 4 EiB region (below ADDRESS_LIMIT) allocated
/// its 32 TiB directory before any other check and the process aborted.
/// Now `MAX_REGION_SIZE` is checked first and the directory allocation is
/// fallible. Run in a child process (an abort would kill this one).
#[test]
fn a_huge_region_is_an_error_not_an_abort() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "child_add_huge_region",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("CHILD-RESULT"),
        "child died: {:?}\n{}\n{}",
        out.status,
        stdout
            .lines()
            .filter(|l| l.contains("CHILD"))
            .collect::<Vec<_>>()
            .join("\n"),
        stderr.lines().take(5).collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------
// Removed regions keep their slot in the 64-entry region table until the
// reclaimer has finished them.
// ---------------------------------------------------------------------

/// Guards: removing and re-adding one region (a memslot being remapped)
/// with no reclaim step in between failed after 64 cycles with a misleading
/// `OutsideRegions`. `add_region` now runs reclaim steps itself when only
/// removed regions fill the table.
#[test]
fn remove_and_readd_never_runs_out_of_region_entries() {
    let m = mmu(false);
    for i in 0..200 {
        let id = m
            .add_region(spec(0, 4 * MIB, 0x1000_0000))
            .unwrap_or_else(|e| panic!("cycle {i}: add_region of a free range: {e:?}"));
        m.remove_region(id).unwrap();
    }
}

/// Guards: with the background reclaimer and faults refilling the obsolete
/// list, a removed region was freed only in a step that emptied the list
/// (never, under load), so removed regions piled up and `add_region`
/// failed. The reclaimer now counts obsolete-list leaves per region,
/// alternates list and scan, and finishes removed regions first.
#[test]
fn removed_regions_drain_under_fault_load() {
    let m = mmu(true);
    let a = m
        .add_region(spec(64 * MIB, 64 * MIB, 0x1_0000_0000))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for k in 0..2u64 {
        let (m, stop) = (m.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut i = k;
            while !stop.load(SeqCst) {
                let g = 64 * MIB + (i % 32) * HUGE_PAGE_SIZE + (i % 7) * PAGE_SIZE;
                let _ = m.fault_in(g, PAGE_SIZE, |t, out| {
                    out.push(Translation::small(t.gpa(), t.host_addr(t.gpa())?));
                    Ok(())
                });
                i += 2;
            }
        }));
    }
    {
        let (m, stop) = (m.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                m.teardown_region(a).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        }));
    }
    let mut failures = Vec::new();
    for i in 0..400 {
        match m.add_region(spec(0, 4 * MIB, 0x1000_0000)) {
            Ok(id) => {
                m.remove_region(id).unwrap();
            }
            Err(e) => failures.push((i, e)),
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    stop.store(true, SeqCst);
    for h in hs {
        h.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let drained = !m.reclaim_pending();
    assert!(
        failures.is_empty(),
        "{} add_region failures, first {:?}; drained 0.5 s after the load stopped: {drained}",
        failures.len(),
        failures.first()
    );
}

// ---------------------------------------------------------------------
// Liveness: re-entries from callbacks on two threads used to wait for
// each other inside the mmu (no user lock involved).
// ---------------------------------------------------------------------

struct Refill {
    mmu: std::sync::Weak<Mmu>,
    page: u64,
    in_reclaimed: Arc<AtomicBool>,
    dev_waiting: Arc<AtomicBool>,
}
impl Mirror for Refill {
    fn name(&self) -> &str {
        "refill"
    }
    fn role(&self) -> MirrorRole {
        MirrorRole::Backing
    }
    fn invalidate_start(&self, _: &Invalidation) {}
    fn invalidate_wait(&self, _: &Invalidation) {}
    fn reclaimed(&self, _: &[Extent]) {
        // The backing re-populates a page after releasing old memory.
        self.in_reclaimed.store(true, SeqCst);
        while !self.dev_waiting.load(SeqCst) {
            std::thread::yield_now();
        }
        if let Some(m) = self.mmu.upgrade() {
            let _ = m.read_begin(self.page, PAGE_SIZE);
        }
    }
}

struct Eager {
    mmu: std::sync::Weak<Mmu>,
    in_reclaimed: Arc<AtomicBool>,
    dev_waiting: Arc<AtomicBool>,
}
impl Mirror for Eager {
    fn name(&self) -> &str {
        "eager"
    }
    fn invalidate_start(&self, _: &Invalidation) {}
    fn invalidate_wait(&self, inv: &Invalidation) {
        if let InvalidationKind::Range { .. } = inv.kind {
            // The device, having flushed, helps the reclaimer along.
            while !self.in_reclaimed.load(SeqCst) {
                std::thread::yield_now();
            }
            self.dev_waiting.store(true, SeqCst);
            if let Some(m) = self.mmu.upgrade() {
                m.reclaim_step();
            }
        }
    }
}

/// Guards: thread 1's reclaim step ran a Backing mirror's `reclaimed`
/// that called `read_begin(P)`; thread 2's `invalidate(P)` ran a Cache
/// mirror's `invalidate_wait` that called `reclaim_step`. Each waited for
/// the other: deadlock. Now `read_begin` in a callback is
/// `Err(Reentrant)` and `reclaim_step` in a callback does nothing.
#[test]
fn reclaim_step_and_read_begin_in_callbacks_do_not_deadlock() {
    let m = mmu(false);
    m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    let y = m.add_region(spec(8 * MIB, 4 * MIB, 0x2000_0000)).unwrap();
    let t = m.read_begin(8 * MIB, 2 * MIB).unwrap();
    m.install(&t, &[Translation::huge(8 * MIB, 0x2000_0000)])
        .unwrap();
    m.teardown_region(y).unwrap(); // region Y now has a leaf to reclaim
    let a = Arc::new(AtomicBool::new(false));
    let b = Arc::new(AtomicBool::new(false));
    m.register_mirror(Arc::new(Refill {
        mmu: Arc::downgrade(&m),
        page: 0,
        in_reclaimed: a.clone(),
        dev_waiting: b.clone(),
    }));
    m.register_mirror(Arc::new(Eager {
        mmu: Arc::downgrade(&m),
        in_reclaimed: a.clone(),
        dev_waiting: b.clone(),
    }));
    let m1 = m.clone();
    let r1 = std::thread::spawn(move || within(5, move || m1.reclaim_step().leaves));
    let m2 = m.clone();
    let r2 = within(5, move || m2.invalidate(0, PAGE_SIZE).is_ok());
    let r1 = r1.join().unwrap();
    assert!(
        r1.is_some() && r2.is_some(),
        "deadlock: reclaim_step done {r1:?}, invalidate done {r2:?}"
    );
}

struct CrossFault {
    mmu: std::sync::Weak<Mmu>,
    arrived: AtomicUsize,
}
impl Mirror for CrossFault {
    fn name(&self) -> &str {
        "cross"
    }
    fn invalidate_start(&self, _: &Invalidation) {}
    fn invalidate_wait(&self, inv: &Invalidation) {
        if let InvalidationKind::Range { gpa, .. } = inv.kind {
            // Prefetch the neighbouring page the device will need next.
            self.arrived.fetch_add(1, SeqCst);
            while self.arrived.load(SeqCst) < 2 {
                std::thread::yield_now();
            }
            let other = if gpa == 0 { PAGE_SIZE } else { 0 };
            if let Some(m) = self.mmu.upgrade() {
                let _ = m.read_begin(other, PAGE_SIZE);
            }
        }
    }
}

/// Guards (same class): two threads invalidate pages A and B; each Cache
/// callback called `read_begin` on the other page and waited for the
/// other's invalidation to end: both hung. Now `Err(Reentrant)`.
#[test]
fn read_begin_from_two_invalidate_callbacks_does_not_deadlock() {
    let m = mmu(false);
    m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    m.register_mirror(Arc::new(CrossFault {
        mmu: Arc::downgrade(&m),
        arrived: AtomicUsize::new(0),
    }));
    let m1 = m.clone();
    let h = std::thread::spawn(move || within(4, move || m1.invalidate(0, PAGE_SIZE).is_ok()));
    let m2 = m.clone();
    let r2 = within(4, move || m2.invalidate(PAGE_SIZE, PAGE_SIZE).is_ok());
    let r1 = h.join().unwrap();
    assert!(r1.is_some() && r2.is_some(), "deadlock: {r1:?} {r2:?}");
}

// ---------------------------------------------------------------------
// The rule behind the two deadlocks and the nested hang: every method
// that may sleep refuses to run inside a mirror callback.
// ---------------------------------------------------------------------

struct CallsEverything {
    mmu: std::sync::Weak<Mmu>,
    region: Mutex<Option<RegionId>>,
    id: Mutex<Option<MirrorId>>,
    results: Mutex<Vec<(&'static str, Result<(), Error>)>>,
}

impl Mirror for CallsEverything {
    fn name(&self) -> &str {
        "calls-everything"
    }
    fn invalidate_start(&self, inv: &Invalidation) {
        let (Some(m), InvalidationKind::Range { .. }) = (self.mmu.upgrade(), &inv.kind) else {
            return;
        };
        let region = self.region.lock().unwrap().unwrap();
        let id = self.id.lock().unwrap().unwrap();
        let other = 2 * MIB; // not the page being invalidated
        let mut r = self.results.lock().unwrap();
        r.push(("read_begin", m.read_begin(other, PAGE_SIZE).map(|_| ())));
        r.push((
            "fault_in",
            m.fault_in(other, PAGE_SIZE, |_, _| Ok(())).map(|_| ()),
        ));
        r.push(("invalidate", m.invalidate(other, PAGE_SIZE).map(|_| ())));
        r.push(("teardown_all", m.teardown_all().map(|_| ())));
        r.push(("teardown_region", m.teardown_region(region).map(|_| ())));
        r.push(("remove_region", m.remove_region(region).map(|_| ())));
        r.push(("unregister_mirror", m.unregister_mirror(id)));
        // Non-sleeping methods still work.
        r.push((
            "try_read_begin",
            m.try_read_begin(other, PAGE_SIZE).map(|_| ()),
        ));
        // A step does nothing (the test left work for it): `Stale` marks
        // a step that ran.
        let p = m.reclaim_step();
        let idle = if p.leaves == 0 && p.more {
            Ok(())
        } else {
            Err(Error::Stale)
        };
        r.push(("reclaim_step", idle));
    }
    fn invalidate_wait(&self, _: &Invalidation) {}
}

/// Guards the class of findings 4–6: from inside a callback, each sleeping
/// method returns `Err(Reentrant)` at once (changing nothing), the
/// non-sleeping ones work, and `reclaim_step` does nothing.
#[test]
fn sleeping_methods_from_a_callback_return_reentrant() {
    let m = mmu(false);
    let region = m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    // Leave the reclaimer a leaf of an old generation.
    let t = m.read_begin(0, HUGE_PAGE_SIZE).unwrap();
    m.install(&t, &[Translation::huge(0, 0x1000_0000)]).unwrap();
    m.teardown_region(region).unwrap();
    let c = Arc::new(CallsEverything {
        mmu: Arc::downgrade(&m),
        region: Mutex::new(Some(region)),
        id: Mutex::new(None),
        results: Mutex::new(Vec::new()),
    });
    let id = m.register_mirror(c.clone());
    *c.id.lock().unwrap() = Some(id);
    let m2 = m.clone();
    assert_eq!(
        within(5, move || m2.invalidate(0, PAGE_SIZE).is_ok()),
        Some(true)
    );
    let results = c.results.lock().unwrap().clone();
    for (what, r) in &results {
        match *what {
            "try_read_begin" | "reclaim_step" => assert!(r.is_ok(), "{what}: {r:?}"),
            "teardown_all" | "teardown_region" | "remove_region" => {
                assert_eq!(r, &Err(Error::Reentrant("teardown")), "{what}")
            }
            _ => assert_eq!(r, &Err(Error::Reentrant(what)), "{what}"),
        }
    }
    assert_eq!(results.len(), 9);
    // Nothing was changed by the refused calls.
    assert_eq!(m.regions().len(), 1);
    assert_eq!(m.mirror_count(), 1);
    m.unregister_mirror(id).unwrap();
    assert_eq!(m.reclaim_all().leaves, 1);
}

/// Guards the error of finding 7: a table full of live regions is
/// `TooManyRegions`, not the misleading `OutsideRegions`.
#[test]
fn a_full_region_table_is_too_many_regions() {
    let m = mmu(false);
    for i in 0..MAX_REGIONS as u64 {
        m.add_region(spec(i * 4 * MIB, 4 * MIB, 0x1000_0000))
            .unwrap();
    }
    let r = m.add_region(spec(1 << 40, 4 * MIB, 0x1000_0000));
    assert_eq!(
        r,
        Err(Error::TooManyRegions {
            max: MAX_REGIONS,
            removed: 0
        })
    );
}
