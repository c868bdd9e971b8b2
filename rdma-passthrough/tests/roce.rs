//! RoCEv2 between two emulated RNICs in this process over real UDP sockets
//! on loopback addresses (each test its own pair of addresses): WRITE,
//! READ and SEND with stamped data, ODP faults answered with RNR NAKs,
//! error NAKs, retry exhaustion, invalidations under incoming traffic
//! (crafted bad packets: `roce_crafted.rs`).

mod common;
mod roce_common;

use rdma_passthrough::roce::{icrc, wire};
use rdma_passthrough::*;
use roce_common::*;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// WRITE (several SGEs, odd offsets), READ back, and multi-packet SEND,
/// both directions, at both path MTUs, with PSNs that wrap past 2^24.
fn traffic(net: u8, mtu: usize) {
    let (ia, ib) = addrs(net);
    let config = RoceConfig {
        mtu,
        ..RoceConfig::default()
    };
    let a = node(ia, 32 * MIB, false, config.clone());
    let b = node(ib, 32 * MIB, false, config);
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let mb = b.rnic.reg_mr(&b.pd, b.base, b.len, ODP).unwrap();
    // Start just below the 24-bit wrap so the PSNs wrap mid-message.
    let (ea, eb) = connect(&a, &b, QpCaps::default(), 0xff_fff0, 0xff_ffe0);

    for (round, len) in [(1u64, 1u64), (2, 4095), (3, 3 * MIB + 123), (4, 64 << 10)] {
        let src = a.base + 7;
        let dst = b.base + 8 * MIB + 5;
        let back = a.base + 16 * MIB + 3;
        stamp(src, len, round);
        let half = len / 2;
        let sges = if half > 0 {
            vec![sge(src, half, &ma), sge(src + half, len - half, &ma)]
        } else {
            vec![sge(src, len, &ma)]
        };
        a.port
            .post_send(&ea.qp, write(round, sges, dst, mb.rkey()))
            .unwrap();
        let wc = one(&ea.cq, T);
        assert_eq!(
            (wc.wr_id, wc.status, wc.byte_len as u64),
            (round, WcStatus::Success, len),
            "WRITE {len}"
        );
        check_stamp(dst, len, round).unwrap_or_else(|e| panic!("WRITE {len}: {e}"));

        a.port
            .post_send(
                &ea.qp,
                read(round + 100, vec![sge(back, len, &ma)], dst, mb.rkey()),
            )
            .unwrap();
        let wc = one(&ea.cq, T);
        assert_eq!(
            (wc.status, wc.opcode),
            (WcStatus::Success, WcOpcode::RdmaRead)
        );
        check_stamp(back, len, round).unwrap_or_else(|e| panic!("READ {len}: {e}"));

        // SEND the other way, into a receive split over two SGEs.
        let rbuf = a.base + 24 * MIB + 1;
        stamp(b.base + 3, len, round + 50);
        a.port
            .post_recv(
                &ea.qp,
                RecvWr {
                    wr_id: round + 200,
                    sges: vec![sge(rbuf, 100, &ma), sge(rbuf + 100, len + 100, &ma)],
                },
            )
            .unwrap();
        b.port
            .post_send(&eb.qp, send(round + 300, vec![sge(b.base + 3, len, &mb)]))
            .unwrap();
        let wc = one(&eb.cq, T);
        assert_eq!((wc.status, wc.opcode), (WcStatus::Success, WcOpcode::Send));
        let wc = one(&ea.cq, T);
        assert_eq!(
            (wc.wr_id, wc.status, wc.opcode, wc.byte_len as u64),
            (round + 200, WcStatus::Success, WcOpcode::Recv, len)
        );
        check_stamp(rbuf, len, round + 50).unwrap_or_else(|e| panic!("SEND {len}: {e}"));
    }
    let (sa, sb) = (a.port.stats(), b.port.stats());
    println!("mtu {mtu}: a {sa:?}\nb {sb:?}");
    assert_eq!(sa.bad_icrc + sb.bad_icrc + sa.malformed + sb.malformed, 0);
    assert!(!ea.qp.in_error() && !eb.qp.in_error());
}

