//! `odpvm bench roce`: guest RDMA WRITE and READ (bandwidth workloads) and
//! SEND/RECV (`send-ping` against the responder guest's `recv-pong`, one
//! stamped message and one stamped reply at a time) between two odpvm
//! processes over RoCEv2, beside what a plain UDP socket pair moves on the
//! same path with the same packet size.
//!
//! The two VMMs run in two network namespaces joined by a veth pair (each
//! with its own address). Loss is real: an nftables rule in each namespace
//! drops `loss %` of UDP port 4791 packets (`numgen random`), the same rule
//! the UDP baseline goes through. With `--churn` the bench invalidates
//! random ranges of the responder's window and tears its memory down while
//! traffic runs; the responder then checks every WRITE stamp that landed,
//! the requester's guest every READ stamp, and both guests every SEND
//! message's and reply's stamps (`stale_accesses`; `checked`/`wiped`
//! count the SEND messages both guests verified or found torn down).
//!
//! Needs root (namespaces, nftables) and `ip`/`nft` (scripts/ensure-deps).

use crate::api::{Num, Request};
use crate::layout::PAYLOAD_RAM_GPA;
use serde_json::{json, Value};
use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RoceBench {
    /// Messages per row at 64 KiB (4 KiB rows send 8x as many, SEND rows
    /// a quarter, at least 200).
    pub iters: u64,
    /// Loss percentages to run.
    pub losses: Vec<u32>,
    pub churn: bool,
    pub json: bool,
}

const MEMORY: &str = "256M";
const MEMORY_BYTES: u64 = 256 << 20;
const EXCHANGE_PORT: u16 = 18_600;

fn sh(cmd: &str) -> Result<(), String> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces and a veth pair between them, torn down on drop.
struct Net {
    a: String,
    b: String,
    ia: Ipv4Addr,
    ib: Ipv4Addr,
}

impl Net {
    fn new(loss: u32) -> Result<Net, String> {
        let id = std::process::id() % 100_000;
        let net = Net {
            a: format!("odpvmr{id}a"),
            b: format!("odpvmr{id}b"),
            ia: Ipv4Addr::new(10, 79, 0, 1),
            ib: Ipv4Addr::new(10, 79, 0, 2),
        };
        let (va, vb) = (format!("orv{id}a"), format!("orv{id}b"));
        sh(&format!("ip netns add {}", net.a))?;
        sh(&format!("ip netns add {}", net.b))?;
        sh(&format!(
            "ip link add {va} netns {} type veth peer name {vb} netns {}",
            net.a, net.b
        ))?;
        for (ns, dev, ip) in [(&net.a, &va, net.ia), (&net.b, &vb, net.ib)] {
            sh(&format!("ip -n {ns} addr add {ip}/24 dev {dev}"))?;
            sh(&format!("ip -n {ns} link set {dev} mtu 9000 up"))?;
            sh(&format!("ip -n {ns} link set lo up"))?;
            if loss > 0 {
                sh(&format!(
                    "ip netns exec {ns} nft -f - <<'EOF'\ntable inet odpvmloss {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  udp dport 4791 numgen random mod 100 < {loss} drop\n }}\n}}\nEOF"
                ))?;
            }
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.a));
        let _ = sh(&format!("ip netns del {}", self.b));
    }
}

/// Run `f` on a thread inside network namespace `ns`.
fn in_ns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::thread::JoinHandle<Result<R, String>> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on a namespace file this thread opened; it changes
        // only this thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
}

