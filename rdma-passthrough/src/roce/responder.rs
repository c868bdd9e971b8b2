//! The responder half of an RC queue pair (`rxe_resp.c` in Linux):
//! executes requests in PSN order against the local RNIC's memory regions.
//!
//! * In order (`psn == epsn`): WRITE data goes to the rkey's MR, SEND data
//!   to the next posted receive, a READ is answered with READ responses.
//!   The AckReq bit gets an ACK (coalescing is the requester's choice).
//! * Ahead of `epsn`: one PSN-sequence-error NAK per expected PSN; the
//!   packet is dropped.
//! * Behind (a duplicate): a READ is replayed from memory; anything else
//!   is re-ACKed (if it asks for an ACK) and not executed again.
//! * Far out of the window either way: dropped and counted.
//! * Bad rkey, missing rights, bounds past the MR or past backed memory:
//!   remote-access-error NAK. An MR the RNIC fenced (it comes back once
//!   the device answers): RNR NAK. Opcode out of sequence, wrong lengths:
//!   invalid-request NAK. Receive buffer too small: invalid request, the
//!   receive completes with LOC_LEN_ERR.
//! * A page not in the MR's device page table: a device page fault is
//!   queued and the requester gets an RNR NAK; it retries after the timer
//!   (the QP's own `QpCaps::min_rnr_timer`). No receive posted: RNR NAK
//!   too.
//!
//! Tests: `tests/roce.rs` (`write_read_send_between_two_rnics_mtu_{1024,4096}`,
//! `bad_rkey_and_bounds_complete_with_remote_access_error`,
//! `odp_faults_on_the_responder_answer_with_rnr_naks`,
//! `rnr_naks_carry_each_qps_own_min_rnr_timer`) and
//! `tests/roce_crafted.rs` (`crafted_packets_are_dropped_or_naked_and_counted`).

use super::memory::{self, Miss, Refused, Seg};
use super::port::Wire;
use super::qp::RcQp;
use super::wire::*;
use crate::emulated::mr::MrState;
use crate::emulated::Shared;
use crate::verbs::{Access, RecvWr, Wc, WcOpcode, WcStatus};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Duplicates further back than this many PSNs are dropped as out of
/// window rather than re-ACKed.
const DUPLICATE_WINDOW: i32 = 1 << 20;

/// A multi-packet message in progress.
enum InMsg {
    Write {
        mr: Arc<MrState>,
        va: u64,
        resid: u64,
    },
    Send,
}

/// The receive a SEND is filling.
struct PostedRecv {
    wr: RecvWr,
    segs: Vec<Seg>,
    cap: u64,
    off: u64,
}

pub(crate) struct Responder {
    pub(crate) epsn: u32,
    pub(crate) msn: u32,
    /// A NAK (sequence or RNR) was sent for `epsn`: do not repeat it for
    /// every packet still in flight behind it.
    nak_sent: bool,
    cur: Option<InMsg>,
    recv: Option<PostedRecv>,
}

impl Responder {
    pub(crate) fn new(epsn: u32) -> Responder {
        Responder {
            epsn,
            msn: 0,
            nak_sent: false,
            cur: None,
            recv: None,
        }
    }

    pub(crate) fn take_recv(&mut self) -> Option<RecvWr> {
        self.recv.take().map(|r| r.wr)
    }
}

/// What to answer a request with.
enum Verdict {
    /// Executed; ACK if asked.
    Done,
    /// Executed a READ (responses already sent).
    Responded,
    Rnr,
    Nak(NakCode),
}

