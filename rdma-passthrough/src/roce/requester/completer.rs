//! The requester's completer (rxe's `rxe_comp.c`): ACKs, NAKs and READ
//! responses from the responder retire WQEs in order, rewind the send
//! position (go-back-N) or end the queue pair in an error status.

use super::*;
impl RcQp {
    /// Every PSN up to and including `psn` is acknowledged: retire what
    /// that completes. An incomplete READ in that range lost responses:
    /// rewind to it.
    pub(super) fn ack_through(&mut self, psn: u32) -> bool {
        let mut advanced = false;
        while let Some(w) = self.req.wqes.front() {
            let last = w.last_psn();
            if matches!(w.kind, Kind::Read { .. }) {
                if psn_diff(psn, last) >= 0 {
                    // Acked past a READ whose responses did not all come.
                    let resume = psn_add(w.first_psn, w.read_done);
                    self.go_back_once(resume);
                }
                break;
            }
            if psn_diff(psn, last) >= 0 {
                let w = self.req.wqes.pop_front().expect("front exists");
                self.req.una = psn_add(last, 1);
                self.shift_tx();
                self.complete(w);
                advanced = true;
            } else {
                if psn_diff(psn, self.req.una) >= 0 {
                    self.req.una = psn_add(psn, 1);
                    advanced = true;
                }
                break;
            }
        }
        if self.req.wqes.is_empty() && psn_diff(psn, self.req.una) >= 0 {
            self.req.una = psn_add(psn, 1);
        }
        // Never transmit what is already acknowledged.
        if psn_diff(self.req.tx_psn(), self.req.una) < 0 && self.req.tx_idx < self.req.wqes.len() {
            let una = self.req.una;
            self.req.rewind(una);
        }
        if advanced {
            self.progress();
        }
        advanced
    }

    /// The front WQE was removed: keep the transmit pointer on the same
    /// packet.
    pub(super) fn shift_tx(&mut self) {
        if self.req.tx_idx > 0 {
            self.req.tx_idx -= 1;
        } else {
            self.req.tx_pkt = 0;
        }
    }

    pub(super) fn complete(&mut self, w: ReqWqe) {
        self.stats.wqes_completed.fetch_add(1, Ordering::Relaxed);
        if w.signaled {
            self.qp.send_cq.push(crate::verbs::Wc {
                wr_id: w.wr_id,
                status: WcStatus::Success,
                opcode: w.wc_opcode(),
                byte_len: w.len as u32,
                qp_num: self.qp.qpn,
            });
        }
    }