#[test]
fn write_read_send_between_two_rnics_mtu_4096() {
    traffic(11, 4096);
}

#[test]
fn write_read_send_between_two_rnics_mtu_1024() {
    traffic(12, 1024);
}

/// The responder's MR is ODP and nothing is mapped: the first WRITE/READ
/// into it raises device page faults, answered with RNR NAKs until the
/// page-fault thread has mapped the pages; the requester retries.
#[test]
fn odp_faults_on_the_responder_answer_with_rnr_naks() {
    let (ia, ib) = addrs(13);
    let a = node(ia, 8 * MIB, false, RoceConfig::default());
    let b = node(ib, 8 * MIB, false, RoceConfig::default());
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let mb = b.rnic.reg_mr(&b.pd, b.base, b.len, ODP).unwrap();
    assert_eq!(mb.mapped_pages(), 0);
    let (ea, _eb) = connect(&a, &b, QpCaps::default(), 1, 2);
    stamp(a.base, 4 * MIB, 9);
    a.port
        .post_send(
            &ea.qp,
            write(1, vec![sge(a.base, 4 * MIB, &ma)], b.base, mb.rkey()),
        )
        .unwrap();
    assert_eq!(one(&ea.cq, T).status, WcStatus::Success);
    check_stamp(b.base, 4 * MIB, 9).unwrap();
    let s = b.port.stats();
    assert!(s.rnr_naks_sent > 0, "{s:?}");
    assert!(a.port.stats().rnr_naks_received > 0);
    assert!(b.rnic.stats().device_faults > 0);
    assert!(mb.mapped_pages() >= 1024);
}

/// Bad rkey, a range past the MR's end, a READ from a write-only MR: the
/// responder NAKs with remote access error, the requester completes with
/// REM_ACCESS_ERR and its QP enters the error state (later WRs flush).
#[test]
fn bad_rkey_and_bounds_complete_with_remote_access_error() {
    let (ia, ib) = addrs(14);
    let a = node(ia, 4 * MIB, false, RoceConfig::default());
    let b = node(ib, 4 * MIB, false, RoceConfig::default());
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let mb = b.rnic.reg_mr(&b.pd, b.base, MIB, ODP).unwrap();
    let wo = b
        .rnic
        .reg_mr(
            &b.pd,
            b.base + MIB,
            MIB,
            Access(Access::LOCAL_WRITE.0 | Access::REMOTE_WRITE.0 | Access::ON_DEMAND.0),
        )
        .unwrap();
    let cases = [
        write(1, vec![sge(a.base, 4096, &ma)], b.base, mb.rkey() ^ 0x100),
        write(
            2,
            vec![sge(a.base, 8192, &ma)],
            b.base + MIB - 4096,
            mb.rkey(),
        ),
        read(3, vec![sge(a.base, 4096, &ma)], b.base + MIB, wo.rkey()),
    ];
    for wr in cases {
        let (ea, _eb) = connect(&a, &b, QpCaps::default(), 100, 200);
        let id = wr.wr_id;
        a.port.post_send(&ea.qp, wr).unwrap();
        a.port
            .post_send(
                &ea.qp,
                write(99, vec![sge(a.base, 64, &ma)], b.base, mb.rkey()),
            )
            .unwrap();
        let wc = one(&ea.cq, T);
        assert_eq!((wc.wr_id, wc.status), (id, WcStatus::RemAccessErr));
        let wc = one(&ea.cq, T);
        assert_eq!((wc.wr_id, wc.status), (99, WcStatus::WrFlushErr));
        assert!(ea.qp.in_error());
    }
    assert_eq!(b.port.stats().access_naks_sent, 3);
    // Nothing outside the MR was written.
    assert_eq!(bytes(b.base + MIB, 4096), &[0u8; 4096][..]);
}

