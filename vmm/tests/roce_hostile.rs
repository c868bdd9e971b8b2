//! A hostile RoCE peer against a `recv-pong` guest: the test does the
//! exchange itself, then speaks raw RoCEv2 from a UDP socket. Each bad
//! input must end in a NAK or an error completion and be counted, never
//! a crash or a message taken as good:
//!
//! * a good message: taken (`checked`), answered with a reply whose every
//!   line carries the guest's own stamp (checked here);
//! * the same PSN again (duplicate): re-ACKed, not delivered twice;
//! * a SEND shorter than the message: delivered, counted `stale`;
//! * four SENDs back to back while the guest has one receive posted:
//!   RNR NAKs (its receive ring is empty), then taken once resent;
//! * a SEND longer than the posted receive: NAK (invalid request), the
//!   guest's receive completes in error, its connection is gone
//!   (`queue_pairs_lost`), and the guest ends with its report.

mod common;

use rdma_passthrough::roce::{icrc, wire};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MSG: usize = 4096;
const OUR_PSN: u32 = 0x100;

/// The stamp of line `i` of message `seq` from `tag` (`payload::pingpong`).
fn stamp(seq: u64, tag: u64, i: u64) -> u64 {
    ((seq + 1) << 32) | (tag << 24) | i
}

fn message(seq: u64) -> Vec<u8> {
    let mut m = vec![0u8; MSG];
    for (i, line) in m.chunks_mut(64).enumerate() {
        line[..8].copy_from_slice(&stamp(seq, 0x01, i as u64).to_le_bytes());
    }
    m
}

struct Peer {
    sock: UdpSocket,
    us: Ipv4Addr,
    them: SocketAddrV4,
    qpn: u32,
    /// Our MSN as a responder (for the ACKs of the guest's replies).
    msn: u32,
    /// The guest's replies, in order: (psn, payload).
    replies: Vec<(u32, Vec<u8>)>,
}

/// What came back for one of our requests.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Ack,
    Rnr,
    Nak(wire::NakCode),
    SeqNak,
}

impl Peer {
    fn send(&self, op: wire::Op, psn: u32, payload: &[u8]) {
        let buf =
            common::sealed_request(self.us, *self.them.ip(), self.qpn, op, psn, None, payload);
        self.sock.send_to(&buf, self.them).unwrap();
    }

    /// The first answer to our `psn` within `wait` (see `next`).
    fn answer(&mut self, psn: u32, wait: Duration) -> Option<Answer> {
        let deadline = Instant::now() + wait;
        while let Some((at, kind)) = self.next(deadline.saturating_duration_since(Instant::now())) {
            let a = match kind {
                wire::AethKind::Ack { .. } if wire::psn_diff(at, psn) >= 0 => Answer::Ack,
                wire::AethKind::RnrNak { .. } if at == psn => Answer::Rnr,
                wire::AethKind::Nak(wire::NakCode::PsnSequenceError) => Answer::SeqNak,
                wire::AethKind::Nak(c) => Answer::Nak(c),
                _ => continue,
            };
            return Some(a);
        }
        None
    }

    /// Receive for up to `wait`: the guest's requests (its replies) are
    /// kept and ACKed; the first ACK/NAK is returned with its PSN.
    fn next(&mut self, wait: Duration) -> Option<(u32, wire::AethKind)> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 9000];
        while Instant::now() < deadline {
            let Ok(n) = self.sock.recv(&mut buf) else {
                continue;
            };
            let p = wire::parse(&buf[..n]).expect("the guest's RNIC sends well-formed packets");
            if p.bth.op.is_request() {
                // A reply from the guest: keep it (once), ACK it.
                if !self.replies.iter().any(|(q, _)| *q == p.bth.psn) {
                    self.replies.push((p.bth.psn, p.payload.to_vec()));
                    self.msn = self.msn.wrapping_add(1);
                }
                let mut ack = Vec::new();
                wire::build(
                    &mut ack,
                    wire::Bth::new(wire::Op::Acknowledge, self.qpn, p.bth.psn),
                    None,
                    Some(&wire::Aeth::ack(self.msn)),
                    &[],
                );
                icrc::seal(
                    &icrc::Ipv4Meta::linux_df(self.us, *self.them.ip()),
                    4791,
                    4791,
                    &mut ack,
                );
                self.sock.send_to(&ack, self.them).unwrap();
                continue;
            }
            if let Some(aeth) = p.aeth {
                return Some((p.bth.psn, aeth.kind()));
            }
        }
        None
    }

    /// Send message `seq` at `psn` until it is ACKed (RNR: resend later).
    fn deliver(&mut self, psn: u32, payload: &[u8]) -> u32 {
        let mut rnr = 0;
        for _ in 0..200 {
            match self.answer(psn, Duration::from_millis(200)) {
                Some(Answer::Ack) => return rnr,
                Some(Answer::Rnr) => rnr += 1,
                Some(a @ Answer::Nak(_)) => panic!("psn {psn:#x}: {a:?}"),
                Some(Answer::SeqNak) | None => {}
            }
            std::thread::sleep(Duration::from_millis(2));
            self.send(wire::Op::SendOnly, psn, payload);
        }
        panic!("psn {psn:#x} never ACKed");
    }
}

