//! Regression tests of the emulated RNIC against hostile work requests
//! (issue 11): retiring unsignaled WQEs, RNR back-off on a timer, CQ
//! overrun as an error, checked address arithmetic at the top of the
//! address space, and fencing that waits for the copy in progress and
//! recovers once the device answers again.

mod common;

use common::thread_cpu;

use mmu::{Mmu, PAGE_SIZE};
use rdma_passthrough::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const ODP: Access = Access(Access::ALL_REMOTE.0 | Access::ON_DEMAND.0);

struct Env {
    base: u64,
    mmu: Arc<Mmu>,
    rnic: Arc<EmulatedRnic>,
    pd: Pd,
}

fn env(len: u64, config: RnicConfig) -> Env {
    let m = common::memory(len, false);
    let rnic = EmulatedRnic::new(config);
    let pd = rnic.alloc_pd(m.space);
    Env {
        base: m.base,
        mmu: m.mmu,
        rnic,
        pd,
    }
}

fn named(name: &str) -> RnicConfig {
    RnicConfig {
        name: name.into(),
        ..RnicConfig::default()
    }
}

fn pair(e: &Env, depth: usize, a_caps: QpCaps, b_caps: QpCaps) -> (Qp, Qp, Cq, Cq) {
    let acq = e.rnic.create_cq(depth);
    let bcq = e.rnic.create_cq(depth);
    let a = e.rnic.create_qp(&e.pd, &acq, &acq, a_caps).unwrap();
    let b = e.rnic.create_qp(&e.pd, &bcq, &bcq, b_caps).unwrap();
    e.rnic.connect(&a, &b);
    (a, b, acq, bcq)
}

fn write(id: u64, addr: u64, len: u32, lkey: u32, raddr: u64, rkey: u32, sig: bool) -> SendWr {
    SendWr {
        wr_id: id,
        opcode: Opcode::RdmaWrite {
            remote_addr: raddr,
            rkey,
        },
        sges: vec![Sge {
            addr,
            length: len,
            lkey,
        }],
        signaled: sig,
    }
}

fn send(id: u64, addr: u64, len: u32, lkey: u32) -> SendWr {
    SendWr {
        wr_id: id,
        opcode: Opcode::Send,
        sges: vec![Sge {
            addr,
            length: len,
            lkey,
        }],
        signaled: true,
    }
}

