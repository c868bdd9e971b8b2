//! The host-side peer: queue pairs owned by the VMM on the same RNIC, over
//! a host buffer, for guest ↔ host traffic. Buffer layout (what PEER_ADDR
//! and PEER_LEN describe):
//!
//! * `[0, len/2)` — where guests RDMA WRITE;
//! * `[len/2, 3len/4)` — static stamps guests RDMA READ and check;
//! * `[3len/4, len)` — receive slots for guests' SENDs.
//!
//! A service thread keeps receives posted and echoes every SEND back (for
//! send latency).

use mmu::{Mmu, RegionSpec, PAGE_SIZE};
use parking_lot::Mutex;
use rdma_passthrough::{
    Access, AddressSpace, Cq, EmulatedRnic, Mr, Opcode, Pd, Qp, QpCaps, RecvWr, SendWr, Sge,
    WcOpcode, WcStatus,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Stamp in every page of the read half: magic in the high half, page
/// index in the low.
pub const READ_STAMP_MAGIC: u64 = 0x5245_4144 << 32;

struct PeerQp {
    qp: Qp,
    cq: Cq,
    /// Where this QP's receives land (a slice of the write half).
    recv_base: u64,
}

pub struct HostPeer {
    pub base: u64,
    pub len: u64,
    pub mr: Mr,
    pub pd: Pd,
    pub space: Arc<AddressSpace>,
    qps: Mutex<Vec<Arc<PeerQp>>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub echoes: AtomicU64,
    pub recv_errors: AtomicU64,
    /// Last field: unmapped after the MR and QPs above are gone.
    _buffer: HostBuffer,
}

/// The peer's host buffer mapping.
struct HostBuffer {
    base: u64,
    len: u64,
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `HostPeer::new`; every MR and
        // QP that could reach it was dropped before this field.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
    }
}

/// Receives kept posted per peer QP, and the largest message echoed.
const RECV_DEPTH: usize = 32;
const RECV_SLOT: u64 = 64 << 10;
/// Host QPs one peer serves (guests reset and re-enable freely; this
/// bounds what that can cost).
const MAX_PEER_QPS: usize = 256;

impl HostPeer {
    /// A peer with a `len`-byte host buffer (a multiple of 2 MiB).
    pub fn new(rnic: &Arc<EmulatedRnic>, len: u64) -> Result<Arc<HostPeer>, String> {
        // Owned by this peer (its last field unmaps it); pages are
        // populated as they are used.
        let base = crate::memory::map_anonymous(len, false)
            .map_err(|e| format!("host peer buffer: {e}"))?;
        let buffer = HostBuffer { base, len };
        for page in (len / 2 / PAGE_SIZE)..(3 * len / 4 / PAGE_SIZE) {
            // SAFETY: inside the mapping just created.
            unsafe { *((base + page * PAGE_SIZE) as *mut u64) = READ_STAMP_MAGIC | page };
        }
        let mmu = Mmu::new(mmu::Config::default()).map_err(|e| e.to_string())?;
        mmu.add_region(RegionSpec {
            name: "host-peer".into(),
            gpa: base,
            size: len,
            hva: base,
        })
        .map_err(|e| e.to_string())?;
        let space = AddressSpace::new(
            "host-peer",
            mmu.clone(),
            Arc::new(mmu::DirectResolver::new(mmu)),
        );
        let pd = rnic.alloc_pd(space.clone());
        let mr = rnic
            .reg_mr(&pd, base, len, Access::ALL_REMOTE | Access::ON_DEMAND)
            .map_err(|e| e.to_string())?;
        let peer = Arc::new(HostPeer {
            base,
            len,
            mr,
            pd,
            space,
            qps: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
            echoes: AtomicU64::new(0),
            recv_errors: AtomicU64::new(0),
            _buffer: buffer,
        });
        let weak = Arc::downgrade(&peer);
        let stop = peer.stop.clone();
        let t = std::thread::Builder::new()
            .name("odpvm-peer".into())
            .spawn(move || serve(weak, stop))
            .map_err(|e| e.to_string())?;
        *peer.thread.lock() = Some(t);
        Ok(peer)
    }

    /// A new host QP connected to `guest`; returns its number, for
    /// `detach`.
    pub fn attach(&self, rnic: &Arc<EmulatedRnic>, guest: &Qp) -> Result<u32, String> {
        let cq = rnic.create_cq(4096);
        let qp = rnic
            .create_qp(&self.pd, &cq, &cq, QpCaps::default())
            .map_err(|e| e.to_string())?;
        rnic.connect(guest, &qp);
        let mut qps = self.qps.lock();
        // Receives land in the last quarter, one slot range per QP.
        let per_qp = RECV_DEPTH as u64 * RECV_SLOT;
        let slots = (self.len / 4 / per_qp).max(1);
        let recv_base = self.base + 3 * self.len / 4 + (qps.len() as u64 % slots) * per_qp;
        let pq = Arc::new(PeerQp { qp, cq, recv_base });
        for i in 0..RECV_DEPTH as u64 {
            self.post_recv(&pq, i).map_err(|e| e.to_string())?;
        }
        if qps.len() >= MAX_PEER_QPS {
            return Err(format!(
                "the host peer serves at most {MAX_PEER_QPS} queue pairs"
            ));
        }
        let qpn = pq.qp.qpn();
        qps.push(pq);
        Ok(qpn)
    }

    /// Drop the host QP `qpn` (its guest side was reset).
    pub fn detach(&self, qpn: u32) {
        self.qps.lock().retain(|q| q.qp.qpn() != qpn);
    }

    /// Host QPs attached now.
    pub fn attached(&self) -> usize {
        self.qps.lock().len()
    }

    fn post_recv(&self, q: &PeerQp, slot: u64) -> Result<(), rdma_passthrough::VerbsError> {
        q.qp.post_recv(RecvWr {
            wr_id: slot,
            sges: vec![Sge {
                addr: q.recv_base + slot * RECV_SLOT,
                length: RECV_SLOT as u32,
                lkey: self.mr.lkey(),
            }],
        })
    }

    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}

impl Drop for HostPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

fn serve(peer: std::sync::Weak<HostPeer>, stop: Arc<AtomicBool>) {
    let mut idle = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let Some(p) = peer.upgrade() else { return };
        let qps: Vec<Arc<PeerQp>> = p.qps.lock().clone();
        let mut worked = false;
        let mut wcs = [rdma_passthrough::Wc {
            wr_id: 0,
            status: WcStatus::Success,
            opcode: WcOpcode::Recv,
            byte_len: 0,
            qp_num: 0,
        }; 16];
        for q in &qps {
            let n = q.cq.poll(&mut wcs);
            for wc in &wcs[..n] {
                worked = true;
                match (wc.opcode, wc.status) {
                    (WcOpcode::Recv, WcStatus::Success) => {
                        let slot = wc.wr_id;
                        let echo = SendWr {
                            wr_id: slot,
                            opcode: Opcode::Send,
                            sges: vec![Sge {
                                addr: q.recv_base + slot * RECV_SLOT,
                                length: wc.byte_len,
                                lkey: p.mr.lkey(),
                            }],
                            signaled: false,
                        };
                        if q.qp.post_send(echo).is_ok() {
                            p.echoes.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = p.post_recv(q, slot);
                    }
                    (_, WcStatus::Success) => {}
                    _ => {
                        p.recv_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        drop(p);
        if worked {
            idle = 0;
        } else {
            idle += 1;
            if idle < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}