/// What a plain UDP socket pair moves from a to b in `secs`, with
/// datagrams of `size` bytes to port 4791 (through the loss rule too).
fn udp_gbps(net: &Net, size: usize, secs: f64) -> Result<f64, String> {
    let (ia, ib) = (net.ia, net.ib);
    let done = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let (d, b) = (done.clone(), bytes.clone());
    let rx = in_ns(&net.b, move || -> Result<(), String> {
        let s = UdpSocket::bind(SocketAddrV4::new(ib, 4791)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 65536];
        while !d.load(Ordering::Relaxed) {
            if let Ok(n) = s.recv(&mut buf) {
                b.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(100));
    let d = done.clone();
    let tx = in_ns(&net.a, move || -> Result<(), String> {
        let s = UdpSocket::bind(SocketAddrV4::new(ia, 0)).map_err(|e| e.to_string())?;
        let buf = vec![0x5au8; size];
        let to = SocketAddrV4::new(ib, 4791);
        while !d.load(Ordering::Relaxed) {
            let _ = s.send_to(&buf, to);
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = (Instant::now(), bytes.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs_f64(secs));
    let moved = bytes.load(Ordering::Relaxed) - start.1;
    let elapsed = start.0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    for t in [tx, rx] {
        t.join()
            .map_err(|_| "UDP baseline thread panicked")??
            .map_err(|e| format!("UDP baseline: {e}"))?;
    }
    Ok(moved as f64 * 8.0 / elapsed / 1e9)
}

fn last_json(out: &[u8]) -> Result<Value, String> {
    let text = String::from_utf8_lossy(out);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("a VMM's report is not JSON ({e}): {text}"))
}

/// Invalidate random 64 KiB ranges of the responder's window every 2 ms
/// and tear all its memory down every `TEARDOWN_EVERY`, until `stop`.
/// Returns (requests served, of which teardowns).
fn churn(sock: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (base, len) = (PAYLOAD_RAM_GPA + MEMORY_BYTES / 2, MEMORY_BYTES / 2);
        let (mut x, mut n, mut teardowns) = (0x9e37_79b9u64, 0u64, 0u64);
        let mut last_teardown = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let chunk = 64 << 10;
            let gpa = base + ((x >> 33) % (len / chunk)) * chunk;
            let teardown = last_teardown.elapsed() > TEARDOWN_EVERY;
            let req = if teardown {
                last_teardown = Instant::now();
                Request::Teardown
            } else {
                Request::Invalidate {
                    gpa: Num(gpa),
                    len: Num(chunk),
                }
            };
            if crate::api::request(&sock, &req, Duration::from_secs(10)).is_ok() {
                n += 1;
                teardowns += u64::from(teardown);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (n, teardowns)
    })
}

/// How often `--churn` tears the responder's memory down: often enough
/// that every row (the shortest lasts ~0.3 s) sees several under traffic.
const TEARDOWN_EVERY: Duration = Duration::from_millis(50);

struct Row {
    op: &'static str,
    msg: u64,
    loss: u32,
    gbps: f64,
    udp_gbps: f64,
    retransmits: u64,
    rnr_naks: u64,
    stale: u64,
    /// SEND rows: messages and replies whose stamps the two guests
    /// verified, and those a teardown or invalidation wiped (excused).
    checked: u64,
    wiped: u64,
    churn_ops: u64,
    teardowns: u64,
}

fn pair(
    net: &Net,
    exe: &Path,
    op: &'static str,
    msg: u64,
    iters: u64,
    churn_on: bool,
) -> Result<Row, String> {
    let sock = std::env::temp_dir().join(format!("odpvm-roce-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let exchange = format!("{}:{EXCHANGE_PORT}", net.ib);
    let server_guest = if op == "send" { "recv-pong" } else { "idle" };
    let mut server = Command::new("ip")
        .args(["netns", "exec", &net.b])
        .arg(exe)
        .args([
            "run",
            "--guest",
            server_guest,
            "--memory",
            MEMORY,
            "--vcpus",
            "1",
        ])
        .args(["--msg", &msg.to_string()])
        .args([
            "--roce-bind",
            &net.ib.to_string(),
            "--roce-listen",
            &exchange,
        ])
        .arg("--api-sock")
        .arg(&sock)
        .args(["--json", "--timeout", "600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the responder VMM: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let churner = churn_on.then(|| churn(sock.clone(), stop.clone()));
    let guest = match op {
        "write" => "rdma-write-bw",
        "read" => "rdma-read-bw",
        // One message and one reply at a time: a latency workload, so its
        // bandwidth is not comparable to the others'.
        _ => "send-ping",
    };
    let client = Command::new("ip")
        .args(["netns", "exec", &net.a])
        .arg(exe)
        .args(["run", "--guest", guest, "--memory", MEMORY, "--vcpus", "1"])
        .args(["--msg", &msg.to_string(), "--iters", &iters.to_string()])
        .args([
            "--roce-bind",
            &net.ia.to_string(),
            "--roce-connect",
            &exchange,
        ])
        .args(["--json", "--timeout", "600"])
        .output()
        .map_err(|e| format!("starting the requester VMM: {e}"))?;
    stop.store(true, Ordering::Relaxed);
    let (churn_ops, teardowns) = churner
        .map(|t| t.join().unwrap_or((0, 0)))
        .unwrap_or((0, 0));
    if !client.status.success() {
        let _ = server.kill();
        let s = server.wait_with_output();
        let (s_out, s_err) = s
            .map(|o| {
                let out = String::from_utf8_lossy(&o.stdout).to_string();
                let err = String::from_utf8_lossy(&o.stderr).to_string();
                (out, err)
            })
            .unwrap_or_default();
        let report = String::from_utf8_lossy(&client.stdout);
        return Err(format!(
            "the requester VMM failed ({}): {} {}\nthe responder VMM: {} {}",
            client.status,
            String::from_utf8_lossy(&client.stderr).trim(),
            report.lines().last().unwrap_or_default(),
            s_err.trim(),
            s_out.lines().last().unwrap_or_default()
        ));
    }
    let mut server_err = String::new();
    if let Some(e) = server.stderr.take() {
        for l in std::io::BufReader::new(e).lines().map_while(Result::ok) {
            server_err.push_str(&l);
            server_err.push('\n');
        }
    }
    let server = server
        .wait_with_output()
        .map_err(|e| format!("waiting for the responder VMM: {e}"))?;
    let _ = std::fs::remove_file(&sock);
    let (c, s) = (
        last_json(&client.stdout)?,
        last_json(&server.stdout).map_err(|e| format!("{e} {server_err}"))?,
    );
    let p = &c["perftest"][0];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    if n(&p["errors"]) > 0 || c["guest_result"] != "pass" {
        return Err(format!("the requester's guest saw errors: {c}"));
    }
    // The responder's guest (SEND rows): its own stamp checks.
    let sg = &s["vcpu_reports"][0];
    if op == "send" && (s["guest_result"] != "pass" || n(&sg["stale"]) > 0) {
        return Err(format!("the responder's guest failed: {s}"));
    }
    let cg = &c["vcpu_reports"][0];
    Ok(Row {
        op,
        msg,
        loss: 0,
        gbps: p["bw_avg_gbps"].as_f64().unwrap_or(0.0),
        udp_gbps: 0.0,
        retransmits: n(&c["roce"]["retransmits"]) + n(&s["roce"]["retransmits"]),
        rnr_naks: n(&s["roce"]["rnr_naks_sent"]),
        stale: n(&s["roce"]["stale_accesses"]) + n(&p["stale"]) + n(&sg["stale"]),
        checked: n(&cg["checked"]) + n(&sg["checked"]),
        wiped: n(&cg["wiped"]) + n(&sg["wiped"]),
        churn_ops,
        teardowns,
    })
}

pub fn run(o: &RoceBench) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "bench roce needs root: its loss comes from nftables rules in network namespaces"
                .into(),
        );
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding odpvm: {e}"))?;
    if !o.json {
        println!(
            "{:<6} {:>8} {:>5} {:>9} {:>9} {:>7} {:>11} {:>9} {:>6}",
            "op", "msg", "loss%", "Gb/s", "udp Gb/s", "ratio", "retransmit", "rnr naks", "stale"
        );
    }
    for &loss in &o.losses {
        let net = Net::new(loss)?;
        for msg in [4096u64, 64 << 10] {
            // A packet as RoCE sends it: BTH + payload + ICRC (RETH aside).
            let udp = udp_gbps(&net, 12 + msg.min(4096) as usize + 4, 1.0)?;
            for op in ["write", "read", "send"] {
                let iters = match (op, msg < 65536) {
                    // At least 200: with --churn, long enough (~0.3 s) for
                    // several teardowns to land under traffic.
                    ("send", _) => (o.iters / 4).max(200),
                    (_, true) => o.iters * 8,
                    _ => o.iters,
                };
                let mut row = pair(&net, &exe, op, msg, iters, o.churn)?;
                row.loss = loss;
                row.udp_gbps = udp;
                let r = &row;
                if o.json {
                    println!(
                        "{}",
                        json!({
                            "bench": "roce", "op": r.op, "msg_bytes": r.msg, "loss_pct": r.loss,
                            "gbps": r.gbps, "udp_gbps": r.udp_gbps, "retransmits": r.retransmits,
                            "rnr_naks": r.rnr_naks, "stale_accesses": r.stale,
                            "churn_ops": r.churn_ops, "iterations": iters,
                            "checked": r.checked, "wiped": r.wiped,
                            "teardowns": r.teardowns,
                        })
                    );
                } else {
                    println!(
                        "{:<6} {:>8} {:>5} {:>9.2} {:>9.2} {:>7.2} {:>11} {:>9} {:>6}",
                        r.op,
                        r.msg,
                        r.loss,
                        r.gbps,
                        r.udp_gbps,
                        r.gbps / r.udp_gbps.max(1e-9),
                        r.retransmits,
                        r.rnr_naks,
                        r.stale
                    );
                }
            }
        }
    }
    Ok(())
}
