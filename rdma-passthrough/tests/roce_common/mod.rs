//! Shared set-up of the RoCE tests: RNICs over real process memory (an mmu
//! whose iova == host address), each with a RoCE port, and QPs connected
//! across them.
#![allow(dead_code)]

use mmu::Mmu;
use rdma_passthrough::*;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

pub use crate::common::MIB;
/// A test's own pair of loopback addresses, `127.0.n.1` and `127.0.n.2`.
pub fn addrs(n: u8) -> (Ipv4Addr, Ipv4Addr) {
    (Ipv4Addr::new(127, 0, n, 1), Ipv4Addr::new(127, 0, n, 2))
}

pub const ODP: Access = Access(Access::ALL_REMOTE.0 | Access::ON_DEMAND.0);

/// One "host": memory, an mmu, an emulated RNIC and its RoCE port.
pub struct Node {
    pub base: u64,
    pub len: u64,
    pub mmu: Arc<Mmu>,
    pub rnic: Arc<EmulatedRnic>,
    pub pd: Pd,
    pub port: RocePort,
}

/// A node whose RNIC fences an MR only after 5 s without an invalidation
/// confirmed: these tests prove the transport, and a test host loaded with
/// other builds can starve the device thread past the default 100 ms.
pub fn node(addr: Ipv4Addr, len: u64, guard: bool, config: RoceConfig) -> Node {
    let rnic = RnicConfig {
        fence_timeout: Duration::from_secs(5),
        ..RnicConfig::default()
    };
    node_with(addr, len, guard, config, rnic)
}

pub fn node_with(
    addr: Ipv4Addr,
    len: u64,
    guard: bool,
    config: RoceConfig,
    rnic_config: RnicConfig,
) -> Node {
    let m = crate::common::memory(len, guard);
    let rnic = EmulatedRnic::new(rnic_config);
    let pd = rnic.alloc_pd(m.space);
    let port = RocePort::bind(&rnic, SocketAddrV4::new(addr, 4791), config)
        .unwrap_or_else(|e| panic!("binding {addr}:4791: {e}"));
    Node {
        base: m.base,
        len,
        mmu: m.mmu,
        rnic,
        pd,
        port,
    }
}

pub struct End {
    pub qp: Qp,
    pub cq: Cq,
}

/// Connect a fresh QP on `a` with one on `b` (as an out-of-band exchange
/// would), starting at the given PSNs.
pub fn connect(a: &Node, b: &Node, caps: QpCaps, psn_a: u32, psn_b: u32) -> (End, End) {
    let acq = a.rnic.create_cq(1 << 16);
    let bcq = b.rnic.create_cq(1 << 16);
    let qa = a.rnic.create_qp(&a.pd, &acq, &acq, caps).unwrap();
    let qb = b.rnic.create_qp(&b.pd, &bcq, &bcq, caps).unwrap();
    a.port
        .connect(
            &qa,
            psn_a,
            RemoteEnd {
                addr: b.port.local_addr(),
                qpn: qb.qpn(),
                psn: psn_b,
            },
        )
        .unwrap();
    b.port
        .connect(
            &qb,
            psn_b,
            RemoteEnd {
                addr: a.port.local_addr(),
                qpn: qa.qpn(),
                psn: psn_a,
            },
        )
        .unwrap();
    (End { qp: qa, cq: acq }, End { qp: qb, cq: bcq })
}

pub fn bytes(addr: u64, len: u64) -> &'static mut [u8] {
    // SAFETY: test buffers are live, test-owned mappings.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len as usize) }
}

/// Stamp `len` bytes: every 8-byte word holds `tag << 40 | offset`.
pub fn stamp(addr: u64, len: u64, tag: u64) {
    let b = bytes(addr, len);
    for (i, w) in b.chunks_mut(8).enumerate() {
        let v = (tag << 40 | (i as u64 * 8)).to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

/// Check a stamp written by [`stamp`]; the first bad word, if any.
pub fn check_stamp(addr: u64, len: u64, tag: u64) -> Result<(), String> {
    let b = bytes(addr, len);
    for (i, w) in b.chunks(8).enumerate() {
        let v = (tag << 40 | (i as u64 * 8)).to_le_bytes();
        if w != &v[..w.len()] {
            return Err(format!(
                "byte {} of {len}: got {:02x?}, want {:02x?}",
                i * 8,
                w,
                &v[..w.len()]
            ));
        }
    }
    Ok(())
}

pub fn one(cq: &Cq, timeout: Duration) -> Wc {
    let v = cq.wait(1, Duration::from_micros(50), timeout);
    assert_eq!(v.len(), 1, "no completion within {timeout:?}");
    v[0]
}

pub fn sge(addr: u64, len: u64, mr: &Mr) -> Sge {
    Sge {
        addr,
        length: len as u32,
        lkey: mr.lkey(),
    }
}

pub fn write(id: u64, sges: Vec<Sge>, remote_addr: u64, rkey: u32) -> SendWr {
    SendWr {
        wr_id: id,
        opcode: Opcode::RdmaWrite { remote_addr, rkey },
        sges,
        signaled: true,
    }
}

pub fn read(id: u64, sges: Vec<Sge>, remote_addr: u64, rkey: u32) -> SendWr {
    SendWr {
        wr_id: id,
        opcode: Opcode::RdmaRead { remote_addr, rkey },
        sges,
        signaled: true,
    }
}

pub fn send(id: u64, sges: Vec<Sge>) -> SendWr {
    SendWr {
        wr_id: id,
        opcode: Opcode::Send,
        sges,
        signaled: true,
    }
}

/// A thread that keeps invalidating random runs of up to 32 pages in
/// `[dst, dst + pages × 4 KiB)` of `mmu`, and now and then (1 in 16) tears
/// its whole space down, pausing `pause` between operations, until
/// `finish`: the churn a responder's memory sees under incoming traffic.
pub struct Churn {
    stop: Arc<std::sync::atomic::AtomicBool>,
    count: Arc<std::sync::atomic::AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl Churn {
    pub fn start(mmu: Arc<Mmu>, dst: u64, pages: u64, seed: u64, pause: Duration) -> Churn {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), count.clone());
        let handle = std::thread::spawn(move || {
            let mut x = seed;
            while !s.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if (x >> 60) == 0 {
                    mmu.teardown_all().unwrap();
                } else {
                    let page = (x >> 33) % pages;
                    let run = 1 + (x >> 20) % 32.min(pages - page);
                    mmu.invalidate(dst + page * 4096, run * 4096).unwrap();
                }
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(pause);
            }
        });
        Churn {
            stop,
            count,
            handle,
        }
    }

    /// Stop the thread; how many operations it made.
    pub fn finish(self) -> u64 {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap();
        self.count.load(Ordering::Relaxed)
    }
}
