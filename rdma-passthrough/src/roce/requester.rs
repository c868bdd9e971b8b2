//! The requester and completer halves of an RC queue pair (`rxe_req.c`,
//! `rxe_comp.c` in Linux): work requests become packets with consecutive
//! PSNs; ACKs, NAKs and READ responses retire them.
//!
//! * Window: at most `RoceConfig::window` PSNs are sent and not
//!   acknowledged; the requester stops there.
//! * ACK coalescing: the AckReq bit is set on the last packet of a
//!   message and every `ack_every` PSNs; the responder ACKs only those.
//! * Go-back-N: a PSN-sequence-error NAK, an RNR NAK (after its timer) or
//!   the retransmit timer rewinds transmission to the oldest unacknowledged
//!   PSN (a READ is re-requested from the first response not received).
//! * Retry counts: `retry_cnt` consecutive timer expiries with no response
//!   in between (an ACK that advances, a READ response or an RNR NAK ends
//!   the run; each expiry waits twice as long as the one before, at most
//!   1 s) end the oldest request in `RETRY_EXC_ERR`; `rnr_retry` RNR NAKs
//!   (7 = forever) in `RNR_RETRY_EXC_ERR`. Either puts the QP in the error
//!   state and flushes the rest.
//!
//! Tests: `tests/roce.rs` (`write_read_send_between_two_rnics_mtu_{1024,4096}`,
//! `retry_exhaustion_ends_in_retry_exc_err`,
//! `rnr_naks_between_stalls_do_not_exhaust_the_retry_count`,
//! `missing_receive_ends_in_rnr_retry_exc_err`,
//! `bad_rkey_and_bounds_complete_with_remote_access_error`).

mod completer;

use super::memory::{self, Miss, Seg};
use super::port::Wire;
use super::qp::RcQp;
use super::wire::*;
use crate::emulated::Shared;
use crate::verbs::{Opcode, SendWr, WcOpcode, WcStatus};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Send,
    Write { va: u64, rkey: u32 },
    Read { va: u64, rkey: u32 },
}

/// A work request being sent or awaiting its acknowledgement.
pub(crate) struct ReqWqe {
    pub(crate) wr_id: u64,
    pub(crate) signaled: bool,
    pub(crate) kind: Kind,
    pub(crate) segs: Vec<Seg>,
    pub(crate) len: u64,
    pub(crate) first_psn: u32,
    /// PSNs it takes (packets of a SEND/WRITE, responses of a READ).
    pub(crate) npkts: u32,
    /// READ: responses received in order.
    pub(crate) read_done: u32,
}

impl ReqWqe {
    fn last_psn(&self) -> u32 {
        psn_add(self.first_psn, self.npkts - 1)
    }

    fn wc_opcode(&self) -> WcOpcode {
        match self.kind {
            Kind::Send => WcOpcode::Send,
            Kind::Write { .. } => WcOpcode::RdmaWrite,
            Kind::Read { .. } => WcOpcode::RdmaRead,
        }
    }
}

/// Requester state.
pub(crate) struct Requester {
    pub(crate) wqes: std::collections::VecDeque<ReqWqe>,
    /// PSN after the last packet of the last queued WQE.
    pub(crate) next_psn: u32,
    /// Oldest PSN not acknowledged.
    pub(crate) una: u32,
    /// Next packet to transmit: WQE index and packet index in it.
    pub(crate) tx_idx: usize,
    pub(crate) tx_pkt: u32,
    /// PSN after the highest one ever transmitted.
    pub(crate) max_sent: u32,
    /// Retransmit timer (armed while something is unacknowledged).
    pub(crate) deadline: Option<Instant>,
    /// No transmission before this (RNR back-off, local fault).
    pub(crate) hold_until: Option<Instant>,
    pub(crate) retry_left: u8,
    pub(crate) rnr_left: u8,
    /// A READ response arrived ahead of the expected one at this `una`:
    /// rewind once per `una`, not once per packet.
    pub(crate) rewound_at: Option<u32>,
}

impl Requester {
    pub(crate) fn new(psn: u32, retry: u8, rnr: u8) -> Requester {
        Requester {
            wqes: Default::default(),
            next_psn: psn,
            una: psn,
            tx_idx: 0,
            tx_pkt: 0,
            max_sent: psn,
            deadline: None,
            hold_until: None,
            retry_left: retry,
            rnr_left: rnr,
            rewound_at: None,
        }
    }