#[test]
fn a_hostile_peer_gets_naks_and_the_guest_counts_everything() {
    let net = 46;
    let (us, them) = (Ipv4Addr::new(127, 0, net, 1), Ipv4Addr::new(127, 0, net, 2));
    let exchange = format!("{them}:{}", 18_000 + u32::from(net));
    let server = Command::new(env!("CARGO_BIN_EXE_odpvm"))
        .args([
            "run",
            "--guest",
            "recv-pong",
            "--memory",
            "128M",
            "--vcpus",
            "1",
        ])
        .args(["--msg", "4K", "--roce-bind", &them.to_string()])
        .args(["--roce-listen", &exchange, "--json", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = UdpSocket::bind(SocketAddrV4::new(us, 4791)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    // The exchange, as another odpvm would do it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tcp = loop {
        match TcpStream::connect(&exchange) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("exchange: {e}"),
        }
    };
    writeln!(
        tcp,
        "odpvm-roce-v1 addr={us}:4791 rkey=0x1 window=0x0+0x1000000 qps=0x77:{OUR_PSN:#x}"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(&tcp).read_line(&mut line).unwrap();
    let qps = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("qps="))
        .expect("qps");
    let qpn =
        u32::from_str_radix(qps.split(':').next().unwrap().trim_start_matches("0x"), 16).unwrap();
    let mut peer = Peer {
        sock,
        us,
        them: SocketAddrV4::new(them, 4791),
        qpn,
        msn: 0,
        replies: Vec::new(),
    };

    // A good message, then the same PSN again.
    peer.send(wire::Op::SendOnly, OUR_PSN, &message(0));
    let mut rnr = peer.deliver(OUR_PSN, &message(0));
    peer.send(wire::Op::SendOnly, OUR_PSN, &message(0));
    assert_eq!(
        peer.answer(OUR_PSN, Duration::from_secs(5)),
        Some(Answer::Ack),
        "a duplicate is re-ACKed"
    );
    // Short.
    peer.send(wire::Op::SendOnly, OUR_PSN + 1, &message(1)[..100]);
    rnr += peer.deliver(OUR_PSN + 1, &message(1)[..100]);
    // Four back to back: one receive posted at most.
    for i in 0..4u32 {
        peer.send(
            wire::Op::SendOnly,
            OUR_PSN + 2 + i,
            &message(2 + u64::from(i)),
        );
    }
    for i in 0..4u32 {
        rnr += peer.deliver(OUR_PSN + 2 + i, &message(2 + u64::from(i)));
    }
    // Longer than the receive: two full packets into 4 KiB.
    // (Resent while the guest has no receive posted yet: RNR NAK.)
    let psn = OUR_PSN + 6;
    let mut nak = None;
    'send: for attempt in 0..500 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        peer.send(wire::Op::SendFirst, psn, &message(6));
        peer.send(wire::Op::SendLast, psn + 1, &message(6));
        while let Some((at, kind)) = peer.next(Duration::from_millis(50)) {
            match kind {
                wire::AethKind::Nak(wire::NakCode::PsnSequenceError)
                | wire::AethKind::RnrNak { .. } => continue 'send,
                wire::AethKind::Nak(c) => {
                    nak = Some((at, c));
                    break 'send;
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        nak,
        Some((psn + 1, wire::NakCode::InvalidRequest)),
        "the oversized SEND's NAK"
    );

    let out = server.wait_with_output().unwrap();
    drop(tcp);
    let text = String::from_utf8_lossy(&out.stdout);
    let s: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    println!("{s}\nRNR NAKs seen by the peer: {rnr}");
    assert!(!out.status.success(), "the guest lost its connection");
    let g = &s["vcpu_reports"][0];
    // Taken: 0, 2, 3, 4, 5 good; 1 short (stale).
    assert_eq!(g["checked"], 5, "{g}");
    assert_eq!(g["stale"], 1, "{g}");
    assert_eq!(g["msgs"], 6, "{g}");
    assert!(g["errors"].as_u64().unwrap() >= 1, "{g}");
    assert_eq!(g["passed"], false, "{g}");
    let r = &s["roce"];
    assert!(r["duplicates"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["rnr_naks_sent"].as_u64().unwrap() >= 1, "{r}");
    assert!(rnr >= 1, "the back-to-back SENDs found no receive");
    assert_eq!(r["invalid_naks_sent"], 1, "{r}");
    assert_eq!(r["queue_pairs_lost"], 1, "{r}");
    // Every reply carried the guest's own stamps for the message taken.
    let mut seqs: Vec<u64> = Vec::new();
    for (psn, payload) in &peer.replies {
        assert_eq!(payload.len(), MSG, "reply at {psn:#x}");
        let seq = (u64::from_le_bytes(payload[..8].try_into().unwrap()) >> 32) - 1;
        for (i, line) in payload.chunks(64).enumerate() {
            let v = u64::from_le_bytes(line[..8].try_into().unwrap()) & !(1 << 31);
            assert_eq!(v, stamp(seq, 0x02, i as u64), "reply {seq}, line {i}");
        }
        seqs.push(seq);
    }
    seqs.dedup();
    // In order, for messages taken. One reply is owed at a time: messages
    // sent back to back (beyond the one-in-flight protocol) may get only
    // the latest one's; the last may be cut off by the oversized SEND
    // ending the connection.
    assert_eq!(seqs.first(), Some(&0), "replies {seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "replies {seqs:?}");
    assert!(
        seqs.iter().all(|&q| q < 6) && seqs.len() >= 2,
        "replies {seqs:?}"
    );
}