/// No receive posted and rnr_retry = 2: the SEND is RNR-NAKed three
/// times and ends in RNR_RETRY_EXC_ERR.
#[test]
fn missing_receive_ends_in_rnr_retry_exc_err() {
    let (ia, ib) = addrs(15);
    let a = node(ia, MIB, false, RoceConfig::default());
    let b = node(ib, MIB, false, RoceConfig::default());
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let caps = QpCaps {
        rnr_retry: 2,
        ..QpCaps::default()
    };
    let (ea, _eb) = connect(&a, &b, caps, 5, 6);
    a.port
        .post_send(&ea.qp, send(1, vec![sge(a.base, 100, &ma)]))
        .unwrap();
    let wc = one(&ea.cq, T);
    assert_eq!(wc.status, WcStatus::RnrRetryExcErr);
    assert_eq!(a.port.stats().rnr_naks_received, 3);
}

/// The peer address answers nothing: retry_cnt timer expiries, then
/// RETRY_EXC_ERR.
#[test]
fn retry_exhaustion_ends_in_retry_exc_err() {
    let (ia, ib) = addrs(16);
    let config = RoceConfig {
        retransmit_timeout: Duration::from_millis(5),
        retry_cnt: 3,
        ..RoceConfig::default()
    };
    let a = node(ia, MIB, false, config);
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let cq = a.rnic.create_cq(16);
    let qp = a
        .rnic
        .create_qp(&a.pd, &cq, &cq, QpCaps::default())
        .unwrap();
    a.port
        .connect(
            &qp,
            0,
            RemoteEnd {
                addr: SocketAddrV4::new(ib, 4791),
                qpn: 77,
                psn: 0,
            },
        )
        .unwrap();
    a.port
        .post_send(
            &qp,
            write(1, vec![sge(a.base, 10_000, &ma)], 0x1000, 0x1234),
        )
        .unwrap();
    let wc = one(&cq, T);
    assert_eq!(wc.status, WcStatus::RetryExcErr);
    let s = a.port.stats();
    assert_eq!(s.timeouts, 4, "{s:?}");
    // Each expiry resent the message's three packets.
    assert_eq!(s.retransmits, 9, "{s:?}");
}

/// The responder's memory is invalidated (pages made PROT_NONE: a stale
/// access crashes) and torn down in one step while WRITEs and READs
/// stream into it; every message completes with the data of its round.
#[test]
fn invalidations_under_incoming_writes_leave_nothing_stale() {
    let (ia, ib) = addrs(18);
    let a = node(ia, 8 * MIB, false, RoceConfig::default());
    let b = node(ib, 8 * MIB, true, RoceConfig::default());
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let mb = b.rnic.reg_mr(&b.pd, b.base, b.len, ODP).unwrap();
    let (ea, _eb) = connect(&a, &b, QpCaps::default(), 0, 0);
    let dst = b.base + MIB;
    let churn = Churn::start(b.mmu.clone(), dst, 512, 7, Duration::from_micros(200));
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        let (src, back) = (a.base, a.base + 4 * MIB);
        stamp(src, 2 * MIB, round);
        a.port
            .post_send(
                &ea.qp,
                write(round, vec![sge(src, 2 * MIB, &ma)], dst, mb.rkey()),
            )
            .unwrap();
        a.port
            .post_send(
                &ea.qp,
                read(round, vec![sge(back, 2 * MIB, &ma)], dst, mb.rkey()),
            )
            .unwrap();
        for _ in 0..2 {
            let wc = one(&ea.cq, T);
            assert_eq!(wc.status, WcStatus::Success, "round {round}: {wc:?}");
        }
        check_stamp(back, 2 * MIB, round).unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    let churn = churn.finish();
    let s = b.rnic.stats();
    println!(
        "rounds {round}, churn {}, {s:?}\n{:?}",
        churn,
        b.port.stats()
    );
    assert!(round > 3);
    assert!(s.invalidations + s.generations > 10, "{s:?}");
    assert_eq!(s.fenced_mrs, 0);
    assert!(b.port.stats().rnr_naks_sent > 0);
}