    fn tx_psn(&self) -> u32 {
        match self.wqes.get(self.tx_idx) {
            Some(w) => psn_add(w.first_psn, self.tx_pkt),
            None => self.next_psn,
        }
    }

    /// Transmit from `psn` on (go-back-N).
    pub(crate) fn rewind(&mut self, psn: u32) {
        for (i, w) in self.wqes.iter().enumerate() {
            let d = psn_diff(psn, w.first_psn);
            if d >= 0 && (d as u32) < w.npkts {
                self.tx_idx = i;
                self.tx_pkt = d as u32;
                return;
            }
        }
        self.tx_idx = self.wqes.len();
        self.tx_pkt = 0;
    }
}

impl RcQp {
    fn packets_for(&self, len: u64) -> u32 {
        len.div_ceil(self.mtu as u64).max(1) as u32
    }

    /// Take work requests from the send queue while the window has room.
    fn admit(&mut self, shared: &Shared, window: u32) {
        loop {
            if psn_diff(self.req.next_psn, self.req.una) >= window as i32 {
                return;
            }
            let Some(wr) = self.qp.sq.lock().pop_front() else {
                return;
            };
            match self.prepare(shared, &wr) {
                Ok(wqe) => {
                    self.req.next_psn = psn_add(wqe.first_psn, wqe.npkts);
                    self.req.wqes.push_back(wqe);
                }
                Err(memory::Refused::Fenced) => {
                    // Its MR comes back once the device answers: later.
                    self.qp.sq.lock().push_front(wr);
                    self.req.hold_until = Some(Instant::now() + LOCAL_FAULT_BACKOFF);
                    return;
                }
                Err(memory::Refused::Access) => {
                    // A bad lkey ends this WR and the QP, like the device.
                    self.qp.send_cq.push(crate::verbs::Wc {
                        wr_id: wr.wr_id,
                        status: WcStatus::LocProtErr,
                        opcode: match wr.opcode {
                            Opcode::Send => WcOpcode::Send,
                            Opcode::RdmaWrite { .. } => WcOpcode::RdmaWrite,
                            Opcode::RdmaRead { .. } => WcOpcode::RdmaRead,
                        },
                        byte_len: 0,
                        qp_num: self.qp.qpn,
                    });
                    self.stats.wqe_errors.fetch_add(1, Ordering::Relaxed);
                    self.set_error();
                    return;
                }
            }
        }
    }

    fn prepare(&self, shared: &Shared, wr: &SendWr) -> Result<ReqWqe, memory::Refused> {
        let read = matches!(wr.opcode, Opcode::RdmaRead { .. });
        let (segs, len) = memory::local_segs(shared, self.qp.pd, &wr.sges, read)?;
        if len > u64::from(u32::MAX) {
            return Err(memory::Refused::Access);
        }
        let kind = match wr.opcode {
            Opcode::Send => Kind::Send,
            Opcode::RdmaWrite { remote_addr, rkey } => Kind::Write {
                va: remote_addr,
                rkey,
            },
            Opcode::RdmaRead { remote_addr, rkey } => Kind::Read {
                va: remote_addr,
                rkey,
            },
        };
        Ok(ReqWqe {
            wr_id: wr.wr_id,
            signaled: wr.signaled,
            kind,
            segs,
            len,
            first_psn: self.req.next_psn,
            npkts: self.packets_for(len),
            read_done: 0,
        })
    }

    /// Send what the window allows, at most `budget` packets. True if
    /// anything went out or changed.
    pub(crate) fn transmit(
        &mut self,
        shared: &Shared,
        wire: &mut Wire,
        faults: &mut memory::Faults,
        now: Instant,
        budget: u32,
    ) -> bool {
        if self.in_error() {
            return self.flush();
        }
        self.check_timer(now);
        if self.in_error() {
            return self.flush();
        }
        if let Some(t) = self.req.hold_until {
            if now < t {
                return false;
            }
            self.req.hold_until = None;
        }
        let window = self.config.window;
        self.admit(shared, window);
        let mut sent = 0;
        while sent < budget && self.req.tx_idx < self.req.wqes.len() {
            let psn = self.req.tx_psn();
            if psn_diff(psn, self.req.una) >= window as i32 {
                break;
            }
            match self.send_one(shared, wire, faults) {
                Ok(true) => sent += 1,
                Ok(false) => break,
                Err(()) => return true,
            }
            if !self.in_error() {
                self.admit(shared, window);
            }
        }
        if sent > 0 && self.req.deadline.is_none() {
            self.req.deadline = Some(now + self.config.retransmit_timeout);
        }
        sent > 0
    }

