//! The guest's rings: a doorbell reads the new WQEs or receive entries out
//! of guest memory (`read_obj`, every field validated), posts them to the
//! emulated RNIC, and completions are reaped into the guest's CQ ring. A
//! WQE that fails validation completes with an error, never reaches the
//! RNIC.

use super::*;
impl RnicDevice {
    /// Synthesize a completion for a WQE the device refused.
    pub(super) fn reject(&self, q: &mut QpCtx, wr_id: u64, status: WcStatus, opcode: WcOpcode) {
        self.stats.wqes_rejected.fetch_add(1, Ordering::Relaxed);
        q.flushing = true;
        if q.cqes.len() < MAX_PENDING_CQES {
            q.cqes.push_back(Wc {
                wr_id,
                status,
                opcode,
                byte_len: 0,
                qp_num: 0,
            });
        } else {
            q.cq_overrun = true;
        }
    }

    pub(super) fn send_doorbell(&self, q: &mut QpCtx, pi: u32) {
        if !q.enabled || q.error != ERR_NONE {
            return self.device_error(q, ERR_NOT_ENABLED);
        }
        let n = pi.wrapping_sub(q.sq_ci);
        if n > q.sq_size {
            return self.device_error(q, ERR_DOORBELL);
        }
        self.stats.doorbells.fetch_add(1, Ordering::Relaxed);
        self.retire_writes(q);
        for _ in 0..n {
            let slot = u64::from(q.sq_ci & (q.sq_size - 1));
            let Ok(wqe) = read_obj::<SendWqe>(&*self.mem, q.sq_base + slot * WQE_SIZE) else {
                return self.device_error(q, ERR_RING_READ);
            };
            let SendWqe {
                wr_id,
                opcode,
                flags,
                addr,
                length,
                lkey,
                remote_addr,
                rkey,
                ..
            } = wqe;
            let op = match opcode {
                OP_WRITE => Some(Opcode::RdmaWrite { remote_addr, rkey }),
                OP_READ => Some(Opcode::RdmaRead { remote_addr, rkey }),
                OP_SEND => Some(Opcode::Send),
                _ => None,
            };
            let wc_op = match opcode {
                OP_READ => WcOpcode::RdmaRead,
                OP_SEND => WcOpcode::Send,
                _ => WcOpcode::RdmaWrite,
            };
            match op {
                _ if q.flushing => self.reject(q, wr_id, WcStatus::WrFlushErr, wc_op),
                None => self.reject(q, wr_id, WcStatus::LocQpOpErr, wc_op),
                Some(_) if length > MAX_MSG => self.reject(q, wr_id, WcStatus::LocLenErr, wc_op),
                Some(op) => {
                    let wr = SendWr {
                        wr_id,
                        opcode: op,
                        sges: vec![Sge { addr, length, lkey }],
                        signaled: flags & WQE_SIGNALED != 0,
                    };
                    let qp = q.qp.as_ref().expect("enabled queue pairs have a QP");
                    if qp.post_send(wr).is_err() {
                        // Send queue full: stop here, the guest rings again.
                        return;
                    }
                    if opcode == OP_WRITE {
                        q.writes.push_back(Posted {
                            seq: q.posted,
                            remote: remote_addr,
                            len: u64::from(length),
                        });
                    }
                    q.posted += 1;
                    self.stats.wqes_posted.fetch_add(1, Ordering::Relaxed);
                }
            }
            q.sq_ci = q.sq_ci.wrapping_add(1);
        }
    }

    pub(super) fn recv_doorbell(&self, q: &mut QpCtx, pi: u32) {
        if !q.enabled || q.error != ERR_NONE {
            return self.device_error(q, ERR_NOT_ENABLED);
        }
        let n = pi.wrapping_sub(q.rq_ci);
        if n > q.rq_size {
            return self.device_error(q, ERR_DOORBELL);
        }
        for _ in 0..n {
            let slot = u64::from(q.rq_ci & (q.rq_size - 1));
            let Ok(e) = read_obj::<RecvEntry>(&*self.mem, q.rq_base + slot * RQE_SIZE) else {
                return self.device_error(q, ERR_RING_READ);
            };
            // A receive the guest's own MR cannot hold (wrong key, outside
            // its RAM — e.g. an entry a teardown wiped before the
            // doorbell) completes at once with LOC_PROT_ERR. Posted, it
            // would fail only when a SEND arrives, and on a RoCE queue pair
            // that error ends the connection for both ends (test
            // `fuzz::tests::receive_entries_the_mr_cannot_hold_complete_at_once`).
            if e.lkey != self.mr.lkey()
                || e.addr < self.floor
                || !self.mem.contains(e.addr, u64::from(e.length))
            {
                self.stats.recvs_refused.fetch_add(1, Ordering::Relaxed);
                if q.cqes.len() < MAX_PENDING_CQES {
                    q.cqes.push_back(Wc {
                        wr_id: e.wr_id,
                        status: WcStatus::LocProtErr,
                        opcode: WcOpcode::Recv,
                        byte_len: 0,
                        qp_num: 0,
                    });
                } else {
                    q.cq_overrun = true;
                }
                q.rq_ci = q.rq_ci.wrapping_add(1);
                continue;
            }
            let wr = RecvWr {
                wr_id: e.wr_id,
                sges: vec![Sge {
                    addr: e.addr,
                    length: e.length,
                    lkey: e.lkey,
                }],
            };
            let qp = q.qp.as_ref().expect("enabled queue pairs have a QP");
            if qp.post_recv(wr).is_err() {
                return;
            }
            self.stats.recvs_posted.fetch_add(1, Ordering::Relaxed);
            q.rq_ci = q.rq_ci.wrapping_add(1);
        }
    }

    /// Move finished completions from the RNIC into the register queue.
    pub(super) fn reap(&self, q: &mut QpCtx) {
        let mut buf = [Wc {
            wr_id: 0,
            status: WcStatus::Success,
            opcode: WcOpcode::Send,
            byte_len: 0,
            qp_num: 0,
        }; 64];
        while q.cqes.len() < MAX_PENDING_CQES {
            let n =
                q.cq.poll(&mut buf[..(MAX_PENDING_CQES - q.cqes.len()).min(64)]);
            if n == 0 {
                break;
            }
            for wc in &buf[..n] {
                self.stats.completions.fetch_add(1, Ordering::Relaxed);
                if wc.status != WcStatus::Success {
                    let k = self.stats.error_completions.fetch_add(1, Ordering::Relaxed);
                    // Over RoCE an error completion usually ends the
                    // connection: say why (the first few, then rarely).
                    if self.roce.read().is_some()
                        && wc.status != WcStatus::WrFlushErr
                        && (k < 4 || k.is_power_of_two())
                    {
                        log::error!(
                            "rnic device: RoCE queue pair {:#x}: {:?} completion ({:?})",
                            wc.qp_num,
                            wc.opcode,
                            wc.status
                        );
                    }
                }
                q.cqes.push_back(*wc);
            }
        }
        self.retire_writes(q);
    }
}