    /// End the oldest WQE with `status`; the QP enters the error state.
    pub(crate) fn fail_front(&mut self, status: WcStatus) {
        if let Some(w) = self.req.wqes.pop_front() {
            self.qp.send_cq.push(crate::verbs::Wc {
                wr_id: w.wr_id,
                status,
                opcode: w.wc_opcode(),
                byte_len: 0,
                qp_num: self.qp.qpn,
            });
            self.stats.wqe_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.set_error();
        // Whatever was sent after it is flushed now: a late ACK must not
        // complete it successfully.
        self.flush();
    }

    /// An ACK or NAK (opcode ACKNOWLEDGE) from the responder.
    pub(crate) fn on_ack(&mut self, psn: u32, aeth: Aeth) {
        if self.in_error() {
            return;
        }
        // Ignore responses to nothing we sent.
        if psn_diff(psn, self.req.max_sent) >= 0 || psn_diff(psn, self.req.una) < -1 {
            self.stats
                .unexpected_responses
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        match aeth.kind() {
            AethKind::Ack { .. } => {
                self.ack_through(psn);
            }
            AethKind::RnrNak { timer } => {
                self.stats.rnr_naks_received.fetch_add(1, Ordering::Relaxed);
                self.ack_through(psn_add(psn, PSN_MASK)); // psn - 1
                if self.qp.caps.rnr_retry != 7 {
                    if self.req.rnr_left == 0 {
                        self.fail_front(WcStatus::RnrRetryExcErr);
                        return;
                    }
                    self.req.rnr_left -= 1;
                }
                // The responder answered: whatever timeouts came before
                // were not a dead path or peer, and `retry_cnt` counts
                // *consecutive* timeouts without a response. (RNR NAKs
                // have their own budget, `rnr_retry`.) Not restoring it
                // here let a responder that alternates between RNR NAKs
                // (ODP faults) and silence (descheduled on a loaded host)
                // exhaust the budget at the un-backed-off rate, since each
                // RNR NAK restarts the timer (test
                // `rnr_naks_between_stalls_do_not_exhaust_the_retry_count`).
                self.req.retry_left = self.config.retry_cnt;
                self.req.rewind(psn);
                let delay = rnr_timer_duration(timer);
                self.req.hold_until = Some(Instant::now() + delay);
                // The timer restarts after the back-off.
                self.req.deadline = Some(Instant::now() + delay + self.config.retransmit_timeout);
            }
            AethKind::Nak(NakCode::PsnSequenceError) => {
                self.stats.seq_naks_received.fetch_add(1, Ordering::Relaxed);
                self.ack_through(psn_add(psn, PSN_MASK));
                self.req.rewind(psn);
            }
            AethKind::Nak(code) => {
                self.stats
                    .error_naks_received
                    .fetch_add(1, Ordering::Relaxed);
                self.ack_through(psn_add(psn, PSN_MASK));
                self.fail_front(match code {
                    NakCode::InvalidRequest => WcStatus::RemInvReqErr,
                    NakCode::RemoteAccessError => WcStatus::RemAccessErr,
                    _ => WcStatus::RemOpErr,
                });
            }
            AethKind::Reserved(_) => {
                self.stats
                    .unexpected_responses
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A READ response: data for the oldest READ, in PSN order.
    pub(crate) fn on_read_response(
        &mut self,
        shared: &Shared,
        faults: &mut memory::Faults,
        pkt: &Packet<'_>,
    ) {
        let psn = pkt.bth.psn;
        if self.in_error() {
            return;
        }
        if psn_diff(psn, self.req.max_sent) >= 0 || psn_diff(psn, self.req.una) < 0 {
            self.stats
                .unexpected_responses
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        // A response implicitly acknowledges everything before it.
        self.ack_through(psn_add(psn, PSN_MASK));
        let mtu = self.mtu as u64;
        let Some(w) = self.req.wqes.front_mut() else {
            return;
        };
        let expected = psn_add(w.first_psn, w.read_done);
        if !matches!(w.kind, Kind::Read { .. }) || psn != expected {
            // Ahead: responses were lost. Re-request once per gap.
            if psn_diff(psn, expected) > 0 {
                self.go_back_once(expected);
            }
            self.stats
                .unexpected_responses
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let off = u64::from(w.read_done) * mtu;
        let want = (w.len - off).min(mtu) as usize;
        let pos = pkt.bth.op.position();
        let want_pos = position(w.read_done, w.npkts);
        let pos_ok = pos == want_pos
            || (want_pos == Position::Last && pos == Position::Only && w.read_done > 0)
            || (want_pos == Position::Middle && pos == Position::First)
            || (want_pos == Position::Last && pos == Position::First);
        if pkt.payload.len() != want || !pos_ok {
            self.stats
                .unexpected_responses
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        match memory::scatter(&w.segs, off, pkt.payload) {
            Ok(()) => {}
            Err(Miss::Page { key, iova }) => {
                // Mapped before the request went out, invalidated since:
                // fault it back and re-request from here after a pause.
                if let Some(s) = w.segs.iter().find(|s| s.mr.key == key).cloned() {
                    faults.request(shared, &s.mr, iova, s.addr + s.len, true);
                }
                self.req.rewind(expected);
                self.req.hold_until = Some(Instant::now() + LOCAL_FAULT_BACKOFF);
                return;
            }
            Err(Miss::Fenced) => {
                self.req.rewind(expected);
                self.req.hold_until = Some(Instant::now() + LOCAL_FAULT_BACKOFF);
                return;
            }
            Err(Miss::Dead) => {
                self.fail_front(WcStatus::LocProtErr);
                return;
            }
        }
        w.read_done += 1;
        self.req.una = psn_add(psn, 1);
        if w.read_done >= w.npkts {
            let w = self.req.wqes.pop_front().expect("front exists");
            self.shift_tx();
            self.complete(w);
        }
        self.progress();
    }
}