    /// Send the packet at the transmit pointer. Ok(false): could not now
    /// (socket full, local page fault); Err: the QP failed.
    fn send_one(
        &mut self,
        shared: &Shared,
        wire: &mut Wire,
        faults: &mut memory::Faults,
    ) -> Result<bool, ()> {
        let mtu = self.mtu as u64;
        let (idx, pkt) = (self.req.tx_idx, self.req.tx_pkt);
        let w = &self.req.wqes[idx];
        let psn = psn_add(w.first_psn, pkt);
        let retransmit = psn_diff(psn, self.req.max_sent) < 0;
        let off = u64::from(pkt) * mtu;
        let dqp = self.remote_qpn;
        match w.kind {
            Kind::Read { va, rkey } => {
                // The local buffer must be mapped before responses land.
                match memory::segs_missing(&w.segs) {
                    Ok(None) => {}
                    Ok(Some((mr, iova, end))) => {
                        faults.request(shared, &mr, iova, end, true);
                        self.req.hold_until = Some(Instant::now() + LOCAL_FAULT_BACKOFF);
                        return Ok(false);
                    }
                    Err(Miss::Fenced) => {
                        self.req.hold_until = Some(Instant::now() + LOCAL_FAULT_BACKOFF);
                        return Ok(false);
                    }
                    Err(Miss::Page { .. } | Miss::Dead) => {
                        self.fail_front(WcStatus::LocProtErr);
                        return Err(());
                    }
                }
                let reth = Reth {
                    va: va.wrapping_add(off),
                    rkey,
                    dma_len: (w.len - off.min(w.len)) as u32,
                };
                let bth = Bth::new(Op::ReadRequest, dqp, psn);
                if !wire.send(self.remote, bth, Some(&reth), None, &[]) {
                    return Ok(false);
                }
                self.req.tx_idx += 1;
                self.req.tx_pkt = 0;
                let next = psn_add(w.first_psn, w.npkts);
                self.note_sent(next, retransmit, 1, wire);
            }
            Kind::Send | Kind::Write { .. } => {
                let n = (w.len - off).min(mtu) as usize;
                let mut payload = std::mem::take(&mut self.scratch);
                payload.resize(n, 0);
                match memory::gather(&w.segs, off, &mut payload) {
                    Ok(()) => {}
                    Err(Miss::Page { key, iova }) => {
                        self.scratch = payload;
                        let seg = w.segs.iter().find(|s| s.mr.key == key).cloned();
                        if let Some(s) = seg {
                            faults.request(shared, &s.mr, iova, s.addr + s.len, false);
                        }
                        self.req.hold_until = Some(Instant::now() + LOCAL_FAULT_BACKOFF);
                        return Ok(false);
                    }
                    Err(Miss::Fenced) => {
                        self.scratch = payload;
                        self.req.hold_until = Some(Instant::now() + LOCAL_FAULT_BACKOFF);
                        return Ok(false);
                    }
                    Err(Miss::Dead) => {
                        self.scratch = payload;
                        self.fail_front(WcStatus::LocProtErr);
                        return Err(());
                    }
                }
                let pos = position(pkt, w.npkts);
                let (op, reth) = match w.kind {
                    Kind::Write { va, rkey } => {
                        let op = Op::for_write(pos);
                        // A retransmission from the middle of a WRITE
                        // cannot carry a RETH; the responder kept the
                        // message's context.
                        let reth = op.has_reth().then_some(Reth {
                            va,
                            rkey,
                            dma_len: w.len as u32,
                        });
                        (op, reth)
                    }
                    _ => (Op::for_send(pos), None),
                };
                let mut bth = Bth::new(op, dqp, psn);
                bth.ack_req = matches!(pos, Position::Last | Position::Only)
                    || psn.is_multiple_of(self.config.ack_every)
                    || psn_diff(psn_add(psn, 1), self.req.una) >= self.config.window as i32;
                let ok = wire.send(self.remote, bth, reth.as_ref(), None, &payload);
                self.scratch = payload;
                if !ok {
                    return Ok(false);
                }
                wire.stats
                    .tx_payload_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                if pkt + 1 >= w.npkts {
                    self.req.tx_idx += 1;
                    self.req.tx_pkt = 0;
                } else {
                    self.req.tx_pkt += 1;
                }
                self.note_sent(psn_add(psn, 1), retransmit, 1, wire);
            }
        }
        Ok(true)
    }

