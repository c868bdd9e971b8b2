//! Regressions for hostile input through the public API (issue 10 items 4
//! and 5, issue 14 item 2): the top of the address space, tickets of another
//! mmu, degenerate tunables. Guarantee 5 of `lib.rs`: bad input returns an
//! `Error` and nothing panics or hangs — also with overflow checks on
//! (`scripts/test` runs these in the `release-checked` profile).

use mmu::*;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn mmu() -> Arc<Mmu> {
    Mmu::new(Config {
        background_reclaim: false,
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

fn fault_small(m: &Mmu, gpa: u64, pages: u64) {
    m.fault_in(gpa, pages * PAGE_SIZE, |t, out| {
        for p in 0..pages {
            let g = t.gpa() + p * PAGE_SIZE;
            out.push(Translation::small(g, t.host_addr(g)?));
        }
        Ok(())
    })
    .unwrap();
}

/// Issue 14 item 2: `zap_batch: 0` or `install_batch: 0` made `invalidate`
/// or `install` loop forever; every tunable is range-checked now.
#[test]
fn config_rejects_every_degenerate_tunable() {
    type Set = fn(&mut Config, usize);
    let knobs: [(&str, Set, usize); 4] = [
        (
            "reclaim_batch",
            |c, v| c.reclaim_batch = v,
            RECLAIM_BATCH_MAX,
        ),
        ("reclaim_scan", |c, v| c.reclaim_scan = v, RECLAIM_SCAN_MAX),
        (
            "install_batch",
            |c, v| c.install_batch = v,
            INSTALL_BATCH_MAX,
        ),
        ("zap_batch", |c, v| c.zap_batch = v, ZAP_BATCH_MAX),
    ];
    for (name, set, max) in knobs {
        for bad in [0, max + 1, usize::MAX] {
            let mut c = Config::default();
            set(&mut c, bad);
            match Mmu::new(c) {
                Err(Error::InvalidConfig { what, value, .. }) => {
                    assert_eq!((what, value), (name, bad as u64));
                }
                other => panic!("{name} = {bad} accepted: {other:?}"),
            }
        }
        // The extremes of the range work and terminate.
        for good in [1, max] {
            let mut c = Config {
                background_reclaim: false,
                ..Config::default()
            };
            set(&mut c, good);
            let m = Mmu::new(c).unwrap();
            m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
            fault_small(&m, 0, 600);
            assert_eq!(m.invalidate(0, 4 * MIB).unwrap(), 600, "{name} = {good}");
            fault_small(&m, 0, 600);
            m.teardown_all().unwrap();
            m.reclaim_all();
            assert!(!m.reclaim_pending(), "{name} = {good}");
        }
    }
    assert!(Config::default().validate().is_ok());
}

/// Issue 10 item 4: regions near 2^64 made `add_region` overflow, an
/// `invalidate` of one page hang and `translate_range` lie. They are
/// rejected up front now (`ADDRESS_LIMIT`), in both address spaces.
#[test]
fn regions_past_the_address_limit_are_rejected() {
    let m = mmu();
    let top = u64::MAX - PAGE_SIZE + 1;
    for (gpa, size, hva) in [
        (top - 2 * MIB + 1 - PAGE_SIZE, 2 * MIB, 0),
        (u64::MAX - 4 * MIB + 1, 2 * MIB, 0),
        (ADDRESS_LIMIT, PAGE_SIZE, 0),
        (ADDRESS_LIMIT - PAGE_SIZE, 2 * PAGE_SIZE, 0),
        (0, 2 * MIB, u64::MAX - 2 * MIB + 1),
        (0, 2 * MIB, ADDRESS_LIMIT - MIB),
    ] {
        let r = m.add_region(spec(gpa, size, hva));
        assert!(
            matches!(
                r,
                Err(Error::AboveLimit { .. } | Error::Overflow { .. } | Error::Misaligned { .. })
            ),
            "[{gpa:#x}, +{size:#x}) at hva {hva:#x}: {r:?}"
        );
    }
    assert!(m.regions().is_empty());
    let id = m.add_region(spec(0, 2 * MIB, 0x1000_0000)).unwrap();
    for hva in [u64::MAX - PAGE_SIZE + 1, ADDRESS_LIMIT - MIB] {
        assert!(matches!(
            m.set_region_hva(id, hva),
            Err(Error::AboveLimit { .. })
        ));
    }
    assert_eq!(m.regions()[0].hva, 0x1000_0000);
}

/// Issue 10 item 4: a region ending exactly at the limit works on every
/// path — faults, `lookup`, `invalidate` (returns), `translate_range`,
/// huge installs — and nothing reaches past it.
#[test]
fn a_region_ending_at_the_limit_is_correct_on_every_path() {
    let m = mmu();
    let size = 4 * MIB + 3 * PAGE_SIZE;
    let gpa = ADDRESS_LIMIT - size;
    let hva = ADDRESS_LIMIT - size;
    m.add_region(spec(gpa, size, hva)).unwrap();
    let last = ADDRESS_LIMIT - PAGE_SIZE;
    fault_small(&m, last - PAGE_SIZE, 2);
    assert_eq!(m.lookup(last).unwrap().hva, last);
    assert_eq!(m.lookup(ADDRESS_LIMIT), None);
    // A 2 MiB install in a full slot, and one reaching past the ticket.
    let slot = ADDRESS_LIMIT - 4 * MIB;
    let t = m.read_begin(slot, 2 * MIB).unwrap();
    assert_eq!(t.end(), slot + 2 * MIB);
    m.install(&t, &[Translation::huge(slot, slot)]).unwrap();
    assert_eq!(m.lookup(slot + 5 * PAGE_SIZE).unwrap().size, PageSize::Huge);
    let t = m.read_begin(last - PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    let aligned = last & !(HUGE_PAGE_SIZE - 1);
    assert!(matches!(
        m.install(&t, &[Translation::huge(aligned, aligned)]),
        Err(Error::OutsideTicket { .. })
    ));
    // translate_range sees exactly what is installed.
    let t = m.read_begin(last - 3 * PAGE_SIZE, 3 * PAGE_SIZE).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        m.translate_range(&t, t.gpa(), t.end(), &mut out),
        Ok(Some(last - 3 * PAGE_SIZE))
    );
    assert!(out.is_empty());
    // One page at the very end: invalidate returns and zaps it.
    assert_eq!(m.invalidate(last, PAGE_SIZE), Ok(1));
    assert_eq!(m.lookup(last), None);
    assert_eq!(m.invalidate(gpa, size).unwrap(), 1 + 512);
    assert_eq!(m.mapped_bytes(), 0);
    fault_small(&m, last, 1);
    m.teardown_all().unwrap();
    m.reclaim_all();
    assert!(!m.reclaim_pending());
    assert_eq!(m.lookup(last), None);
}

/// Issue 10 item 4: addresses near `u64::MAX` given to any method are
/// errors (or "nothing there"), never a panic, whatever regions exist.
#[test]
fn addresses_near_u64_max_are_errors_everywhere() {
    let m = mmu();
    m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    let high = [
        u64::MAX,
        u64::MAX - 1,
        u64::MAX - PAGE_SIZE + 1,
        u64::MAX - 2 * MIB + 1,
        ADDRESS_LIMIT,
        ADDRESS_LIMIT - PAGE_SIZE,
    ];
    for &a in &high {
        assert_eq!(m.lookup(a), None, "{a:#x}");
        for len in [PAGE_SIZE, 2 * MIB, u64::MAX - PAGE_SIZE + 1] {
            assert!(m.read_begin(a, len).is_err());
            assert!(m.try_read_begin(a, len).is_err());
            assert!(m.invalidate(a, len).is_err());
            assert!(m.fault_in(a, len, |_, _| Ok(())).is_err());
        }
    }
    fault_small(&m, 0, 1);
    let t = m.read_begin(0, 4 * MIB).unwrap();
    let mut out = Vec::new();
    for &a in &high {
        let tr = |size| Translation {
            gpa: a & !(PAGE_SIZE - 1),
            hva: 0,
            size,
            writable: true,
        };
        for size in [PageSize::Small, PageSize::Huge] {
            assert!(m.install(&t, &[tr(size)]).is_err(), "{a:#x} {size:?}");
        }
        let huge = Translation::huge(a & !(HUGE_PAGE_SIZE - 1), 0);
        assert!(m.install(&t, &[huge]).is_err(), "{a:#x}");
        assert!(m.translate(&t, a).is_err());
        assert!(m.translate_range(&t, a, a, &mut out).is_err());
        assert!(m.translate_range(&t, 0, a, &mut out).is_err());
        assert!(t.host_addr(a).is_err());
    }
    assert!(out.is_empty());
    assert_eq!(
        t.host_addr(4 * MIB - PAGE_SIZE),
        Ok(0x1000_0000 + 4 * MIB - PAGE_SIZE)
    );
    assert_eq!(m.mapped_bytes(), PAGE_SIZE);
}

/// Issue 10 item 5: a ticket names the mmu that issued it; another mmu's
/// ticket is an error for `install`/`translate`/`translate_range` and
/// always stale for `read_retry` — even one with a higher sequence number
/// taken after this mmu invalidated the page.
#[test]
fn tickets_of_another_mmu_are_errors() {
    let (a, b) = (mmu(), mmu());
    for m in [&a, &b] {
        m.add_region(spec(0, 4 * MIB, 0x1000_0000)).unwrap();
    }
    // Push `a`'s sequence number far past `b`'s.
    for _ in 0..100 {
        a.invalidate(0, PAGE_SIZE).unwrap();
    }
    b.invalidate(0, PAGE_SIZE).unwrap();
    let foreign = a.read_begin(0, 4 * MIB).unwrap();
    let own = b.read_begin(0, 4 * MIB).unwrap();
    assert!(foreign.seq() > own.seq());
    assert_eq!(
        b.install(&foreign, &[Translation::small(0, 0x1000_0000)]),
        Err(Error::ForeignTicket)
    );
    assert_eq!(b.translate(&foreign, 0), Err(Error::ForeignTicket));
    let mut out = Vec::new();
    assert_eq!(
        b.translate_range(&foreign, 0, PAGE_SIZE, &mut out),
        Err(Error::ForeignTicket)
    );
    assert!(b.read_retry(&foreign));
    assert_eq!(b.mapped_bytes(), 0);
    assert_eq!(b.lookup(0), None);
    // The owner still accepts it, and the other mmu's own ticket works.
    assert!(!a.read_retry(&foreign));
    assert_eq!(
        a.install(&foreign, &[Translation::small(0, 0x1000_0000)]),
        Ok(1)
    );
    assert_eq!(
        b.install(&own, &[Translation::small(0, 0x1000_0000)]),
        Ok(1)
    );
    assert_eq!(a.install(&own, &[]), Err(Error::ForeignTicket));
}
