//! Register handling, ring fetching and WQE validation of the paravirtual
//! RNIC. Runs on the vCPU thread that took the MMIO exit; each queue pair
//! has its own lock.
//!
//! Guarantees (tests in `vmm/tests/hostile.rs`, hostile guests driving the
//! registers):
//! * per queue pair the device keeps state bounded by its ring sizes, and
//!   each WQE costs O(1) to retire, signaled or not
//!   (`unsignaled_write_flood_keeps_device_memory_bounded`);
//! * a completion queue that overruns is an error the guest sees
//!   (`STATUS_CQ_OVERRUN` and `STATUS_QP_ERROR`), never a silent drop
//!   (`cq_overrun_is_reported_to_the_guest`);
//! * a guest-to-guest peer reaches exactly the advertised window of the
//!   other guest (`a_guest_peer_reaches_only_the_advertised_window`).

use super::peer::{HostPeer, PeerError, PeerWindow};
use super::*;
use parking_lot::Mutex;
use rdma_passthrough::{
    Access, AddressSpace, Cq, EmulatedRnic, Mr, Opcode, Pd, Qp, QpCaps, RecvWr, SendWr, Sge,
    VerbsError, Wc, WcOpcode, WcStatus,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod queues;
mod roce_link;
mod verify;
use verify::Posted;

/// A guest-memory access outside guest RAM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{len:#x} bytes at {gpa:#x} are not guest RAM")]
pub struct NotGuestRam {
    pub gpa: u64,
    pub len: u64,
}

/// How the device reads guest memory (its rings). The VMM's guest RAM in
/// production; a plain buffer in the fuzzer.
pub trait GuestMemory: Send + Sync {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotGuestRam>;
    /// Whether `[gpa, gpa + len)` is guest RAM.
    fn contains(&self, gpa: u64, len: u64) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum RnicDeviceError {
    #[error("registering guest RAM with the RNIC: {0}")]
    RegisterRam(VerbsError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("guest peers must share one emulated RNIC")]
    NotSharedRnic,
    #[error("peer window [{base:#x}, +{len:#x}) is not usable guest memory")]
    BadWindow { base: u64, len: u64 },
    #[error("registering the peer window: {0}")]
    PeerWindow(VerbsError),
}

/// Read one ABI structure (a ring entry) from guest memory: its bytes as
/// the guest left them, any pattern valid (`ByteValued`).
fn read_obj<T: vm_memory::ByteValued + Default>(
    mem: &dyn GuestMemory,
    gpa: u64,
) -> Result<T, NotGuestRam> {
    let mut v = T::default();
    mem.read(gpa, v.as_mut_slice())?;
    Ok(v)
}

/// Completions the device buffers per queue pair before leaving the rest
/// in the RNIC's CQ.
const MAX_PENDING_CQES: usize = 4096;
/// Largest window of another guest's memory a device may peer with.
pub const MAX_GUEST_WINDOW: u64 = 64 << 20;
/// Depth of each queue pair's CQ on the RNIC. With the buffer above, a
/// guest that never pops sees an overrun after this many plus
/// `MAX_PENDING_CQES` completions.
const CQ_DEPTH: usize = 4 * MAX_PENDING_CQES;

#[derive(Default, Debug)]
pub struct RnicDeviceStats {
    pub doorbells: AtomicU64,
    pub wqes_posted: AtomicU64,
    pub recvs_posted: AtomicU64,
    /// WQEs the device refused (bad opcode or length).
    pub wqes_rejected: AtomicU64,
    /// Receive entries refused at the doorbell (key or buffer invalid).
    pub recvs_refused: AtomicU64,
    /// Queue pairs put in the device error state by bad guest input.
    pub device_errors: AtomicU64,
    pub resets: AtomicU64,
    pub completions: AtomicU64,
    pub error_completions: AtomicU64,
    /// Pages of RDMA WRITEs checked on the host peer.
    pub pages_verified: AtomicU64,
    /// Of those, pages the guest had discarded (zero): allowed.
    pub pages_zero: AtomicU64,
    /// Pages whose stamp was older than one already seen there, or from
    /// another place: the device moved stale data.
    pub stale_accesses: AtomicU64,
    pub bytes_written: AtomicU64,
}

struct QpCtx {
    sq_base: u64,
    sq_size: u32,
    rq_base: u64,
    rq_size: u32,
    enabled: bool,
    error: u32,
    sq_ci: u32,
    rq_ci: u32,
    /// A WQE the device refused: later ones are flushed until reset.
    flushing: bool,
    qp: Option<Qp>,
    /// The host peer's QP for ours.
    peer_qpn: Option<u32>,
    /// Our peer QP in another guest's protection domain (guest ↔ guest).
    guest_peer_qp: Option<Qp>,
    cq: Cq,
    cqes: VecDeque<Wc>,
    /// A completion the device synthesized found `cqes` full.
    cq_overrun: bool,
    /// Send WQEs posted to the RNIC QP.
    posted: u64,
    /// WRITEs posted and not yet retired: every doorbell and completion
    /// read first retires what the RNIC finished, so at most what its send
    /// queue (ring-sized) and execution held then, plus one ring posted by
    /// the doorbell: `2 * sq_size + 1`.
    writes: VecDeque<Posted>,
    /// A queue pair already connected over RoCE (`roce.rs`), taken by the
    /// next enable.
    preconnected: Option<Qp>,
}

impl QpCtx {
    fn new(cq: Cq) -> Self {
        QpCtx {
            sq_base: 0,
            sq_size: 0,
            rq_base: 0,
            rq_size: 0,
            enabled: false,
            error: ERR_NONE,
            sq_ci: 0,
            rq_ci: 0,
            flushing: false,
            qp: None,
            peer_qpn: None,
            guest_peer_qp: None,
            cq,
            cqes: VecDeque::new(),
            cq_overrun: false,
            posted: 0,
            writes: VecDeque::new(),
            preconnected: None,
        }
    }
}

/// Another guest as the peer: a window of its guest-physical memory, an MR
/// covering exactly that window in a protection domain of its own (the
/// responder QPs live there, so no other key of that guest works), and its
/// memory (to check stamps of what landed there).
pub struct GuestPeer {
    mr: Mr,
    pd: Pd,
    pub base: u64,
    pub len: u64,
    pub mem: Arc<dyn GuestMemory>,
}

impl GuestPeer {
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}

pub struct RnicDevice {
    rnic: Arc<EmulatedRnic>,
    mem: Arc<dyn GuestMemory>,
    /// Guest-physical addresses below this are the VMM's: neither the MR
    /// nor a ring nor a peer window reaches them.
    floor: u64,
    pd: Pd,
    mr: Mr,
    /// This guest's part of the host peer.
    window: PeerWindow,
    /// When set, queue pairs connect to another guest instead of the host.
    guest_peer: parking_lot::RwLock<Option<GuestPeer>>,
    /// Last stamp iteration seen per peer page (stale detection).
    seen: Vec<AtomicU64>,
    qps: Vec<Mutex<QpCtx>>,
    pub stats: RnicDeviceStats,
    /// Set when queue pairs reach another odpvm over RoCEv2.
    roce: parking_lot::RwLock<Option<super::roce::RoceRemote>>,
}

fn u32_of(data: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes)
}

fn u64_of(data: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(data).ok().map(u64::from_le_bytes)
}

fn put(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
    data[n..].fill(0);
}

fn opcode_code(op: WcOpcode) -> u32 {
    match op {
        WcOpcode::RdmaWrite => OP_WRITE,
        WcOpcode::RdmaRead => OP_READ,
        WcOpcode::Send => OP_SEND,
        WcOpcode::Recv => OP_RECV,
    }
}

impl RnicDevice {
    /// A device with `qps` queue pairs for a guest whose memory is `space`
    /// (iova = guest-physical) and readable through `mem`.
    ///
    /// `floor` is the lowest guest-physical address the guest may reach
    /// through the device: `[0, floor)` is the VMM's (the boot region of
    /// built-in and user programs — page tables, IDT, parameters, which
    /// ring 3 must not read or write through DMA any more than with loads
    /// and stores), 0 when the guest owns all its RAM (Linux).
    pub fn new(
        rnic: Arc<EmulatedRnic>,
        space: Arc<AddressSpace>,
        mem: Arc<dyn GuestMemory>,
        peer: Arc<HostPeer>,
        qps: usize,
        floor: u64,
    ) -> Result<RnicDevice, RnicDeviceError> {
        let pd = rnic.alloc_pd(space);
        // One ODP MR covers all guest RAM above the floor: implicit (the
        // whole space) when the floor is 0.
        let (iova, len) = match floor {
            0 => (0, u64::MAX),
            f => (f, u64::MAX - f),
        };
        let mr = rnic
            .reg_mr(&pd, iova, len, Access::ALL_REMOTE | Access::ON_DEMAND)
            .map_err(RnicDeviceError::RegisterRam)?;
        // One window unit per queue pair (the RDMA payloads use at most 8).
        let window = peer.window(&rnic, super::peer::WINDOW_UNIT * qps.clamp(1, 8) as u64)?;
        // Room to check stamps in the host window, or in a guest peer's
        // window of up to `MAX_GUEST_WINDOW`.
        let seen = (0..window.len.max(MAX_GUEST_WINDOW) / mmu::PAGE_SIZE)
            .map(|_| AtomicU64::new(0))
            .collect();
        let qps = (0..qps)
            .map(|_| Mutex::new(QpCtx::new(rnic.create_cq(CQ_DEPTH))))
            .collect();
        Ok(RnicDevice {
            rnic,
            mem,
            floor,
            pd,
            mr,
            window,
            guest_peer: parking_lot::RwLock::new(None),
            roce: parking_lot::RwLock::new(None),
            seen,
            qps,
            stats: RnicDeviceStats::default(),
        })
    }

    pub fn rnic(&self) -> &Arc<EmulatedRnic> {
        &self.rnic
    }

    pub fn lkey(&self) -> u32 {
        self.mr.lkey()
    }

    pub fn num_qps(&self) -> usize {
        self.qps.len()
    }

    fn device_error(&self, q: &mut QpCtx, code: u32) {
        if q.error == ERR_NONE {
            q.error = code;
            let n = self.stats.device_errors.fetch_add(1, Ordering::Relaxed);
            if n < 5 || n.is_power_of_two() {
                log::warn!(
                    "rnic device: queue pair stopped by guest input (error {code}; {} so far)",
                    n + 1
                );
            }
        }
    }

    fn reset(&self, q: &mut QpCtx) {
        // Dropping the QP flushes its work; a fresh CQ drops stale completions.
        if let Some(qpn) = q.peer_qpn.take() {
            self.window.peer().detach(qpn);
        }
        q.guest_peer_qp = None;
        // A RoCE connection cannot be re-made from here: a healthy
        // connected QP (and its CQ, drained) survives the reset; one in
        // the error state is dropped and the bank stays unconnected.
        let keep = match q.preconnected.take().or_else(|| q.qp.take()) {
            Some(qp) if self.roce.read().is_some() && !qp.in_error() => Some(qp),
            _ => None,
        };
        q.qp = None;
        let cq = match keep {
            Some(_) => {
                let mut sink = [Wc {
                    wr_id: 0,
                    status: WcStatus::Success,
                    opcode: WcOpcode::Send,
                    byte_len: 0,
                    qp_num: 0,
                }; 64];
                while q.cq.poll(&mut sink) > 0 {}
                q.cq.clone()
            }
            None => self.rnic.create_cq(CQ_DEPTH),
        };
        *q = QpCtx::new(cq);
        q.preconnected = keep;
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
    }

    fn ring_ok(&self, base: u64, size: u32, entry: u64) -> bool {
        size.is_power_of_two()
            && size <= MAX_RING
            && base.is_multiple_of(entry)
            && base >= self.floor
            && self.mem.contains(base, u64::from(size) * entry)
    }

    fn enable(&self, q: &mut QpCtx) {
        if q.error != ERR_NONE || q.enabled {
            return;
        }
        if !self.ring_ok(q.sq_base, q.sq_size, WQE_SIZE)
            || !self.ring_ok(q.rq_base, q.rq_size, RQE_SIZE)
        {
            return self.device_error(q, ERR_BAD_RING);
        }
        if let Some(qp) = q.preconnected.take() {
            q.qp = Some(qp);
            q.enabled = true;
            return;
        }
        if self.roce.read().is_some() {
            // Its connection went into error and a reset dropped it: say
            // so rather than quietly give the bank a queue pair to the
            // host peer (test `vmm/tests/roce.rs::a_queue_pair_whose_roce_connection_died_says_so`).
            log::error!(
                "rnic device: a queue pair's RoCE connection is gone (it went into the error \
                 state); RoCE queue pairs are not re-connected: restart both VMs"
            );
            q.error = ERR_ROCE_GONE;
            return;
        }
        let caps = QpCaps {
            max_send_wr: q.sq_size as usize,
            max_recv_wr: q.rq_size as usize,
            max_sge: 1,
            ..QpCaps::default()
        };
        let qp = match self.rnic.create_qp(&self.pd, &q.cq, &q.cq, caps) {
            Ok(qp) => qp,
            Err(e) => {
                log::error!("rnic device: creating a queue pair: {e}");
                return self.device_error(q, ERR_BAD_RING);
            }
        };
        if let Some(g) = self.guest_peer.read().as_ref() {
            // A responder QP in the other guest's domain: our guest reaches
            // its memory only through the rkey it exposes.
            let cq = self.rnic.create_cq(64);
            match self.rnic.create_qp(&g.pd, &cq, &cq, QpCaps::default()) {
                Ok(other) => {
                    self.rnic.connect(&qp, &other);
                    q.guest_peer_qp = Some(other);
                }
                Err(e) => {
                    log::error!("rnic device: a queue pair in the peer guest: {e}");
                    return self.device_error(q, ERR_BAD_RING);
                }
            }
        } else {
            match self.window.peer().attach(&self.rnic, &self.window, &qp) {
                Ok(qpn) => q.peer_qpn = Some(qpn),
                Err(e) => {
                    log::error!("rnic device: attaching the host peer: {e}");
                    return self.device_error(q, ERR_BAD_RING);
                }
            }
        }
        q.qp = Some(qp);
        q.enabled = true;
    }

    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        if offset < QP_BANK {
            let v = match offset {
                REG_ID => u64::from(RNIC_ID),
                REG_VERSION => u64::from(RNIC_VERSION),
                REG_NUM_QPS => self.qps.len() as u64,
                REG_LKEY => u64::from(self.mr.lkey()),
                REG_PEER_ADDR | REG_PEER_LEN | REG_PEER_RKEY if self.roce.read().is_some() => {
                    let r = self.roce.read();
                    let w = &r.as_ref().expect("checked").window;
                    match offset {
                        REG_PEER_ADDR => w.base,
                        REG_PEER_LEN => w.len,
                        _ => u64::from(w.rkey),
                    }
                }
                REG_PEER_ADDR | REG_PEER_LEN | REG_PEER_RKEY => {
                    let g = self.guest_peer.read();
                    match (offset, g.as_ref()) {
                        (REG_PEER_ADDR, Some(g)) => g.base,
                        (REG_PEER_LEN, Some(g)) => g.len,
                        (_, Some(g)) => u64::from(g.rkey()),
                        (REG_PEER_ADDR, None) => self.window.base,
                        (REG_PEER_LEN, None) => self.window.len,
                        (_, None) => u64::from(self.window.rkey()),
                    }
                }
                _ => 0,
            };
            return put(data, v);
        }
        let (bank, reg) = (offset / QP_BANK - 1, offset % QP_BANK);
        let Some(q) = self.qps.get(bank as usize) else {
            return put(data, 0);
        };
        let mut q = q.lock();
        let v = match reg {
            QP_STATUS => {
                let qp_err = q.flushing || q.qp.as_ref().is_some_and(|qp| qp.in_error());
                let mut st = 0;
                if q.enabled {
                    st |= STATUS_ENABLED;
                }
                if q.error != ERR_NONE {
                    st |= STATUS_DEVICE_ERROR;
                }
                if qp_err {
                    st |= STATUS_QP_ERROR;
                }
                if q.cq_overrun || q.cq.is_overrun() {
                    st |= STATUS_CQ_OVERRUN | STATUS_QP_ERROR;
                }
                u64::from(st)
            }
            QP_ERROR => u64::from(q.error),
            QP_SQ_BASE => q.sq_base,
            QP_SQ_SIZE => u64::from(q.sq_size),
            QP_RQ_BASE => q.rq_base,
            QP_RQ_SIZE => u64::from(q.rq_size),
            QP_SQ_CI => u64::from(q.sq_ci),
            QP_RQ_CI => u64::from(q.rq_ci),
            QP_CQ_COUNT => {
                self.reap(&mut q);
                q.cqes.len() as u64
            }
            QP_CQE_WR_ID => q.cqes.front().map_or(0, |c| c.wr_id),
            QP_CQE_STATUS => q.cqes.front().map_or(0, |c| u64::from(c.status.code())),
            QP_CQE_OPCODE => q
                .cqes
                .front()
                .map_or(0, |c| u64::from(opcode_code(c.opcode))),
            QP_CQE_LEN => q.cqes.front().map_or(0, |c| u64::from(c.byte_len)),
            _ => 0,
        };
        put(data, v);
    }

    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset < QP_BANK {
            return; // global registers are read-only
        }
        let (bank, reg) = (offset / QP_BANK - 1, offset % QP_BANK);
        let Some(q) = self.qps.get(bank as usize) else {
            return;
        };
        let mut q = q.lock();
        let q = &mut *q;
        let wide = matches!(reg, QP_SQ_BASE | QP_RQ_BASE);
        let value = if wide {
            u64_of(data)
        } else {
            u32_of(data).map(u64::from)
        };
        let Some(v) = value else {
            return self.device_error(q, ERR_REGISTER);
        };
        if reg == QP_CTRL && v == u64::from(CTRL_RESET) {
            return self.reset(q);
        }
        if q.error != ERR_NONE {
            return; // stopped until reset
        }
        match reg {
            QP_CTRL if v == u64::from(CTRL_ENABLE) => self.enable(q),
            QP_SQ_BASE | QP_SQ_SIZE | QP_RQ_BASE | QP_RQ_SIZE if q.enabled => {
                self.device_error(q, ERR_REGISTER)
            }
            QP_SQ_BASE => q.sq_base = v,
            QP_SQ_SIZE => q.sq_size = v as u32,
            QP_RQ_BASE => q.rq_base = v,
            QP_RQ_SIZE => q.rq_size = v as u32,
            QP_SQ_PI => {
                self.send_doorbell(q, v as u32);
                self.kick_roce();
            }
            QP_RQ_PI => {
                self.recv_doorbell(q, v as u32);
                self.kick_roce();
            }
            QP_CQ_POP => {
                q.cqes.pop_front();
            }
            _ => self.device_error(q, ERR_REGISTER),
        }
    }

    /// Reset every queue pair (as a guest would, one by one).
    pub fn reset_all(&self) {
        for q in &self.qps {
            self.reset(&mut q.lock());
        }
    }

    /// Make `other`'s guest the peer of this device's queue pairs enabled
    /// from now on: `[base, base + len)` of its guest-physical memory, which
    /// both devices' RNIC must share (one emulated RNIC, two guests).
    pub fn peer_with_guest(
        &self,
        other: &RnicDevice,
        mem: Arc<dyn GuestMemory>,
        base: u64,
        len: u64,
    ) -> Result<(), RnicDeviceError> {
        if !Arc::ptr_eq(&self.rnic, &other.rnic) {
            return Err(RnicDeviceError::NotSharedRnic);
        }
        if len == 0
            || base < other.floor
            || !mem.contains(base, len)
            || len / mmu::PAGE_SIZE > self.seen.len() as u64
            || !base.is_multiple_of(mmu::PAGE_SIZE)
        {
            return Err(RnicDeviceError::BadWindow { base, len });
        }
        // A domain of the other guest's memory holding nothing but the
        // window: our responder QPs live there.
        let pd = self.rnic.alloc_pd(other.pd.space().clone());
        let mr = self
            .rnic
            .reg_mr(&pd, base, len, Access::ALL_REMOTE | Access::ON_DEMAND)
            .map_err(RnicDeviceError::PeerWindow)?;
        *self.guest_peer.write() = Some(GuestPeer {
            mr,
            pd,
            base,
            len,
            mem,
        });
        Ok(())
    }

    pub fn peer(&self) -> &Arc<HostPeer> {
        self.window.peer()
    }

    /// This guest's window of the host peer.
    pub fn peer_window(&self) -> &PeerWindow {
        &self.window
    }

    /// Entries the device holds for queue pair `q` beyond the RNIC's own
    /// bounded queues: (WRITEs awaiting their check, buffered completions).
    pub fn pending(&self, q: usize) -> Option<(usize, usize)> {
        let q = self.qps.get(q)?.lock();
        Some((q.writes.len(), q.cqes.len()))
    }

    /// Send WQEs queue pair `q` posted to the RNIC and how many of them the
    /// RNIC has finished.
    pub fn progress(&self, q: usize) -> Option<(u64, u64)> {
        let q = self.qps.get(q)?.lock();
        Some((q.posted, q.qp.as_ref().map_or(0, |qp| qp.send_retired())))
    }

    /// Queue pairs currently stopped by a device error.
    pub fn errored_qps(&self) -> usize {
        self.qps
            .iter()
            .filter(|q| q.lock().error != ERR_NONE)
            .count()
    }
}
