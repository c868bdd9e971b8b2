//! The host-side peer: queue pairs owned by the VMM on the same RNIC, over
//! a host buffer, for guest ↔ host traffic.
//!
//! Each guest device gets its own window of the buffer (whole units of
//! [`WINDOW_UNIT`]), with its own protection domain holding one MR that
//! covers exactly that window; the host queue pairs serving that guest
//! live in the same domain. A guest therefore reaches only its window,
//! whatever rkey it tries: another window's MR, or another domain's, fails
//! the RNIC's key and domain checks (`vmm/tests/hostile.rs`,
//! `a_shared_host_peer_confines_each_guest_to_its_window`). Window layout
//! (what PEER_ADDR and PEER_LEN describe):
//!
//! * `[0, len/2)` — where the guest RDMA WRITEs;
//! * `[len/2, 3len/4)` — static stamps the guest RDMA READs and checks
//!   (`READ_STAMP_MAGIC | page index in the window`);
//! * `[3len/4, len)` — receive slots for the guest's SENDs.
//!
//! A service thread keeps receives posted and echoes every SEND back (for
//! send latency) from the slot it landed in; a slot is posted again only
//! once its echo completed, so a guest pipelining past the receive depth
//! gets each message back with its own bytes (`vmm/tests/rdma.rs`
//! `pipelined_sends_are_echoed_with_their_own_bytes`).

use mmu::{Mmu, RegionSpec, PAGE_SIZE};
use parking_lot::Mutex;
use rdma_passthrough::{
    Access, AddressSpace, Cq, EmulatedRnic, Mr, Opcode, Pd, Qp, QpCaps, RecvWr, SendWr, Sge,
    VerbsError, WcOpcode, WcStatus,
};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Stamp in every page of a window's read quarter: magic in the high half,
/// page index (in the window) in the low.
pub const READ_STAMP_MAGIC: u64 = 0x5245_4144 << 32;

/// Windows are whole multiples of this (one vCPU's share of the RDMA
/// payloads: 4 MiB written, 2 MiB read, 2 MiB of receive slots).
pub const WINDOW_UNIT: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("host peer buffer: {0}")]
    Buffer(String),
    #[error("the host peer's length {0:#x} is not a non-zero multiple of 8 MiB")]
    BadLength(u64),
    #[error("host peer address space: {0}")]
    Mmu(#[from] mmu::Error),
    #[error("host peer thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("host peer RNIC resources: {0}")]
    Verbs(#[from] VerbsError),
    #[error("the host peer has no free window of {0:#x} bytes (its buffer is shared by too many guests)")]
    Full(u64),
    #[error("the host peer serves at most {MAX_PEER_QPS} queue pairs")]
    TooManyQps,
}

struct PeerQp {
    qp: Qp,
    cq: Cq,
    /// The key of the window MR its buffers are in.
    lkey: u32,
    /// Where this QP's receives land (a slice of its window's last quarter).
    recv_base: u64,
}

/// One guest's part of the host peer's buffer.
pub struct PeerWindow {
    pub base: u64,
    pub len: u64,
    /// Covers exactly `[base, base + len)`, in `pd`.
    mr: Mr,
    pd: Pd,
    /// Units of the buffer it holds.
    units: std::ops::Range<usize>,
    /// Last: the buffer outlives the MR above.
    peer: Arc<HostPeer>,
}

impl PeerWindow {
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }

    pub fn peer(&self) -> &Arc<HostPeer> {
        &self.peer
    }
}

impl Drop for PeerWindow {
    fn drop(&mut self) {
        let pd = self.pd.id();
        self.peer.qps.lock().retain(|q| q.pd != pd);
        for u in self.peer.units.lock()[self.units.clone()].iter_mut() {
            *u = false;
        }
    }
}

pub struct HostPeer {
    pub base: u64,
    pub len: u64,
    pub space: Arc<AddressSpace>,
    /// Which `WINDOW_UNIT`s of the buffer a window holds.
    units: Mutex<Vec<bool>>,
    qps: Mutex<Vec<Arc<AttachedQp>>>,
    stop: Arc<AtomicBool>,
    /// Every host QP's CQ wakes it: the serving thread sleeps on it when
    /// idle instead of polling.
    channel: Arc<rdma_passthrough::CompChannel>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The serving thread's kernel id, once it runs.
    thread_tid: Arc<AtomicI32>,
    pub echoes: AtomicU64,
    pub recv_errors: AtomicU64,
    /// Last field: unmapped after the QPs above are gone (window MRs hold
    /// the peer alive).
    _buffer: HostBuffer,
}

