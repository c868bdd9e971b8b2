//! The emulated RNIC on real threads and memory: loopback traffic through
//! ODP MRs, invalidation during traffic, bad work requests, fencing.

mod common;

use common::MIB;
use mmu::{Mmu, PAGE_SIZE};
use rdma_passthrough::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Process memory registered with an mmu as an address space whose
/// iova == host address. `guard` makes invalidated pages PROT_NONE until a
/// fault maps them again, so a device touching a page after its
/// invalidation returned crashes the test.
struct Env {
    base: u64,
    len: u64,
    mmu: Arc<Mmu>,
    rnic: Arc<EmulatedRnic>,
    pd: Pd,
}

fn env(len: u64, guard: bool, config: RnicConfig) -> Env {
    let m = common::memory(len, guard);
    let rnic = EmulatedRnic::new(config);
    let pd = rnic.alloc_pd(m.space);
    Env {
        base: m.base,
        len,
        mmu: m.mmu,
        rnic,
        pd,
    }
}

fn bytes(addr: u64, len: u64) -> &'static mut [u8] {
    // SAFETY: test buffers are live, test-owned mappings.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len as usize) }
}

fn fill(addr: u64, len: u64, seed: u8) {
    for (i, b) in bytes(addr, len).iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

struct Pair {
    a: Qp,
    b: Qp,
    acq: Cq,
    bcq: Cq,
}

fn pair(e: &Env, caps: QpCaps) -> Pair {
    let acq = e.rnic.create_cq(4096);
    let bcq = e.rnic.create_cq(4096);
    let a = e.rnic.create_qp(&e.pd, &acq, &acq, caps).unwrap();
    let b = e.rnic.create_qp(&e.pd, &bcq, &bcq, caps).unwrap();
    e.rnic.connect(&a, &b);
    Pair { a, b, acq, bcq }
}

fn one(cq: &Cq) -> Wc {
    let v = cq.wait(1, Duration::from_millis(1), Duration::from_secs(20));
    assert_eq!(v.len(), 1, "no completion");
    v[0]
}

const ALL: Access = Access(Access::ALL_REMOTE.0 | Access::ON_DEMAND.0);

#[test]
fn loopback_write_read_send_through_unfaulted_odp_mrs() {
    let e = env(16 * MIB, false, RnicConfig::default());
    let (src, dst, back) = (e.base, e.base + 4 * MIB, e.base + 8 * MIB);
    let msrc = e.rnic.reg_mr(&e.pd, src, 4 * MIB, ALL).unwrap();
    let mdst = e.rnic.reg_mr(&e.pd, dst, 4 * MIB, ALL).unwrap();
    let mback = e.rnic.reg_mr(&e.pd, back, 4 * MIB, ALL).unwrap();
    assert_eq!(msrc.mapped_pages() + mdst.mapped_pages(), 0);
    let p = pair(&e, QpCaps::default());
    fill(src, 4 * MIB, 7);

    // RDMA WRITE, two SGEs, odd offsets and lengths.
    let len1 = 3 * MIB + 123;
    let len2 = 4000;
    p.a.post_send(SendWr {
        wr_id: 1,
        opcode: Opcode::RdmaWrite {
            remote_addr: dst + 5,
            rkey: mdst.rkey(),
        },
        sges: vec![
            Sge {
                addr: src + 1,
                length: len1 as u32,
                lkey: msrc.lkey(),
            },
            Sge {
                addr: src + 3 * MIB + 200,
                length: len2,
                lkey: msrc.lkey(),
            },
        ],
        signaled: true,
    })
    .unwrap();
    let wc = one(&p.acq);
    assert_eq!(
        (wc.status, wc.byte_len as u64),
        (WcStatus::Success, len1 + len2 as u64)
    );
    assert_eq!(&bytes(dst + 5, len1)[..], &bytes(src + 1, len1)[..]);
    assert_eq!(
        &bytes(dst + 5 + len1, len2 as u64)[..],
        &bytes(src + 3 * MIB + 200, len2 as u64)[..]
    );

    // RDMA READ it back into a third MR.
    p.a.post_send(SendWr {
        wr_id: 2,
        opcode: Opcode::RdmaRead {
            remote_addr: dst + 5,
            rkey: mdst.rkey(),
        },
        sges: vec![Sge {
            addr: back,
            length: len1 as u32,
            lkey: mback.lkey(),
        }],
        signaled: true,
    })
    .unwrap();
    assert_eq!(one(&p.acq).status, WcStatus::Success);
    assert_eq!(&bytes(back, len1)[..], &bytes(src + 1, len1)[..]);

    // SEND/RECV.
    fill(src, 8192, 99);
    p.b.post_recv(RecvWr {
        wr_id: 77,
        sges: vec![Sge {
            addr: dst + 2 * MIB,
            length: 65536,
            lkey: mdst.lkey(),
        }],
    })
    .unwrap();
    p.a.post_send(SendWr {
        wr_id: 3,
        opcode: Opcode::Send,
        sges: vec![Sge {
            addr: src,
            length: 8192,
            lkey: msrc.lkey(),
        }],
        signaled: true,
    })
    .unwrap();
    assert_eq!(one(&p.acq).status, WcStatus::Success);
    let r = one(&p.bcq);
    assert_eq!(
        (r.wr_id, r.status, r.opcode, r.byte_len),
        (77, WcStatus::Success, WcOpcode::Recv, 8192)
    );
    assert_eq!(&bytes(dst + 2 * MIB, 8192)[..], &bytes(src, 8192)[..]);

    let s = e.rnic.stats();
    assert!(s.device_faults >= 3, "{s:?}");
    assert!(s.fault_pages >= 2 * 1024, "{s:?}");
    assert_eq!(s.wqes, 3);
    assert!(msrc.mapped_pages() > 0 && mdst.mapped_pages() > 0);
}

#[test]
fn invalidation_during_traffic_never_touches_old_pages() {
    // A deadline far beyond any scheduling delay on a loaded host: this
    // test is about correctness, not the fence (the fence tests are).
    let cfg = RnicConfig {
        fence_timeout: Duration::from_secs(10),
        ..RnicConfig::default()
    };
    let e = env(8 * MIB, true, cfg);
    let (src, dst, chk) = (e.base, e.base + 2 * MIB, e.base + 4 * MIB);
    let msrc = e.rnic.reg_mr(&e.pd, src, 2 * MIB, ALL).unwrap();
    let mdst = e.rnic.reg_mr(&e.pd, dst, 2 * MIB, ALL).unwrap();
    let mchk = e.rnic.reg_mr(&e.pd, chk, 2 * MIB, ALL).unwrap();
    let p = pair(&e, QpCaps::default());
    let stop = Arc::new(AtomicBool::new(false));
    let invalidations = Arc::new(AtomicU64::new(0));
    let inv = {
        let (mmu, stop, n) = (e.mmu.clone(), stop.clone(), invalidations.clone());
        std::thread::spawn(move || {
            let mut x = 1u64;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let page = (x >> 33) % 512;
                let pages = 1 + (x >> 20) % 32.min(512 - page);
                mmu.invalidate(dst + page * PAGE_SIZE, pages * PAGE_SIZE)
                    .unwrap();
                n.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        rounds += 1;
        // Stamp every source page with the round number.
        for pg in 0..512u64 {
            bytes(src + pg * PAGE_SIZE, 8).copy_from_slice(&(rounds << 16 | pg).to_le_bytes());
        }
        for (id, op, from, lk, to, rk) in [
            (1, 0, src, msrc.lkey(), dst, mdst.rkey()),
            (2, 1, chk, mchk.lkey(), dst, mdst.rkey()),
        ] {
            let opcode = if op == 0 {
                Opcode::RdmaWrite {
                    remote_addr: to,
                    rkey: rk,
                }
            } else {
                Opcode::RdmaRead {
                    remote_addr: to,
                    rkey: rk,
                }
            };
            p.a.post_send(SendWr {
                wr_id: id,
                opcode,
                sges: vec![Sge {
                    addr: from,
                    length: (2 * MIB) as u32,
                    lkey: lk,
                }],
                signaled: true,
            })
            .unwrap();
            let wc = one(&p.acq);
            assert_eq!(wc.status, WcStatus::Success, "round {rounds}: {wc:?}");
        }
        for pg in 0..512u64 {
            let got = u64::from_le_bytes(bytes(chk + pg * PAGE_SIZE, 8).try_into().unwrap());
            assert_eq!(got, rounds << 16 | pg, "round {rounds} page {pg}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    inv.join().unwrap();
    let s = e.rnic.stats();
    println!(
        "rounds {rounds} invalidations {} stats {s:?}",
        invalidations.load(Ordering::Relaxed)
    );
    assert!(rounds > 3);
    assert!(s.invalidations > 10, "{s:?}");
    // Invalidated pages came back through device faults.
    assert!(s.device_faults > rounds, "{s:?}");
    assert_eq!(s.fenced_mrs, 0);
    assert!(s.invalidate_rtt_ns.count > 0);
}

fn expect_status(e: &Env, p: &Pair, wr: SendWr, want: WcStatus) {
    p.a.post_send(wr).unwrap();
    let wc = one(&p.acq);
    assert_eq!(wc.status, want, "{wc:?}");
    assert!(p.a.in_error());
    // Later work on the broken QP is flushed.
    p.a.post_send(SendWr {
        wr_id: 999,
        opcode: Opcode::Send,
        sges: vec![],
        signaled: true,
    })
    .unwrap();
    assert_eq!(one(&p.acq).status, WcStatus::WrFlushErr);
    let _ = e;
}

#[test]
fn bad_keys_bounds_and_rights_give_error_completions() {
    let e = env(8 * MIB, false, RnicConfig::default());
    let (src, dst) = (e.base, e.base + 4 * MIB);
    let msrc = e.rnic.reg_mr(&e.pd, src, MIB, ALL).unwrap();
    let mdst = e.rnic.reg_mr(&e.pd, dst, MIB, ALL).unwrap();
    let ro = e
        .rnic
        .reg_mr(
            &e.pd,
            dst + 2 * MIB,
            MIB,
            Access::ON_DEMAND | Access::REMOTE_READ,
        )
        .unwrap();
    let other_pd = e.rnic.alloc_pd(AddressSpace::new(
        "other",
        e.mmu.clone(),
        Arc::new(mmu::DirectResolver::new(e.mmu.clone())),
    ));
    let foreign = e.rnic.reg_mr(&other_pd, src + 2 * MIB, MIB, ALL).unwrap();
    // Guard bytes around the destination MR must never change.
    bytes(dst - 64, 64).fill(0xAB);
    bytes(dst + MIB, 64).fill(0xCD);
    let write = |addr, len, lkey, raddr, rkey| SendWr {
        wr_id: 5,
        opcode: Opcode::RdmaWrite {
            remote_addr: raddr,
            rkey,
        },
        sges: vec![Sge {
            addr,
            length: len,
            lkey,
        }],
        signaled: true,
    };
    let read = |addr, len, lkey, raddr, rkey| SendWr {
        wr_id: 6,
        opcode: Opcode::RdmaRead {
            remote_addr: raddr,
            rkey,
        },
        sges: vec![Sge {
            addr,
            length: len,
            lkey,
        }],
        signaled: true,
    };
    let (l, r) = (msrc.lkey(), mdst.rkey());
    let cases: Vec<(SendWr, WcStatus)> = vec![
        (write(src, 4096, 0xdead_beef, dst, r), WcStatus::LocProtErr),
        (
            write(src, 4096, l, dst, 0x1234_5678),
            WcStatus::RemAccessErr,
        ),
        (
            write(src, 4096, l, dst + MIB - 100, r),
            WcStatus::RemAccessErr,
        ),
        (write(src, 4096, l, dst - 100, r), WcStatus::RemAccessErr),
        (write(src + MIB - 10, 4096, l, dst, r), WcStatus::LocProtErr),
        (
            write(src, 4096, l, ro.iova(), ro.rkey()),
            WcStatus::RemAccessErr,
        ),
        (
            write(src, 4096, foreign.lkey(), dst, r),
            WcStatus::LocProtErr,
        ),
        (
            write(src, 4096, l, foreign.iova(), foreign.rkey()),
            WcStatus::RemAccessErr,
        ),
        (
            read(ro.iova(), 4096, ro.lkey(), dst, r),
            WcStatus::LocProtErr,
        ),
        (
            read(src, 4096, l, dst + 2 * MIB, mdst.rkey()),
            WcStatus::RemAccessErr,
        ),
        (write(src, u32::MAX, l, dst, r), WcStatus::LocProtErr),
        (write(u64::MAX - 10, 100, l, dst, r), WcStatus::LocProtErr),
    ];
    for (wr, want) in cases {
        let p = pair(&e, QpCaps::default());
        expect_status(&e, &p, wr, want);
    }
    // SEND with nobody receiving, and a receive too small.
    let p = pair(
        &e,
        QpCaps {
            rnr_retry: 2,
            ..QpCaps::default()
        },
    );
    expect_status(
        &e,
        &p,
        SendWr {
            wr_id: 7,
            opcode: Opcode::Send,
            sges: vec![Sge {
                addr: src,
                length: 64,
                lkey: l,
            }],
            signaled: true,
        },
        WcStatus::RnrRetryExcErr,
    );
    let p = pair(&e, QpCaps::default());
    p.b.post_recv(RecvWr {
        wr_id: 8,
        sges: vec![Sge {
            addr: dst,
            length: 16,
            lkey: mdst.lkey(),
        }],
    })
    .unwrap();
    expect_status(
        &e,
        &p,
        SendWr {
            wr_id: 9,
            opcode: Opcode::Send,
            sges: vec![Sge {
                addr: src,
                length: 64,
                lkey: l,
            }],
            signaled: true,
        },
        WcStatus::RemInvReqErr,
    );
    assert_eq!(one(&p.bcq).status, WcStatus::LocLenErr);
    // A QP with no peer.
    let cq = e.rnic.create_cq(16);
    let lonely = e
        .rnic
        .create_qp(&e.pd, &cq, &cq, QpCaps::default())
        .unwrap();
    lonely.post_send(write(src, 64, l, dst, r)).unwrap();
    assert_eq!(one(&cq).status, WcStatus::RetryExcErr);
    // Post-time validation.
    let p = pair(
        &e,
        QpCaps {
            max_sge: 1,
            max_send_wr: 1,
            ..QpCaps::default()
        },
    );
    let two = SendWr {
        wr_id: 1,
        opcode: Opcode::Send,
        sges: vec![
            Sge {
                addr: src,
                length: 1,
                lkey: l
            };
            2
        ],
        signaled: true,
    };
    assert!(matches!(p.a.post_send(two), Err(VerbsError::Invalid(_))));
    // Guard bytes intact: nothing was written outside the MR.
    assert!(bytes(dst - 64, 64).iter().all(|b| *b == 0xAB));
    assert!(bytes(dst + MIB, 64).iter().all(|b| *b == 0xCD));
    assert!(e.rnic.stats().wc_errors >= 14);
}

#[test]
fn implicit_odp_covers_the_space_and_rejects_unbacked_addresses() {
    let e = env(4 * MIB, false, RnicConfig::default());
    let all = e.rnic.reg_mr(&e.pd, 0, u64::MAX, ALL).unwrap();
    assert!(all.is_implicit());
    let p = pair(&e, QpCaps::default());
    fill(e.base, MIB, 3);
    p.a.post_send(SendWr {
        wr_id: 1,
        opcode: Opcode::RdmaWrite {
            remote_addr: e.base + 2 * MIB,
            rkey: all.rkey(),
        },
        sges: vec![Sge {
            addr: e.base,
            length: MIB as u32,
            lkey: all.lkey(),
        }],
        signaled: true,
    })
    .unwrap();
    assert_eq!(one(&p.acq).status, WcStatus::Success);
    assert_eq!(&bytes(e.base + 2 * MIB, MIB)[..], &bytes(e.base, MIB)[..]);
    // Outside every region: the device fault fails, the WQE errors.
    p.a.post_send(SendWr {
        wr_id: 2,
        opcode: Opcode::RdmaWrite {
            remote_addr: 0x1000,
            rkey: all.rkey(),
        },
        sges: vec![Sge {
            addr: e.base,
            length: 64,
            lkey: all.lkey(),
        }],
        signaled: true,
    })
    .unwrap();
    assert_eq!(one(&p.acq).status, WcStatus::RemAccessErr);
    assert!(e.rnic.stats().fault_failures >= 1);
    let _ = e.len;
}

#[test]
fn prefetch_maps_ahead_and_teardown_unmaps_in_one_step() {
    let e = env(8 * MIB, false, RnicConfig::default());
    let mr = e.rnic.reg_mr(&e.pd, e.base, 4 * MIB, ALL).unwrap();
    mr.advise(
        Advice::PrefetchWrite,
        ADVISE_FLAG_FLUSH,
        &[Sge {
            addr: e.base,
            length: (2 * MIB) as u32,
            lkey: mr.lkey(),
        }],
    )
    .unwrap();
    assert_eq!(mr.mapped_pages(), 512);
    let p = pair(&e, QpCaps::default());
    let before = e.rnic.stats().device_faults;
    p.a.post_send(SendWr {
        wr_id: 1,
        opcode: Opcode::RdmaWrite {
            remote_addr: e.base + MIB,
            rkey: mr.rkey(),
        },
        sges: vec![Sge {
            addr: e.base,
            length: MIB as u32,
            lkey: mr.lkey(),
        }],
        signaled: true,
    })
    .unwrap();
    assert_eq!(one(&p.acq).status, WcStatus::Success);
    assert_eq!(
        e.rnic.stats().device_faults,
        before,
        "prefetched pages faulted"
    );
    // Bad advice is refused.
    assert!(mr
        .advise(
            Advice::Prefetch,
            0,
            &[Sge {
                addr: e.base + 5 * MIB,
                length: 10,
                lkey: mr.lkey()
            }]
        )
        .is_err());
    // Teardown: one generation notice empties the device table.
    e.mmu.teardown_all().unwrap();
    assert_eq!(mr.mapped_pages(), 0);
    assert_eq!(e.rnic.stats().generations, 1);
    // NO_FAULT maps only what the mmu already has (nothing now).
    mr.advise(
        Advice::PrefetchNoFault,
        0,
        &[Sge {
            addr: e.base,
            length: 4096,
            lkey: mr.lkey(),
        }],
    )
    .unwrap();
    assert_eq!(mr.mapped_pages(), 0);
}

#[test]
fn a_device_that_never_confirms_is_fenced_within_the_bound() {
    let cfg = RnicConfig {
        fence_timeout: Duration::from_millis(30),
        ..RnicConfig::default()
    };
    let e = env(4 * MIB, false, cfg);
    let mr = e.rnic.reg_mr(&e.pd, e.base, 2 * MIB, ALL).unwrap();
    let p = pair(&e, QpCaps::default());
    let write = SendWr {
        wr_id: 1,
        opcode: Opcode::RdmaWrite {
            remote_addr: e.base + MIB,
            rkey: mr.rkey(),
        },
        sges: vec![Sge {
            addr: e.base,
            length: 4096,
            lkey: mr.lkey(),
        }],
        signaled: true,
    };
    p.a.post_send(write.clone()).unwrap();
    assert_eq!(one(&p.acq).status, WcStatus::Success);
    e.rnic.set_ignore_invalidations(true);
    let t0 = Instant::now();
    e.mmu.invalidate(e.base, PAGE_SIZE).unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "invalidation hung for {took:?}"
    );
    assert!(took >= Duration::from_millis(30));
    assert!(mr.is_fenced());
    assert_eq!(e.rnic.stats().fenced_mrs, 1);
    // Its WQEs now complete with an error; nothing hangs.
    p.a.post_send(write).unwrap();
    assert_eq!(one(&p.acq).status, WcStatus::LocProtErr);
    e.rnic.set_ignore_invalidations(false);
}

#[test]
fn pinned_mrs_translate_everything_up_front() {
    let e = env(4 * MIB, false, RnicConfig::default());
    let pinned = e
        .rnic
        .reg_mr(&e.pd, e.base, 2 * MIB, Access::ALL_REMOTE)
        .unwrap();
    assert!(!pinned.is_odp());
    assert_eq!(pinned.mapped_pages(), 512);
    assert!(pinned.advise(Advice::Prefetch, 0, &[]).is_err());
    assert!(e.rnic.reg_mr(&e.pd, e.base, 0, ALL).is_err());
    assert!(e.rnic.reg_mr(&e.pd, u64::MAX - 5, 100, ALL).is_err());
    drop(pinned);
}
