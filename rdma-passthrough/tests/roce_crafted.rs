//! RoCEv2 from a hostile wire: a raw UDP socket posing as the peer of an
//! emulated RNIC sends crafted bad packets; each is dropped or NAKed and
//! counted, and the queue pair keeps working for good packets.

mod common;
mod roce_common;

use rdma_passthrough::roce::{icrc, wire};
use rdma_passthrough::*;
use roce_common::*;
use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// A raw UDP socket posing as the peer sends bad packets: truncated, bad
/// ICRC, unknown QPN, PSN far ahead, bad rkey, a WRITE longer than the MR,
/// a WRITE whose payload disagrees with its RETH. Each is dropped or NAKed
/// and counted; the QP keeps working for good packets.
#[test]
fn crafted_packets_are_dropped_or_naked_and_counted() {
    let (ia, ib) = addrs(17);
    let b = node(ib, 4 * MIB, false, RoceConfig::default());
    let mb = b.rnic.reg_mr(&b.pd, b.base, MIB, ODP).unwrap();
    let peer = UdpSocket::bind(SocketAddrV4::new(ia, 4791)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let cq = b.rnic.create_cq(16);
    let qp = b
        .rnic
        .create_qp(&b.pd, &cq, &cq, QpCaps::default())
        .unwrap();
    b.port
        .connect(
            &qp,
            0,
            RemoteEnd {
                addr: SocketAddrV4::new(ia, 4791),
                qpn: 0x42,
                psn: 1000,
            },
        )
        .unwrap();
    let to = b.port.local_addr();
    let meta = icrc::Ipv4Meta::linux_df(ia, ib);
    let pkt = |op: wire::Op, qpn: u32, psn: u32, reth: Option<wire::Reth>, payload: &[u8]| {
        let mut bth = wire::Bth::new(op, qpn, psn);
        bth.ack_req = true;
        let mut buf = Vec::new();
        wire::build(&mut buf, bth, reth.as_ref(), None, payload);
        icrc::seal(&meta, 4791, 4791, &mut buf);
        buf
    };
    let reply = || {
        let mut buf = [0u8; 2048];
        let n = peer.recv(&mut buf).expect("a reply");
        let p = wire::parse(&buf[..n]).unwrap().aeth.unwrap();
        (wire::parse(&buf[..n]).unwrap().bth.psn, p.kind())
    };
    let qpn = qp.qpn();
    let reth = |va: u64, rkey: u32, len: u32| {
        Some(wire::Reth {
            va,
            rkey,
            dma_len: len,
        })
    };
    let good = pkt(
        wire::Op::WriteOnly,
        qpn,
        1000,
        reth(b.base, mb.rkey(), 8),
        &[7; 8],
    );
    // Truncated, bad ICRC, unknown QPN: dropped silently.
    peer.send_to(&good[..10], to).unwrap();
    let mut bad = good.clone();
    bad[30] ^= 1;
    peer.send_to(&bad, to).unwrap();
    peer.send_to(
        &pkt(
            wire::Op::WriteOnly,
            qpn + 1000,
            1000,
            reth(b.base, mb.rkey(), 8),
            &[1; 8],
        ),
        to,
    )
    .unwrap();
    // Far out of the window: dropped.
    peer.send_to(
        &pkt(
            wire::Op::WriteOnly,
            qpn,
            1000 + (1 << 22),
            reth(b.base, mb.rkey(), 8),
            &[1; 8],
        ),
        to,
    )
    .unwrap();
    // In order and fine: ACKed (after faulting the page in: RNR first).
    let deadline = Instant::now() + T;
    loop {
        peer.send_to(&good, to).unwrap();
        match reply() {
            (1000, wire::AethKind::Ack { .. }) => break,
            (1000, wire::AethKind::RnrNak { .. }) => {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(1));
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert_eq!(bytes(b.base, 8), &[7; 8]);
    // A PSN ahead of the expected one: sequence NAK naming 1001.
    peer.send_to(
        &pkt(
            wire::Op::WriteOnly,
            qpn,
            1005,
            reth(b.base, mb.rkey(), 8),
            &[1; 8],
        ),
        to,
    )
    .unwrap();
    assert_eq!(
        reply(),
        (1001, wire::AethKind::Nak(wire::NakCode::PsnSequenceError))
    );
    // Bad rkey; a WRITE past the MR's end: remote access error NAKs.
    peer.send_to(
        &pkt(
            wire::Op::WriteOnly,
            qpn,
            1001,
            reth(b.base, 0xbad, 8),
            &[1; 8],
        ),
        to,
    )
    .unwrap();
    assert_eq!(
        reply(),
        (1001, wire::AethKind::Nak(wire::NakCode::RemoteAccessError))
    );
    peer.send_to(
        &pkt(
            wire::Op::WriteOnly,
            qpn,
            1002,
            reth(b.base + MIB - 4, mb.rkey(), 8),
            &[1; 8],
        ),
        to,
    )
    .unwrap();
    assert_eq!(
        reply(),
        (1002, wire::AethKind::Nak(wire::NakCode::RemoteAccessError))
    );
    // Payload longer than the RETH says: invalid request.
    peer.send_to(
        &pkt(
            wire::Op::WriteOnly,
            qpn,
            1003,
            reth(b.base, mb.rkey(), 4),
            &[1; 8],
        ),
        to,
    )
    .unwrap();
    assert_eq!(
        reply(),
        (1003, wire::AethKind::Nak(wire::NakCode::InvalidRequest))
    );
    // A duplicate of the first WRITE: re-ACKed with the last PSN done, not
    // executed again.
    bytes(b.base, 8).fill(0);
    peer.send_to(&good, to).unwrap();
    assert_eq!(reply().0, 1003);
    assert_eq!(bytes(b.base, 8), &[0; 8]);
    let s = b.port.stats();
    println!("{s:?}");
    assert_eq!(s.malformed, 1, "{s:?}");
    assert_eq!(s.bad_icrc, 1, "{s:?}");
    assert_eq!(s.unknown_qpn, 1, "{s:?}");
    assert_eq!(s.out_of_window, 1, "{s:?}");
    assert_eq!(s.seq_naks_sent, 1, "{s:?}");
    assert_eq!(s.access_naks_sent, 2, "{s:?}");
    assert_eq!(s.invalid_naks_sent, 1, "{s:?}");
    assert_eq!(s.duplicates, 1, "{s:?}");
}
