//! RoCEv2 between two "hosts": two network namespaces joined by a veth pair,
//! each RNIC's socket bound in its own namespace with its own address, so
//! nothing depends on a shared loopback device. Loss is real: an nftables
//! rule (`numgen random mod 100 < N drop` on UDP port 4791) in each
//! namespace drops packets in the kernel. A capture taken by tcpdump on the
//! veth is checked packet by packet with scapy's RoCE layer.
//!
//! These tests need root (namespaces, nftables, tcpdump; CI runs as root)
//! and the packages `scripts/ensure-deps` installs. Without them they fail
//! with a message saying so rather than skip.

mod common;
mod roce_common;

use rdma_passthrough::*;
use roce_common::*;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test needs root (network namespaces, nftables, tcpdump); \
             run it as root, as CI does"
        );
    }
    for tool in ["ip", "nft", "tcpdump"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(found, "`{tool}` is missing: run scripts/ensure-deps");
    }
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces `<name>a`, `<name>b` joined by a veth pair, addresses
/// 10.77.<net>.1 and .2, MTU 9000 (path MTU 4096 fits), and an nftables
/// rule in each dropping `loss_pct` % of incoming RoCE packets.
struct Net {
    a: String,
    b: String,
    ia: Ipv4Addr,
    ib: Ipv4Addr,
    /// The veth end in `a` (where tcpdump listens).
    veth_a: String,
}

