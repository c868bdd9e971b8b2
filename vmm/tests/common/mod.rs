//! What several VMM tests read about this process: its resident set and
//! one named thread's CPU time (a hostile guest must not make a VMM thread
//! spin, nor its memory grow).
#![allow(dead_code)]

/// Resident set of this process, KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// CPU seconds used so far by this process's thread named `comm`.
pub fn thread_cpu(comm: &str) -> f64 {
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim_end() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        return (f[0] + f[1]) as f64 / hz;
    }
    panic!("no thread named {comm}");
}

/// A RoCEv2 request packet as a peer at `us` sends it to the RoCE port at
/// `them` (both on UDP port 4791): BTH with AckReq, the RETH if any, the
/// payload and the ICRC Linux would compute (DF set, IP ID 0).
pub fn sealed_request(
    us: std::net::Ipv4Addr,
    them: std::net::Ipv4Addr,
    qpn: u32,
    op: rdma_passthrough::roce::wire::Op,
    psn: u32,
    reth: Option<&rdma_passthrough::roce::wire::Reth>,
    payload: &[u8],
) -> Vec<u8> {
    use rdma_passthrough::roce::{icrc, wire};
    let mut bth = wire::Bth::new(op, qpn, psn);
    bth.ack_req = true;
    let mut buf = Vec::new();
    wire::build(&mut buf, bth, reth, None, payload);
    icrc::seal(&icrc::Ipv4Meta::linux_df(us, them), 4791, 4791, &mut buf);
    buf
}

/// Drive `count` teardowns against a running `writer` guest over `memory`
/// bytes: alternately after a full pass (every page written since the last
/// one, so it retires populated memory) and quickly while the guest
/// refaults, until `deadline`. Then wait (until `deadline + grace`) for two
/// passes' worth of writes, so the last teardown's zeros are checked.
/// Returns (teardowns done, pages written after the last one).
pub fn teardowns_against_writer(
    h: &vmm::vm::VmHandle,
    memory: u64,
    count: u64,
    deadline: std::time::Instant,
    grace: std::time::Duration,
) -> (u64, u64) {
    use std::time::{Duration, Instant};
    let (all, pages_per_mark) = (memory / 4096, 512u64);
    let (mut teardowns, mut marks) = (0, 0u64);
    while teardowns < count && Instant::now() < deadline {
        marks += h.take_progress().iter().filter(|m| m.work).count() as u64;
        let quick = teardowns % 2 == 1;
        if quick || marks * pages_per_mark >= all {
            h.teardown().expect("teardown");
            teardowns += 1;
            marks = 0;
            if quick {
                std::thread::sleep(Duration::from_millis(30));
            }
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut marks = 0u64;
    while marks * pages_per_mark < 2 * all && Instant::now() < deadline + grace {
        marks += h.take_progress().iter().filter(|m| m.work).count() as u64;
        std::thread::sleep(Duration::from_millis(20));
    }
    (teardowns, marks * pages_per_mark)
}