    fn note_sent(&mut self, next: u32, retransmit: bool, pkts: u64, wire: &Wire) {
        if retransmit {
            wire.stats.retransmits.fetch_add(pkts, Ordering::Relaxed);
        }
        if psn_diff(next, self.req.max_sent) > 0 {
            self.req.max_sent = next;
        }
    }

    /// Timer expiry: go back to the oldest unacknowledged PSN, or give up.
    fn check_timer(&mut self, now: Instant) {
        let Some(deadline) = self.req.deadline else {
            return;
        };
        if psn_diff(self.req.max_sent, self.req.una) <= 0 {
            self.req.deadline = None;
            return;
        }
        if now < deadline {
            return;
        }
        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        if self.req.retry_left == 0 {
            self.fail_front(WcStatus::RetryExcErr);
            return;
        }
        self.req.retry_left -= 1;
        let una = self.req.una;
        self.req.rewind(una);
        // Back off: each expiry without progress doubles the wait (at most
        // 1 s), so a peer that is only slow — descheduled on a busy host —
        // is not given up on after a few milliseconds.
        let tries = u32::from(self.config.retry_cnt - self.req.retry_left);
        let wait = self
            .config
            .retransmit_timeout
            .saturating_mul(1 << tries.min(10))
            .min(MAX_BACKOFF);
        self.req.deadline = Some(now + wait);
    }

    /// A gap was seen at `psn`: go back to it, but only once until there is
    /// progress — every later response in flight shows the same gap, and
    /// rewinding for each of them resends the whole window each time
    /// (exercised under real loss by
    /// `tests/roce_netns.rs::two_hosts_under_one_percent_loss_and_invalidations`).
    fn go_back_once(&mut self, psn: u32) {
        if self.req.rewound_at != Some(psn) {
            self.req.rewound_at = Some(psn);
            self.req.rewind(psn);
        }
    }

    /// Forward progress: reset the timer and the retry counts.
    fn progress(&mut self) {
        self.req.retry_left = self.config.retry_cnt;
        self.req.rnr_left = self.qp.caps.rnr_retry;
        self.req.rewound_at = None;
        self.req.deadline = if psn_diff(self.req.max_sent, self.req.una) > 0 {
            Some(Instant::now() + self.config.retransmit_timeout)
        } else {
            None
        };
    }

    /// QP in error: flush everything queued with WR_FLUSH_ERR.
    pub(crate) fn flush(&mut self) -> bool {
        let mut worked = false;
        let qpn = self.qp.qpn;
        for w in self.req.wqes.drain(..) {
            self.qp.send_cq.push(crate::verbs::Wc {
                wr_id: w.wr_id,
                status: WcStatus::WrFlushErr,
                opcode: w.wc_opcode(),
                byte_len: 0,
                qp_num: qpn,
            });
            worked = true;
        }
        self.req.tx_idx = 0;
        self.req.tx_pkt = 0;
        self.req.deadline = None;
        let sq: Vec<SendWr> = self.qp.sq.lock().drain(..).collect();
        for wr in sq {
            self.qp.send_cq.push(crate::verbs::Wc {
                wr_id: wr.wr_id,
                status: WcStatus::WrFlushErr,
                opcode: match wr.opcode {
                    Opcode::Send => WcOpcode::Send,
                    Opcode::RdmaWrite { .. } => WcOpcode::RdmaWrite,
                    Opcode::RdmaRead { .. } => WcOpcode::RdmaRead,
                },
                byte_len: 0,
                qp_num: qpn,
            });
            worked = true;
        }
        let rq: Vec<crate::verbs::RecvWr> = self.qp.rq.lock().drain(..).collect();
        let pending = self.resp.take_recv();
        for wr in pending.into_iter().chain(rq) {
            self.qp.recv_cq.push(crate::verbs::Wc {
                wr_id: wr.wr_id,
                status: WcStatus::WrFlushErr,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                qp_num: qpn,
            });
            worked = true;
        }
        worked
    }

    /// When the requester next needs attention (timer, back-off end).
    pub(crate) fn next_event(&self) -> Option<Instant> {
        match (self.req.deadline, self.req.hold_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Longest retransmit wait after repeated expiries.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Pause after a local page fault before trying again.
const LOCAL_FAULT_BACKOFF: Duration = Duration::from_micros(50);