impl Net {
    fn new(net: u8, loss_pct: u32) -> Net {
        require_root_and_tools();
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("roce{net}x{id}a"), format!("roce{net}x{id}b"));
        let (ia, ib) = (Ipv4Addr::new(10, 77, net, 1), Ipv4Addr::new(10, 77, net, 2));
        let _ = Command::new("ip").args(["netns", "del", &a]).output();
        let _ = Command::new("ip").args(["netns", "del", &b]).output();
        let (va, vb) = (format!("rv{net}x{id}a"), format!("rv{net}x{id}b"));
        let n = Net {
            a,
            b,
            ia,
            ib,
            veth_a: va.clone(),
        };
        sh(&format!("ip netns add {}", n.a));
        sh(&format!("ip netns add {}", n.b));
        sh(&format!(
            "ip link add {va} netns {} type veth peer name {vb} netns {}",
            n.a, n.b
        ));
        for (ns, dev, ip) in [(&n.a, &va, ia), (&n.b, &vb, ib)] {
            sh(&format!("ip -n {ns} addr add {ip}/24 dev {dev}"));
            sh(&format!("ip -n {ns} link set {dev} mtu 9000 up"));
            sh(&format!("ip -n {ns} link set lo up"));
        }
        // Resolve the neighbours now: packets sent while ARP is pending
        // can be dropped by the kernel, and the capture test counts them.
        for (ns, from, to) in [(&n.a, ia, ib), (&n.b, ib, ia)] {
            in_ns(ns, move || {
                let s = std::net::UdpSocket::bind((from, 0)).unwrap();
                s.send_to(b"arp", (to, 9)).unwrap();
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        for ns in [&n.a, &n.b] {
            if loss_pct > 0 {
                sh(&format!(
                    "ip netns exec {ns} nft -f - <<'EOF'\n\
                     table inet roceloss {{\n\
                       chain input {{\n\
                         type filter hook input priority 0; policy accept;\n\
                         udp dport 4791 numgen random mod 100 < {loss_pct} counter drop\n\
                       }}\n\
                     }}\nEOF"
                ));
            }
        }
        n
    }

    /// Packets the nftables rules dropped in both namespaces.
    fn dropped(&self) -> u64 {
        let mut total = 0;
        for ns in [&self.a, &self.b] {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "nft", "list", "ruleset"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(i) = text.find("counter packets ") {
                let rest = &text[i + "counter packets ".len()..];
                total += rest
                    .split_whitespace()
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        total
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).output();
    }
}

/// Run `f` on a thread that has entered network namespace `ns`: sockets it
/// creates live there (the namespace is per thread; the socket keeps it).
fn in_ns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a namespace file this thread opened; it changes
        // only this thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

fn two_nodes(net: &Net, len: u64, guard_b: bool) -> (Node, Node) {
    let ia = net.ia;
    let ib = net.ib;
    let a = in_ns(&net.a, move || node(ia, len, false, RoceConfig::default()));
    let b = in_ns(&net.b, move || {
        node(ib, len, guard_b, RoceConfig::default())
    });
    (a, b)
}

/// Done-when of issue 12, first bullet (in one process, two namespaces):
/// WRITE, READ and SEND/RECV with stamped data under 1 % real loss each
/// way, while the responder's memory is invalidated and torn down: every
/// message completes, the data is right, retransmits > 0.
#[test]
fn two_hosts_under_one_percent_loss_and_invalidations() {
    let net = Net::new(21, 1);
    let (a, b) = two_nodes(&net, 16 * MIB, true);
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let mb = b.rnic.reg_mr(&b.pd, b.base, b.len, ODP).unwrap();
    let (ea, eb) = connect(&a, &b, QpCaps::default(), 0xff_ff00, 17);
    let dst = b.base + 2 * MIB;
    let churn = Churn::start(b.mmu.clone(), dst, 1024, 11, Duration::from_micros(500));
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut round = 0u64;
    let mut bytes_moved = 0u64;
    while Instant::now() < deadline || round < 4 {
        round += 1;
        let len = if round.is_multiple_of(2) {
            64 << 10
        } else {
            4 * MIB
        };
        let (src, back) = (a.base, a.base + 8 * MIB);
        stamp(src, len, round);
        a.port
            .post_send(
                &ea.qp,
                write(round, vec![sge(src, len, &ma)], dst, mb.rkey()),
            )
            .unwrap();
        a.port
            .post_send(
                &ea.qp,
                read(round, vec![sge(back, len, &ma)], dst, mb.rkey()),
            )
            .unwrap();
        for _ in 0..2 {
            let wc = one(&ea.cq, T);
            assert_eq!(wc.status, WcStatus::Success, "round {round}: {wc:?}");
        }
        check_stamp(back, len, round).unwrap_or_else(|e| panic!("READ round {round}: {e}"));
        // SEND the other way.
        stamp(b.base + 12 * MIB, 100_000, round + 1000);
        a.port
            .post_recv(
                &ea.qp,
                RecvWr {
                    wr_id: round,
                    sges: vec![sge(a.base + 12 * MIB, 100_000, &ma)],
                },
            )
            .unwrap();
        b.port
            .post_send(
                &eb.qp,
                send(round, vec![sge(b.base + 12 * MIB, 100_000, &mb)]),
            )
            .unwrap();
        let wc = one(&eb.cq, T);
        assert_eq!(wc.status, WcStatus::Success, "SEND round {round}: {wc:?}");
        let wc = one(&ea.cq, T);
        assert_eq!(
            (wc.status, wc.byte_len),
            (WcStatus::Success, 100_000),
            "RECV round {round}"
        );
        check_stamp(a.base + 12 * MIB, 100_000, round + 1000)
            .unwrap_or_else(|e| panic!("SEND round {round}: {e}"));
        bytes_moved += 2 * len + 100_000;
    }
    let churn = churn.finish();
    let (sa, sb) = (a.port.stats(), b.port.stats());
    let dropped = net.dropped();
    println!(
        "rounds {round}, {bytes_moved} bytes, churn {}, nft dropped {dropped}\na {sa:?}\nb {sb:?}\n{:?}",
        churn,
        b.rnic.stats()
    );
    assert!(dropped > 0, "the nftables rule dropped nothing");
    assert!(sa.retransmits + sb.retransmits > 0, "{sa:?} {sb:?}");
    assert_eq!(sa.bad_icrc + sb.bad_icrc, 0);
    assert_eq!(b.rnic.stats().fenced_mrs, 0);
    assert!(churn > 10);
}

/// Done-when of issue 12, second bullet: every packet tcpdump captured on
/// the veth during a run (WRITE, READ, SEND, ACKs, RNR NAKs from ODP
/// faults, a remote-access NAK) parses with scapy's RoCE layer and its
/// ICRC verifies.
#[test]
fn capture_parses_with_scapy_and_icrc_verifies() {
    let net = Net::new(22, 0);
    let pcap = std::env::temp_dir().join(format!("roce-{}.pcap", std::process::id()));
    let mut dump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.a,
            "tcpdump",
            "-i",
            &net.veth_a,
            "-U",
            "--immediate-mode",
            "-B",
            "65536",
            "-Z",
            "root",
        ])
        .arg("-w")
        .arg(&pcap)
        .args(["udp", "port", "4791"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting tcpdump");
    // tcpdump says "listening on ..." once it captures.
    let mut line = String::new();
    let mut dump_err = BufReader::new(dump.stderr.take().unwrap());
    dump_err.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "tcpdump: {line}");

    let (a, b) = two_nodes(&net, 8 * MIB, false);
    let ma = a.rnic.reg_mr(&a.pd, a.base, a.len, ODP).unwrap();
    let mb = b.rnic.reg_mr(&b.pd, b.base, b.len, ODP).unwrap();
    let (ea, eb) = connect(&a, &b, QpCaps::default(), 0xff_fffe, 3);
    for (i, len) in [(1u64, 3u64), (2, 4096), (3, 100_000)] {
        stamp(a.base, len, i);
        a.port
            .post_send(
                &ea.qp,
                write(i, vec![sge(a.base, len, &ma)], b.base + MIB, mb.rkey()),
            )
            .unwrap();
        a.port
            .post_send(
                &ea.qp,
                read(
                    i,
                    vec![sge(a.base + MIB, len, &ma)],
                    b.base + MIB,
                    mb.rkey(),
                ),
            )
            .unwrap();
        b.port
            .post_recv(
                &eb.qp,
                RecvWr {
                    wr_id: i,
                    sges: vec![sge(b.base + 4 * MIB, len, &mb)],
                },
            )
            .unwrap();
        a.port
            .post_send(&ea.qp, send(i, vec![sge(a.base, len, &ma)]))
            .unwrap();
        for _ in 0..3 {
            assert_eq!(one(&ea.cq, T).status, WcStatus::Success);
        }
        assert_eq!(one(&eb.cq, T).status, WcStatus::Success);
        check_stamp(a.base + MIB, len, i).unwrap();
        check_stamp(b.base + 4 * MIB, len, i).unwrap();
    }
    // A bad rkey: a remote-access-error NAK goes over the wire too.
    a.port
        .post_send(&ea.qp, write(9, vec![sge(a.base, 8, &ma)], b.base, 0xbad))
        .unwrap();
    assert_eq!(one(&ea.cq, T).status, WcStatus::RemAccessErr);
    std::thread::sleep(Duration::from_millis(300));
    let (sa, sb) = (a.port.stats(), b.port.stats());
    // SAFETY: signalling the tcpdump child this test started.
    unsafe { libc::kill(dump.id() as i32, libc::SIGINT) };
    dump.wait().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut dump_err, &mut rest);
    println!("tcpdump: {rest}");

    let out = Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/roce_tools/check_capture.py"
        ))
        .arg(&pcap)
        .output()
        .expect("running /usr/bin/python3 (scripts/ensure-deps installs python3-scapy)");
    let _ = std::fs::remove_file(&pcap);
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "capture check failed: {report}");
    let v: serde_json::Value = serde_json::from_str(report.trim()).expect("JSON report");
    let packets = v["packets"].as_u64().unwrap();
    // tcpdump may lose a packet or two itself ("dropped by kernel"); the
    // capture must still hold nearly everything that was sent.
    let sent = sa.tx_packets + sb.tx_packets;
    assert!(
        packets <= sent && packets * 10 >= sent * 9,
        "captured {packets} of {sent} packets sent"
    );
    assert_eq!(v["bad"].as_u64(), Some(0));
    let ops = v["opcodes"].as_object().unwrap();
    for op in [
        "RC_RDMA_WRITE_FIRST",
        "RC_RDMA_WRITE_ONLY",
        "RC_RDMA_READ_REQUEST",
        "RC_RDMA_READ_RESPONSE_FIRST",
        "RC_RDMA_READ_RESPONSE_ONLY",
        "RC_SEND_ONLY",
        "RC_SEND_LAST",
        "RC_ACKNOWLEDGE",
    ] {
        assert!(ops.contains_key(op), "no {op} in {ops:?}");
    }
    assert!(sb.rnr_naks_sent > 0 && sb.access_naks_sent == 1, "{sb:?}");
}