impl RcQp {
    pub(crate) fn on_request(
        &mut self,
        shared: &Shared,
        wire: &mut Wire,
        faults: &mut memory::Faults,
        pkt: &Packet<'_>,
    ) {
        if self.in_error() {
            return;
        }
        let psn = pkt.bth.psn;
        let d = psn_diff(psn, self.resp.epsn);
        if d > 0 {
            if d > self.config.window.max(1 << 16) as i32 {
                self.stats.out_of_window.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !self.resp.nak_sent {
                self.resp.nak_sent = true;
                self.stats.seq_naks_sent.fetch_add(1, Ordering::Relaxed);
                let epsn = self.resp.epsn;
                self.send_aeth(
                    wire,
                    epsn,
                    Aeth::nak(NakCode::PsnSequenceError, self.resp.msn),
                );
            }
            return;
        }
        if d < 0 {
            if d < -DUPLICATE_WINDOW {
                self.stats.out_of_window.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.duplicate(shared, wire, faults, pkt);
            return;
        }
        let verdict = self.execute(shared, wire, faults, pkt);
        match verdict {
            Verdict::Done => {
                self.resp.epsn = psn_add(psn, 1);
                self.resp.nak_sent = false;
                if pkt.bth.ack_req {
                    self.stats.acks_sent.fetch_add(1, Ordering::Relaxed);
                    self.send_aeth(wire, psn, Aeth::ack(self.resp.msn));
                }
            }
            Verdict::Responded => self.resp.nak_sent = false,
            Verdict::Rnr => {
                // Every retry of `epsn` that cannot be served gets its RNR
                // NAK (that is what the requester counts); packets behind
                // it in flight get no sequence NAK.
                self.resp.nak_sent = true;
                self.rnr_nak(wire, psn);
            }
            Verdict::Nak(code) => {
                match code {
                    NakCode::RemoteAccessError => &self.stats.access_naks_sent,
                    NakCode::InvalidRequest => &self.stats.invalid_naks_sent,
                    _ => &self.stats.op_naks_sent,
                }
                .fetch_add(1, Ordering::Relaxed);
                // The failed request is consumed: the requester's QP is in
                // error, and a retransmission must not be executed.
                self.resp.cur = None;
                self.resp.epsn = psn_add(psn, 1);
                self.send_aeth(wire, psn, Aeth::nak(code, self.resp.msn));
            }
        }
    }

    fn rnr_nak(&mut self, wire: &mut Wire, psn: u32) {
        self.stats.rnr_naks_sent.fetch_add(1, Ordering::Relaxed);
        // This QP's own timer (`QpCaps::min_rnr_timer`, as a verbs
        // consumer sets it per QP), 5 bits on the wire (test
        // `tests/roce.rs::rnr_naks_carry_each_qps_own_min_rnr_timer`).
        let timer = self.qp.caps.min_rnr_timer & 31;
        self.send_aeth(wire, psn, Aeth::rnr_nak(timer, self.resp.msn));
    }

    fn send_aeth(&mut self, wire: &mut Wire, psn: u32, aeth: Aeth) {
        let bth = Bth::new(Op::Acknowledge, self.remote_qpn, psn);
        wire.send(self.remote, bth, None, Some(&aeth), &[]);
    }

    fn duplicate(
        &mut self,
        shared: &Shared,
        wire: &mut Wire,
        faults: &mut memory::Faults,
        pkt: &Packet<'_>,
    ) {
        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        if pkt.bth.op == Op::ReadRequest {
            // Re-execute it (IBTA: duplicate READs are replayed, with the
            // memory as it is now).
            self.stats.read_replays.fetch_add(1, Ordering::Relaxed);
            let Some(reth) = pkt.reth else {
                return;
            };
            let len = u64::from(reth.dma_len);
            let mr = match memory::remote_mr(
                shared,
                self.qp.pd,
                reth.rkey,
                reth.va,
                len,
                Access::REMOTE_READ,
            ) {
                Ok(mr) => mr,
                Err(Refused::Fenced) => return self.rnr_nak(wire, pkt.bth.psn),
                Err(Refused::Access) => return,
            };
            match memory::first_missing(&mr, reth.va, len) {
                Ok(None) => {
                    let msn = self.resp.msn;
                    self.read_responses(shared, wire, faults, &mr, &reth, pkt.bth.psn, msn);
                }
                Ok(Some(iova)) => {
                    faults.request(shared, &mr, iova, reth.va + len, false);
                    self.rnr_nak(wire, pkt.bth.psn);
                }
                Err(Miss::Fenced) => self.rnr_nak(wire, pkt.bth.psn),
                Err(_) => {}
            }
            return;
        }
        if pkt.bth.ack_req {
            // Everything before epsn was executed: say so.
            self.stats.acks_sent.fetch_add(1, Ordering::Relaxed);
            let last = psn_add(self.resp.epsn, PSN_MASK);
            self.send_aeth(wire, last, Aeth::ack(self.resp.msn));
        }
    }

    /// The opcode fits the message in progress.
    fn in_sequence(&self, op: Op) -> bool {
        let pos = op.position();
        let continues = matches!(pos, Position::Middle | Position::Last);
        match &self.resp.cur {
            None => !continues,
            Some(InMsg::Write { .. }) => continues && op.is_write(),
            Some(InMsg::Send) => continues && op.is_send(),
        }
    }

    fn execute(
        &mut self,
        shared: &Shared,
        wire: &mut Wire,
        faults: &mut memory::Faults,
        pkt: &Packet<'_>,
    ) -> Verdict {
        let op = pkt.bth.op;
        if !self.in_sequence(op) {
            return Verdict::Nak(NakCode::InvalidRequest);
        }
        let mtu = self.mtu;
        let n = pkt.payload.len();
        let pos = op.position();
        // First and middle packets carry exactly one MTU (IBTA C9-88).
        if matches!(pos, Position::First | Position::Middle) && n != mtu || n > mtu {
            return Verdict::Nak(NakCode::InvalidRequest);
        }
        if op == Op::ReadRequest {
            return self.read_request(shared, wire, faults, pkt);
        }
        if op.is_write() {
            self.write_packet(shared, faults, pkt)
        } else {
            self.send_packet(shared, faults, pkt)
        }
    }

    fn write_packet(
        &mut self,
        shared: &Shared,
        faults: &mut memory::Faults,
        pkt: &Packet<'_>,
    ) -> Verdict {
        let n = pkt.payload.len() as u64;
        let (mr, va, resid) = match (&self.resp.cur, pkt.reth) {
            (None, Some(r)) => {
                let len = u64::from(r.dma_len);
                match memory::remote_mr(shared, self.qp.pd, r.rkey, r.va, len, Access::REMOTE_WRITE)
                {
                    Ok(mr) => (mr, r.va, len),
                    Err(Refused::Fenced) => return Verdict::Rnr,
                    Err(Refused::Access) => return Verdict::Nak(NakCode::RemoteAccessError),
                }
            }
            (Some(InMsg::Write { mr, va, resid }), None) => (mr.clone(), *va, *resid),
            _ => return Verdict::Nak(NakCode::InvalidRequest),
        };
        let last = matches!(pkt.bth.op.position(), Position::Last | Position::Only);
        // The payloads must add up to the RETH's length exactly.
        if n > resid || (last && n != resid) || (!last && n == resid) {
            return Verdict::Nak(NakCode::InvalidRequest);
        }
        match memory::write(&mr, va, pkt.payload) {
            Ok(()) => {}
            Err(Miss::Page { iova, .. }) => {
                faults.request(shared, &mr, iova, va + resid, true);
                return Verdict::Rnr;
            }
            Err(Miss::Fenced) => return Verdict::Rnr,
            Err(Miss::Dead) => return Verdict::Nak(NakCode::RemoteAccessError),
        }
        if last {
            self.resp.cur = None;
            self.resp.msn = psn_add(self.resp.msn, 1);
        } else {
            self.resp.cur = Some(InMsg::Write {
                mr,
                va: va + n,
                resid: resid - n,
            });
        }
        Verdict::Done
    }

    fn send_packet(
        &mut self,
        shared: &Shared,
        faults: &mut memory::Faults,
        pkt: &Packet<'_>,
    ) -> Verdict {
        if self.resp.recv.is_none() {
            let Some(wr) = self.qp.rq.lock().pop_front() else {
                return Verdict::Rnr;
            };
            match memory::local_segs(shared, self.qp.pd, &wr.sges, true) {
                Ok((segs, cap)) => {
                    self.resp.recv = Some(PostedRecv {
                        wr,
                        segs,
                        cap,
                        off: 0,
                    })
                }
                Err(Refused::Fenced) => {
                    // Not consumed: it takes the message once its MR is back.
                    self.qp.rq.lock().push_front(wr);
                    return Verdict::Rnr;
                }
                Err(Refused::Access) => {
                    self.complete_recv(wr.wr_id, WcStatus::LocProtErr, 0);
                    self.set_error();
                    return Verdict::Nak(NakCode::RemoteOperationalError);
                }
            }
        }
        let recv = self.resp.recv.as_ref().expect("set above");
        let n = pkt.payload.len() as u64;
        if recv.off + n > recv.cap {
            let id = recv.wr.wr_id;
            self.resp.recv = None;
            self.complete_recv(id, WcStatus::LocLenErr, 0);
            self.set_error();
            return Verdict::Nak(NakCode::InvalidRequest);
        }
        match memory::scatter(&recv.segs, recv.off, pkt.payload) {
            Ok(()) => {}
            Err(Miss::Page { key, iova }) => {
                if let Some(s) = recv.segs.iter().find(|s| s.mr.key == key).cloned() {
                    faults.request(shared, &s.mr, iova, s.addr + s.len, true);
                }
                return Verdict::Rnr;
            }
            Err(Miss::Fenced) => return Verdict::Rnr,
            Err(Miss::Dead) => {
                let id = recv.wr.wr_id;
                self.resp.recv = None;
                self.complete_recv(id, WcStatus::LocProtErr, 0);
                self.set_error();
                return Verdict::Nak(NakCode::RemoteOperationalError);
            }
        }
        let recv = self.resp.recv.as_mut().expect("set above");
        recv.off += n;
        if matches!(pkt.bth.op.position(), Position::Last | Position::Only) {
            let (id, len) = (recv.wr.wr_id, recv.off);
            self.resp.recv = None;
            self.resp.cur = None;
            self.resp.msn = psn_add(self.resp.msn, 1);
            self.complete_recv(id, WcStatus::Success, len);
        } else {
            self.resp.cur = Some(InMsg::Send);
        }
        Verdict::Done
    }

    fn complete_recv(&self, wr_id: u64, status: WcStatus, len: u64) {
        if status == WcStatus::Success {
            self.stats.recvs_completed.fetch_add(1, Ordering::Relaxed);
        }
        self.qp.recv_cq.push(Wc {
            wr_id,
            status,
            opcode: WcOpcode::Recv,
            byte_len: len as u32,
            qp_num: self.qp.qpn,
        });
    }

    fn read_request(
        &mut self,
        shared: &Shared,
        wire: &mut Wire,
        faults: &mut memory::Faults,
        pkt: &Packet<'_>,
    ) -> Verdict {
        let Some(reth) = pkt.reth else {
            return Verdict::Nak(NakCode::InvalidRequest);
        };
        let len = u64::from(reth.dma_len);
        let mr = match memory::remote_mr(
            shared,
            self.qp.pd,
            reth.rkey,
            reth.va,
            len,
            Access::REMOTE_READ,
        ) {
            Ok(mr) => mr,
            Err(Refused::Fenced) => return Verdict::Rnr,
            Err(Refused::Access) => return Verdict::Nak(NakCode::RemoteAccessError),
        };
        // Fault everything in first: READ responses cannot be RNR-NAKed
        // halfway, so the request itself is.
        match memory::first_missing(&mr, reth.va, len) {
            Ok(None) => {}
            Ok(Some(iova)) => {
                faults.request(shared, &mr, iova, reth.va + len, false);
                return Verdict::Rnr;
            }
            Err(Miss::Fenced) => return Verdict::Rnr,
            Err(_) => return Verdict::Nak(NakCode::RemoteAccessError),
        }
        let npkts = len.div_ceil(self.mtu as u64).max(1) as u32;
        self.resp.msn = psn_add(self.resp.msn, 1);
        let msn = self.resp.msn;
        self.resp.epsn = psn_add(pkt.bth.psn, npkts);
        self.read_responses(shared, wire, faults, &mr, &reth, pkt.bth.psn, msn);
        Verdict::Responded
    }

    /// Send the responses to a READ of `reth` whose first response PSN is
    /// `psn`. If a page is invalidated midway, the rest is not sent: the
    /// page is faulted back and the requester gets an RNR NAK naming the
    /// first response not sent, from which it re-requests.
    #[allow(clippy::too_many_arguments)]
    fn read_responses(
        &mut self,
        shared: &Shared,
        wire: &mut Wire,
        faults: &mut memory::Faults,
        mr: &Arc<MrState>,
        reth: &Reth,
        psn: u32,
        msn: u32,
    ) {
        let mtu = self.mtu as u64;
        let len = u64::from(reth.dma_len);
        let npkts = len.div_ceil(mtu).max(1) as u32;
        let mut payload = std::mem::take(&mut self.scratch);
        for i in 0..npkts {
            let off = u64::from(i) * mtu;
            let n = (len - off).min(mtu) as usize;
            payload.resize(n, 0);
            if let Err(miss) = memory::read(mr, reth.va + off, &mut payload) {
                if let Miss::Page { iova, .. } = miss {
                    faults.request(shared, mr, iova, reth.va + len, false);
                }
                self.rnr_nak(wire, psn_add(psn, i));
                break;
            }
            let op = Op::for_read_response(position(i, npkts));
            let aeth = op.has_aeth().then_some(Aeth::ack(msn));
            let bth = Bth::new(op, self.remote_qpn, psn_add(psn, i));
            // A full socket buffer loses this response like the wire
            // would; the requester re-requests from the gap.
            if wire.send(self.remote, bth, None, aeth.as_ref(), &payload) {
                wire.stats
                    .tx_payload_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        self.scratch = payload;
    }
}