/// Regression: with a small socket buffer (what an unprivileged process
/// gets), a window of READ responses used to overflow the requester's
/// buffer on every burst and end in RETRY_EXC_ERR. The port now clamps
/// its window to the buffer it was granted.
#[test]
fn small_socket_buffers_do_not_livelock_reads() {
    let (ia, ib) = addrs(19);
    let config = RoceConfig {
        socket_buffer: 200_000,
        ..RoceConfig::default()
    };
    let a = node(ia, 16 * MIB, false, config.clone());
    let b = node(ib, 16 * MIB, false, config);
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let mb = b.rnic.reg_mr(&b.pd, b.base, b.len, ODP).unwrap();
    let (ea, _eb) = connect(&a, &b, QpCaps::default(), 0, 0);
    let msg = 64 << 10;
    let (total, mut posted, mut done) = (2000u64, 0u64, 0u64);
    while done < total {
        while posted < total && posted - done < 64 {
            let off = (posted % 128) * msg;
            a.port
                .post_send(
                    &ea.qp,
                    read(
                        posted,
                        vec![sge(a.base + off, msg, &ma)],
                        b.base + off,
                        mb.rkey(),
                    ),
                )
                .unwrap();
            posted += 1;
        }
        for wc in ea.cq.wait(1, Duration::from_micros(50), T) {
            assert_eq!(wc.status, WcStatus::Success, "{wc:?} {:?}", a.port.stats());
            done += 1;
        }
    }
    println!("{:?}", a.port.stats());
}

/// Stands between two ports on `at` (both connect to it as their peer):
/// forwards each datagram to the other side, re-sealed for the new
/// addresses, except during a stall, when it holds everything and
/// releases it at the stall's end — the peer's thread descheduled on a
/// loaded host, reproduced on a schedule: `run` ms forwarding, then
/// `stall` ms holding, until `stop`.
fn stalling_relay(
    at: Ipv4Addr,
    a: SocketAddrV4,
    b: SocketAddrV4,
    run: u64,
    stall: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let sock = UdpSocket::bind(SocketAddrV4::new(at, 4791)).unwrap();
    sock.set_read_timeout(Some(Duration::from_micros(200)))
        .unwrap();
    std::thread::spawn(move || {
        let (mut since, mut stalled, mut stalls) = (Instant::now(), false, 0u64);
        let mut held: Vec<(SocketAddrV4, Vec<u8>)> = Vec::new();
        let mut buf = [0u8; 9000];
        while !stop.load(Ordering::Relaxed) {
            // Phases by their own length (a late wake-up of this thread
            // lengthens one, it does not skip one).
            let elapsed = since.elapsed();
            if !stalled && elapsed >= Duration::from_millis(run) {
                (stalled, since) = (true, Instant::now());
                stalls += 1;
            } else if stalled && elapsed >= Duration::from_millis(stall) {
                (stalled, since) = (false, Instant::now());
                for (to, pkt) in held.drain(..) {
                    let _ = sock.send_to(&pkt, to);
                }
            }
            let Ok((n, std::net::SocketAddr::V4(from))) = sock.recv_from(&mut buf) else {
                continue;
            };
            let to = if from == a { b } else { a };
            let mut pkt = buf[..n].to_vec();
            icrc::seal(
                &icrc::Ipv4Meta::linux_df(at, *to.ip()),
                4791,
                4791,
                &mut pkt,
            );
            if stalled {
                held.push((to, pkt));
            } else {
                let _ = sock.send_to(&pkt, to);
            }
        }
        stalls
    })
}