/// A host QP and the protection domain (window) it serves.
struct AttachedQp {
    pd: u32,
    q: Arc<PeerQp>,
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
    /// A peer with a `len`-byte host buffer (a multiple of
    /// [`WINDOW_UNIT`]), shared out in windows.
    pub fn new(_rnic: &Arc<EmulatedRnic>, len: u64) -> Result<Arc<HostPeer>, PeerError> {
        if len == 0 || !len.is_multiple_of(WINDOW_UNIT) {
            return Err(PeerError::BadLength(len));
        }
        // Owned by this peer (its last field unmaps it); pages are
        // populated as they are used.
        let base = crate::memory::map_anonymous(len, false).map_err(PeerError::Buffer)?;
        let buffer = HostBuffer { base, len };
        let mmu = Mmu::new(mmu::Config::default())?;
        mmu.add_region(RegionSpec {
            name: "host-peer".into(),
            gpa: base,
            size: len,
            hva: base,
        })?;
        let space = AddressSpace::new(
            "host-peer",
            mmu.clone(),
            Arc::new(mmu::DirectResolver::new(mmu)),
        );
        let peer = Arc::new(HostPeer {
            base,
            len,
            space,
            units: Mutex::new(vec![false; (len / WINDOW_UNIT) as usize]),
            qps: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            channel: rdma_passthrough::CompChannel::new(),
            thread: Mutex::new(None),
            thread_tid: Arc::new(AtomicI32::new(0)),
            echoes: AtomicU64::new(0),
            recv_errors: AtomicU64::new(0),
            _buffer: buffer,
        });
        let weak = Arc::downgrade(&peer);
        let (stop, channel) = (peer.stop.clone(), peer.channel.clone());
        let tid = peer.thread_tid.clone();
        let t = std::thread::Builder::new()
            .name("odpvm-peer".into())
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                serve(weak, stop, channel)
            })?;
        *peer.thread.lock() = Some(t);
        Ok(peer)
    }

    /// The serving thread's kernel thread id (0 until it has started): to
    /// pin it or watch what it costs.
    pub fn thread_id(&self) -> i32 {
        self.thread_tid.load(Ordering::Relaxed)
    }

    /// A window of at least `len` bytes (rounded up to whole
    /// [`WINDOW_UNIT`]s) for one guest: its own protection domain and an
    /// MR covering exactly the window; the read quarter is stamped.
    pub fn window(
        self: &Arc<Self>,
        rnic: &Arc<EmulatedRnic>,
        len: u64,
    ) -> Result<PeerWindow, PeerError> {
        let want = len.div_ceil(WINDOW_UNIT).max(1) as usize;
        let units = {
            let mut map = self.units.lock();
            let start = (0..map.len())
                .find(|&s| s + want <= map.len() && map[s..s + want].iter().all(|u| !u))
                .ok_or(PeerError::Full(want as u64 * WINDOW_UNIT))?;
            for u in &mut map[start..start + want] {
                *u = true;
            }
            start..start + want
        };
        let base = self.base + units.start as u64 * WINDOW_UNIT;
        let len = want as u64 * WINDOW_UNIT;
        for page in (len / 2 / PAGE_SIZE)..(3 * len / 4 / PAGE_SIZE) {
            // SAFETY: inside this peer's buffer, in the window just taken
            // (no guest reaches it before its MR exists below).
            unsafe { *((base + page * PAGE_SIZE) as *mut u64) = READ_STAMP_MAGIC | page };
        }
        let free = |peer: &HostPeer| {
            for u in peer.units.lock()[units.clone()].iter_mut() {
                *u = false;
            }
        };
        let pd = rnic.alloc_pd(self.space.clone());
        let mr = match rnic.reg_mr(&pd, base, len, Access::ALL_REMOTE | Access::ON_DEMAND) {
            Ok(mr) => mr,
            Err(e) => {
                free(self);
                return Err(e.into());
            }
        };
        Ok(PeerWindow {
            base,
            len,
            mr,
            pd,
            units,
            peer: self.clone(),
        })
    }

    /// A new host QP in `window`'s domain connected to `guest`; returns
    /// its number, for `detach`.
    pub fn attach(
        &self,
        rnic: &Arc<EmulatedRnic>,
        window: &PeerWindow,
        guest: &Qp,
    ) -> Result<u32, PeerError> {
        let mut qps = self.qps.lock();
        if qps.len() >= MAX_PEER_QPS {
            return Err(PeerError::TooManyQps);
        }
        let cq = rnic.create_cq_on(4096, &self.channel);
        let qp = rnic.create_qp(&window.pd, &cq, &cq, QpCaps::default())?;
        rnic.connect(guest, &qp);
        // Receives land in the window's last quarter, one slot range per QP.
        let per_qp = RECV_DEPTH as u64 * RECV_SLOT;
        let slots = (window.len / 4 / per_qp).max(1);
        let mine = qps.iter().filter(|q| q.pd == window.pd.id()).count() as u64;
        let recv_base = window.base + 3 * window.len / 4 + (mine % slots) * per_qp;
        let pq = Arc::new(PeerQp {
            qp,
            cq,
            lkey: window.mr.lkey(),
            recv_base,
        });
        for i in 0..RECV_DEPTH as u64 {
            post_recv(&pq, i)?;
        }
        let qpn = pq.qp.qpn();
        qps.push(Arc::new(AttachedQp {
            pd: window.pd.id(),
            q: pq,
        }));
        Ok(qpn)
    }

    /// Drop the host QP `qpn` (its guest side was reset).
    pub fn detach(&self, qpn: u32) {
        self.qps.lock().retain(|q| q.q.qp.qpn() != qpn);
    }

    /// Host QPs attached now.
    pub fn attached(&self) -> usize {
        self.qps.lock().len()
    }
}