fn one(cq: &Cq) -> Wc {
    let v = cq.wait(1, Duration::from_millis(1), Duration::from_secs(10));
    assert_eq!(v.len(), 1, "no completion within 10 s");
    v[0]
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Issue 11 item 1 (the RNIC side): unsignaled WQEs retire in order without
/// a completion, so a device above can forget them in O(1) each.
#[test]
fn send_wqes_retire_in_order() {
    let e = env(8 * MIB, named("retire"));
    let mr = e.rnic.reg_mr(&e.pd, e.base, 8 * MIB, ODP).unwrap();
    let (a, _b, acq, _bcq) = pair(&e, 64, QpCaps::default(), QpCaps::default());
    for i in 0..200u64 {
        let wr = write(
            i,
            e.base,
            4096,
            mr.lkey(),
            e.base + 4 * MIB,
            mr.rkey(),
            false,
        );
        while a.post_send(wr.clone()) == Err(VerbsError::QueueFull) {
            std::thread::yield_now();
        }
    }
    until("200 unsignaled WRITEs retired", || a.send_retired() == 200);
    let mut wc = [Wc {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: WcOpcode::Send,
        byte_len: 0,
        qp_num: 0,
    }; 4];
    assert_eq!(acq.poll(&mut wc), 0, "unsignaled WQEs completed visibly");
}

/// Issue 11 item 2: a SEND nobody has a receive for waits on the
/// responder's RNR timer; the device thread sleeps in between instead of
/// spinning, and the retry count is what verbs says (7: forever).
#[test]
fn rnr_waits_sleep_on_the_timer() {
    let e = env(4 * MIB, named("rnrsleep"));
    let mr = e.rnic.reg_mr(&e.pd, e.base, 4 * MIB, ODP).unwrap();
    // The responder's default RNR timer: 0.64 ms.
    let (a, b, acq, bcq) = pair(&e, 64, QpCaps::default(), QpCaps::default());
    a.post_send(send(1, e.base, 64, mr.lkey())).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (cpu0, waits0, t0) = (
        thread_cpu("rnrsleep-dev"),
        e.rnic.stats().rnr_waits,
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(1));
    let (cpu, waits, wall) = (
        thread_cpu("rnrsleep-dev") - cpu0,
        e.rnic.stats().rnr_waits - waits0,
        t0.elapsed().as_secs_f64(),
    );
    println!("RNR for {wall:.2}s: {waits} retries, device thread {cpu:.3} CPU s");
    // One retry per timer period at most (1 s / 0.64 ms = 1563), and a
    // sleeping thread: the spinning device did ~50 000 retries and used
    // the whole second; polling 200 µs after each timer wake-up would use
    // about a third of it.
    let most = (wall / rnr_timer(12).as_secs_f64() * 1.2) as u64 + 10;
    assert!(
        waits > 0 && waits <= most,
        "{waits} RNR retries (most {most})"
    );
    assert!(
        cpu < 0.1 * wall,
        "the device thread used {cpu:.3} s of {wall:.2} s"
    );
    // Still retrying (7 = forever): a receive now lets it complete.
    b.post_recv(RecvWr {
        wr_id: 9,
        sges: vec![Sge {
            addr: e.base + MIB,
            length: 4096,
            lkey: mr.lkey(),
        }],
    })
    .unwrap();
    assert_eq!(one(&acq).status, WcStatus::Success);
    assert_eq!(one(&bcq).status, WcStatus::Success);
}

/// Issue 11 item 2: `rnr_retry` n < 7 is n retries after the first try.
#[test]
fn rnr_retry_counts_retries() {
    let e = env(4 * MIB, named("rnrcount"));
    let mr = e.rnic.reg_mr(&e.pd, e.base, 4 * MIB, ODP).unwrap();
    let requester = QpCaps {
        rnr_retry: 3,
        ..QpCaps::default()
    };
    let responder = QpCaps {
        min_rnr_timer: 1,
        ..QpCaps::default()
    };
    let (a, _b, acq, _bcq) = pair(&e, 64, requester, responder);
    a.post_send(send(1, e.base, 64, mr.lkey())).unwrap();
    let wc = one(&acq);
    assert_eq!(wc.status, WcStatus::RnrRetryExcErr);
    assert_eq!(e.rnic.stats().rnr_waits, 4, "one try and three retries");
    assert!(a.in_error());
}

/// Issue 11 item 5: completions into a full CQ are not dropped silently:
/// the CQ is in error and so is the QP (later WQEs are flushed).
#[test]
fn cq_overrun_puts_the_queue_pair_in_error() {
    let e = env(4 * MIB, named("overrun"));
    let mr = e.rnic.reg_mr(&e.pd, e.base, 4 * MIB, ODP).unwrap();
    let (a, _b, acq, _bcq) = pair(&e, 8, QpCaps::default(), QpCaps::default());
    for i in 0..20u64 {
        let wr = write(i, e.base, 64, mr.lkey(), e.base + MIB, mr.rkey(), true);
        a.post_send(wr).unwrap();
    }
    until("the QP in error", || a.in_error());
    assert!(acq.is_overrun());
    assert!(acq.overruns() > 0);
    assert_eq!(e.rnic.stats().cq_overruns, 1);
    until("all 20 retired", || a.send_retired() == 20);
    // The eight that fit are there, oldest first.
    let got = acq.wait(8, Duration::ZERO, Duration::from_secs(1));
    assert_eq!(got.len(), 8);
    assert_eq!(got[0].wr_id, 0);
}

/// Issue 11 item 3: a buffer ending at 2^64 − 1 (or in the last page)
/// completes with an error (it used to wrap a `next_multiple_of` and hang
/// the QP, or panic with overflow checks); valid WQEs run after it.
#[test]
fn addresses_at_the_top_of_the_space_complete_with_an_error() {
    let e = env(4 * MIB, named("top"));
    let implicit = e.rnic.reg_mr(&e.pd, 0, u64::MAX, ODP).unwrap();
    let k = implicit.lkey();
    let top = [
        (u64::MAX - 15, 15),
        (u64::MAX - 4095, 4095),
        (u64::MAX - PAGE_SIZE - 100, 200),
        (u64::MAX - MIB, 4096),
    ];
    for (i, &(addr, len)) in top.iter().enumerate() {
        let (a, _b, acq, _bcq) = pair(&e, 64, QpCaps::default(), QpCaps::default());
        let local = write(1, addr, len, k, e.base, k, true);
        a.post_send(local).unwrap();
        assert_eq!(one(&acq).status, WcStatus::LocProtErr, "local case {i}");
        let (a, _b, acq, _bcq) = pair(&e, 64, QpCaps::default(), QpCaps::default());
        let remote = write(2, e.base, len, k, addr, k, true);
        a.post_send(remote).unwrap();
        assert_eq!(one(&acq).status, WcStatus::RemAccessErr, "remote case {i}");
        let err = implicit.advise(
            Advice::PrefetchWrite,
            ADVISE_FLAG_FLUSH,
            &[Sge {
                addr,
                length: len,
                lkey: k,
            }],
        );
        assert!(err.is_err(), "advise case {i}");
    }
    let (a, _b, acq, _bcq) = pair(&e, 64, QpCaps::default(), QpCaps::default());
    a.post_send(write(3, e.base, 4096, k, e.base + MIB, k, true))
        .unwrap();
    assert_eq!(one(&acq).status, WcStatus::Success);
}

/// Issue 11 item 6: a fence waits for the page copy in progress; nothing
/// the device copies lands in the fenced MR after the invalidation
/// returned.
#[test]
fn no_copy_lands_after_the_fence() {
    let e = env(
        4 * MIB,
        RnicConfig {
            fence_timeout: Duration::from_millis(100),
            ..named("nolate")
        },
    );
    let src = e.rnic.reg_mr(&e.pd, e.base, MIB, ODP).unwrap();
    let dst = e.rnic.reg_mr(&e.pd, e.base + 2 * MIB, MIB, ODP).unwrap();
    for (mr, addr) in [(&src, e.base), (&dst, e.base + 2 * MIB)] {
        let sge = Sge {
            addr,
            length: 4096,
            lkey: mr.lkey(),
        };
        mr.advise(Advice::PrefetchWrite, ADVISE_FLAG_FLUSH, &[sge])
            .unwrap();
    }
    // SAFETY: both pages are inside the test's mapping.
    unsafe {
        std::ptr::write_bytes(e.base as *mut u8, 0x11, 4096);
        std::ptr::write_bytes((e.base + 2 * MIB) as *mut u8, 0, 4096);
    }
    let (a, _b, _acq, _bcq) = pair(&e, 64, QpCaps::default(), QpCaps::default());
    e.rnic.set_copy_delay(Duration::from_millis(400));
    a.post_send(write(
        1,
        e.base,
        4096,
        src.lkey(),
        e.base + 2 * MIB,
        dst.rkey(),
        true,
    ))
    .unwrap();
    // The device is inside the (slowed) copy; it stops answering.
    std::thread::sleep(Duration::from_millis(30));
    e.rnic.set_ignore_invalidations(true);
    e.mmu.invalidate(e.base + 2 * MIB, PAGE_SIZE).unwrap();
    assert!(dst.is_fenced());
    // After the invalidation returned the page is the host's again.
    // SAFETY: inside the test's mapping.
    unsafe { std::ptr::write_bytes((e.base + 2 * MIB) as *mut u8, 0xee, 4096) };
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: inside the test's mapping.
    let page = unsafe { std::slice::from_raw_parts((e.base + 2 * MIB) as *const u8, 4096) };
    assert!(
        page.iter().all(|&b| b == 0xee),
        "a copy landed after the fence"
    );
    e.rnic.set_copy_delay(Duration::ZERO);
    e.rnic.set_ignore_invalidations(false);
}

/// Issue 11 item 6: a fenced MR is re-registered once the device answers
/// again (counted), and moves data again.
#[test]
fn a_fenced_mr_recovers_once_the_device_answers() {
    let e = env(
        4 * MIB,
        RnicConfig {
            // Long enough for the device to answer the last invalidation
            // on a loaded host; the fence itself needs the hook.
            fence_timeout: Duration::from_millis(300),
            ..named("recover")
        },
    );
    let mr = e.rnic.reg_mr(&e.pd, e.base, 4 * MIB, ODP).unwrap();
    let (a, _b, acq, _bcq) = pair(&e, 64, QpCaps::default(), QpCaps::default());
    let wr = write(1, e.base, 4096, mr.lkey(), e.base + MIB, mr.rkey(), true);
    a.post_send(wr.clone()).unwrap();
    assert_eq!(one(&acq).status, WcStatus::Success);
    e.rnic.set_ignore_invalidations(true);
    e.mmu.invalidate(e.base + MIB, PAGE_SIZE).unwrap();
    assert!(mr.is_fenced());
    // Still not answering: still fenced, WQEs fail.
    std::thread::sleep(Duration::from_millis(50));
    assert!(mr.is_fenced());
    assert_eq!(e.rnic.stats().mr_recoveries, 0);
    let (a, _b, acq, _bcq) = pair(&e, 64, QpCaps::default(), QpCaps::default());
    a.post_send(wr.clone()).unwrap();
    assert_eq!(one(&acq).status, WcStatus::LocProtErr);
    e.rnic.set_ignore_invalidations(false);
    until("the MR re-registered", || !mr.is_fenced());
    let s = e.rnic.stats();
    assert_eq!((s.fenced_mrs, s.mr_recoveries), (1, 1));
    let (a, _b, acq, _bcq) = pair(&e, 64, QpCaps::default(), QpCaps::default());
    a.post_send(wr).unwrap();
    assert_eq!(one(&acq).status, WcStatus::Success);
    // And it is an mmu mirror again: the next invalidation is confirmed.
    e.mmu.invalidate(e.base + MIB, PAGE_SIZE).unwrap();
    assert!(!mr.is_fenced());
    assert_eq!(e.rnic.stats().fenced_mrs, 1);
}