/// The flake class behind `RETRY_EXC_ERR` on a loaded host: a responder
/// that alternates between answering RNR NAKs (no receive yet — or an ODP
/// fault in progress) and silence (its thread descheduled for 120 ms at a
/// time, reproduced by a relay that holds its traffic). Each RNR NAK
/// restarts the requester's timer, so every stall costs it at least one
/// timeout. When an RNR NAK did not end the run of consecutive timeouts,
/// the sixth stall (retry_cnt 7) failed the SEND with RETRY_EXC_ERR
/// though the responder answered between every two; now the SEND
/// completes once the receive is posted, after far more than retry_cnt
/// timeouts in all.
#[test]
fn rnr_naks_between_stalls_do_not_exhaust_the_retry_count() {
    let (ia, ib) = addrs(20);
    let ir = Ipv4Addr::new(127, 0, 20, 3);
    let a = node(ia, MIB, false, RoceConfig::default());
    let b = node(ib, MIB, false, RoceConfig::default());
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let mb = b.rnic.reg_mr(&b.pd, b.base, b.len, ODP).unwrap();
    let relay = SocketAddrV4::new(ir, 4791);
    let (acq, bcq) = (a.rnic.create_cq(16), b.rnic.create_cq(16));
    let caps = QpCaps::default();
    assert_eq!(caps.rnr_retry, 7, "RNR NAKs retried forever");
    let qa = a.rnic.create_qp(&a.pd, &acq, &acq, caps).unwrap();
    let qb = b.rnic.create_qp(&b.pd, &bcq, &bcq, caps).unwrap();
    let to = |qpn: u32, psn: u32| RemoteEnd {
        addr: relay,
        qpn,
        psn,
    };
    a.port.connect(&qa, 10, to(qb.qpn(), 20)).unwrap();
    b.port.connect(&qb, 20, to(qa.qpn(), 10)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let relay = stalling_relay(
        ir,
        a.port.local_addr(),
        b.port.local_addr(),
        5,
        120,
        stop.clone(),
    );
    stamp(a.base, 4096, 33);
    a.port
        .post_send(&qa, send(1, vec![sge(a.base, 4096, &ma)]))
        .unwrap();
    // Stall cycles with no receive posted at b, until the requester has
    // timed out twice retry_cnt times in all (about eight cycles; more on
    // a loaded host, where fewer expiries fit in a stall).
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.port.stats().timeouts < 16 && Instant::now() < deadline {
        let early = acq.wait(1, Duration::from_micros(50), Duration::from_millis(100));
        assert!(early.is_empty(), "the SEND ended early: {early:?}");
    }
    b.port
        .post_recv(
            &qb,
            RecvWr {
                wr_id: 2,
                sges: vec![sge(b.base, 4096, &mb)],
            },
        )
        .unwrap();
    let wc = one(&acq, T);
    stop.store(true, Ordering::Relaxed);
    let stalls = relay.join().unwrap();
    let s = a.port.stats();
    println!("stalls {stalls}, requester {s:?}");
    assert_eq!(wc.status, WcStatus::Success, "{s:?}");
    assert_eq!(one(&bcq, T).status, WcStatus::Success);
    check_stamp(b.base, 4096, 33).unwrap();
    assert!(s.rnr_naks_received > 0, "{s:?}");
    assert!(s.timeouts > 7, "fewer timeouts than retry_cnt: {s:?}");
    assert!(stalls >= 3, "the relay stalled {stalls} times");
}

/// Two QPs on one port, created with different `min_rnr_timer`s and no
/// receive posted: a SEND to each is answered with an RNR NAK carrying
/// that QP's own timer (it used to be the port's one setting for all).
#[test]
fn rnr_naks_carry_each_qps_own_min_rnr_timer() {
    let (ia, ib) = addrs(21);
    let b = node(ib, MIB, false, RoceConfig::default());
    let peer = UdpSocket::bind(SocketAddrV4::new(ia, 4791)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let meta = icrc::Ipv4Meta::linux_df(ia, ib);
    let cq = b.rnic.create_cq(16);
    let mut qps = Vec::new();
    for (i, timer) in [(0u32, 3u8), (1, 20)] {
        let caps = QpCaps {
            min_rnr_timer: timer,
            ..QpCaps::default()
        };
        let qp = b.rnic.create_qp(&b.pd, &cq, &cq, caps).unwrap();
        b.port
            .connect(
                &qp,
                0,
                RemoteEnd {
                    addr: SocketAddrV4::new(ia, 4791),
                    qpn: 0x40 + i,
                    psn: 500,
                },
            )
            .unwrap();
        qps.push((qp, timer));
    }
    for (qp, timer) in &qps {
        let mut bth = wire::Bth::new(wire::Op::SendOnly, qp.qpn(), 500);
        bth.ack_req = true;
        let mut buf = Vec::new();
        wire::build(&mut buf, bth, None, None, &[9; 64]);
        icrc::seal(&meta, 4791, 4791, &mut buf);
        peer.send_to(&buf, b.port.local_addr()).unwrap();
        let mut r = [0u8; 2048];
        let n = peer.recv(&mut r).expect("an RNR NAK");
        let p = wire::parse(&r[..n]).unwrap();
        assert_eq!(p.bth.psn, 500);
        assert_eq!(
            p.aeth.unwrap().kind(),
            wire::AethKind::RnrNak { timer: *timer },
            "QP {:#x}",
            qp.qpn()
        );
    }
    assert_eq!(b.port.stats().rnr_naks_sent, 2);
}

/// The responder's RNIC fences its MR (its device thread missed an
/// invalidation's deadline — on a loaded host, a starved thread; here the
/// test hook holds the invalidation back). A WRITE arriving meanwhile is
/// answered with RNR NAKs, not a remote access error that would end the
/// connection; once the device answers, the MR is re-registered and the
/// WRITE lands.
#[test]
fn a_fenced_mr_on_the_responder_answers_rnr_until_it_recovers() {
    let (ia, ib) = addrs(22);
    let a = node(ia, 4 * MIB, false, RoceConfig::default());
    let b = node_with(
        ib,
        4 * MIB,
        false,
        RoceConfig::default(),
        RnicConfig {
            fence_timeout: Duration::from_millis(50),
            ..RnicConfig::default()
        },
    );
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let mb = b.rnic.reg_mr(&b.pd, b.base, b.len, ODP).unwrap();
    let (ea, _eb) = connect(&a, &b, QpCaps::default(), 3, 4);
    let dst = b.base + MIB;
    stamp(a.base, 64 << 10, 1);
    let w = |id| write(id, vec![sge(a.base, 64 << 10, &ma)], dst, mb.rkey());
    a.port.post_send(&ea.qp, w(1)).unwrap();
    assert_eq!(one(&ea.cq, T).status, WcStatus::Success);
    b.rnic.set_ignore_invalidations(true);
    b.mmu.invalidate(dst, mmu::PAGE_SIZE).unwrap();
    assert!(mb.is_fenced());
    stamp(a.base, 64 << 10, 2);
    a.port.post_send(&ea.qp, w(2)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let early = ea
        .cq
        .wait(1, Duration::from_micros(50), Duration::from_millis(1));
    assert!(early.is_empty(), "completed while fenced: {early:?}");
    let rnr = b.port.stats().rnr_naks_sent;
    assert!(rnr > 0, "{:?}", b.port.stats());
    assert_eq!(b.port.stats().access_naks_sent, 0);
    b.rnic.set_ignore_invalidations(false);
    let wc = one(&ea.cq, T);
    assert_eq!(wc.status, WcStatus::Success, "{:?}", b.port.stats());
    check_stamp(dst, 64 << 10, 2).unwrap();
    assert!(!mb.is_fenced());
    assert_eq!(b.rnic.stats().mr_recoveries, 1);
}