fn post_recv(q: &PeerQp, slot: u64) -> Result<(), VerbsError> {
    q.qp.post_recv(RecvWr {
        wr_id: slot,
        sges: vec![Sge {
            addr: q.recv_base + slot * RECV_SLOT,
            length: RECV_SLOT as u32,
            lkey: q.lkey,
        }],
    })
}

impl Drop for HostPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.channel.kick();
        if let Some(t) = self.thread.lock().take() {
            // The serving thread holds a strong reference while it works,
            // so the last one may be dropped there: it cannot join itself
            // (EDEADLK), and it ends on its own once `stop` is seen.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// How long the serving thread polls after its last completion before it
/// sleeps on the channel (a completion then costs a thread wake-up).
const SPIN_BEFORE_SLEEP: u32 = 2000;
/// How long it sleeps at most: a safety net only, since every completion
/// on a host QP's CQ (new QPs included) and the peer's drop kick the channel.
const IDLE_SLEEP: Duration = Duration::from_millis(50);

fn serve(
    peer: std::sync::Weak<HostPeer>,
    stop: Arc<AtomicBool>,
    channel: Arc<rdma_passthrough::CompChannel>,
) {
    let mut idle = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // Read before polling: a completion after the poll moves it, and
        // the wait below returns at once.
        let seen = channel.events();
        let Some(p) = peer.upgrade() else { return };
        let qps: Vec<Arc<PeerQp>> = p.qps.lock().iter().map(|a| a.q.clone()).collect();
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
                        // Echoed from the slot it landed in; the slot is
                        // posted for receiving again only once the echo's
                        // completion says its bytes were read, or the
                        // guest's next SEND could overwrite them first
                        // (`vmm/tests/rdma.rs`
                        // `pipelined_sends_are_echoed_with_their_own_bytes`).
                        let echo = SendWr {
                            wr_id: slot,
                            opcode: Opcode::Send,
                            sges: vec![Sge {
                                addr: q.recv_base + slot * RECV_SLOT,
                                length: wc.byte_len,
                                lkey: q.lkey,
                            }],
                            signaled: true,
                        };
                        if q.qp.post_send(echo).is_ok() {
                            p.echoes.fetch_add(1, Ordering::Relaxed);
                        } else {
                            let _ = post_recv(q, slot);
                        }
                    }
                    (WcOpcode::Send, WcStatus::Success) => {
                        let _ = post_recv(q, wc.wr_id);
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
            idle = idle.saturating_add(1);
            if idle < SPIN_BEFORE_SLEEP {
                std::hint::spin_loop();
            } else {
                channel.wait_past(seen, IDLE_SLEEP);
            }
        }
    }
}
