//! The device thread: executes commands, then WQEs a chunk at a time,
//! round-robin over queue pairs. Because one thread does both, an
//! invalidation command is executed only between chunks of DMA: when the
//! device confirms it, no access through the zapped pages is in flight.
//! Each page is copied under both MRs' update locks, after checking both
//! are live under them, so a fence (which takes the lock) also waits for
//! the copy in progress.
//!
//! The thread sleeps whenever nothing is runnable: queue pairs waiting for
//! a device fault or a receiver-not-ready timer are not work; it wakes on
//! the doorbell or at the earliest RNR timer.

mod dma;
mod faults;
mod prepare;

use super::mr::MrState;
use super::{Command, FaultRequest, QpState, Shared};
use crate::verbs::*;
use dma::{copy_page, CopyOutcome};
use mmu::PAGE_SIZE;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A validated piece of a WQE's data: `len` bytes at `addr` in `mr`.
struct Seg {
    mr: Arc<MrState>,
    addr: u64,
    len: u64,
}

/// A WQE being executed.
struct Active {
    wr: SendWr,
    /// Data flows from `src` to `dst`; both cover `total` bytes.
    src: Vec<Seg>,
    dst: Vec<Seg>,
    /// Which side lives on the peer (for error codes and fault blame).
    src_remote: bool,
    total: u64,
    done: u64,
    /// SEND: the receive it consumes, and the peer.
    recv: Option<RecvWr>,
    peer: Option<Arc<QpState>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    None,
    /// Stalled on a device page fault on `page` of MR `mr`.
    Fault {
        mr: u32,
        page: u64,
        remote: bool,
    },
    /// Receiver not ready: retry at `until`.
    Rnr {
        until: Instant,
    },
}

struct QpRun {
    qp: Arc<QpState>,
    active: Option<Active>,
    wait: Wait,
    rnr_tries: u8,
}

struct Engine {
    shared: Arc<Shared>,
    runs: Vec<QpRun>,
    epoch: u64,
    /// Faults queued and not yet done: (mr, start, end).
    inflight: Vec<(u32, u64, u64)>,
    /// Commands held back by the `ignore_invalidations` test hook.
    held: VecDeque<Command>,
}

/// What taking a receive for a SEND came to.
enum RecvOutcome {
    Ready,
    /// Receiver not ready: the QP waits on its RNR timer.
    Waiting,
    /// The WQE ended with an error.
    Failed,
}

pub(crate) fn run(shared: Arc<Shared>) {
    let mut e = Engine {
        shared,
        runs: Vec::new(),
        epoch: u64::MAX,
        inflight: Vec::new(),
        held: VecDeque::new(),
    };
    let mut last_work = Instant::now();
    loop {
        if e.shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let seen = e.shared.doorbell();
        e.sync_qps();
        let mut worked = e.commands();
        for i in 0..e.runs.len() {
            worked |= e.step(i);
        }
        let now = Instant::now();
        if worked {
            last_work = now;
            continue;
        }
        if now.duration_since(last_work) < e.shared.config.poll {
            std::hint::spin_loop();
            continue;
        }
        let timer = e
            .runs
            .iter()
            .filter_map(|r| match r.wait {
                Wait::Rnr { until } => Some(until.saturating_duration_since(now)),
                _ => None,
            })
            .min();
        if e.shared.may_sleep(seen) {
            std::thread::park_timeout(timer.unwrap_or(Duration::from_millis(100)));
            e.shared.woke();
            // Not `last_work`: a wake-up that finds nothing runnable (an
            // RNR timer whose receive is still missing) sleeps again at
            // once instead of polling.
        }
    }
}

/// Which segment byte `done` of the data falls in, and where in it.
fn locate(segs: &[Seg], done: u64) -> (usize, u64) {
    let mut left = done;
    for (i, s) in segs.iter().enumerate() {
        if left < s.len {
            return (i, left);
        }
        left -= s.len;
    }
    (segs.len(), 0)
}

/// The error status of an access failing on the remote side or the local.
fn side_error(remote: bool) -> WcStatus {
    if remote {
        WcStatus::RemAccessErr
    } else {
        WcStatus::LocProtErr
    }
}

fn wc(wr_id: u64, status: WcStatus, opcode: WcOpcode, byte_len: u64, qpn: u32) -> Wc {
    Wc {
        wr_id,
        status,
        opcode,
        byte_len: byte_len.min(u64::from(u32::MAX)) as u32,
        qp_num: qpn,
    }
}

fn wc_opcode(op: &Opcode) -> WcOpcode {
    match op {
        Opcode::Send => WcOpcode::Send,
        Opcode::RdmaWrite { .. } => WcOpcode::RdmaWrite,
        Opcode::RdmaRead { .. } => WcOpcode::RdmaRead,
    }
}

impl Engine {
    fn sync_qps(&mut self) {
        let epoch = self.shared.qp_epoch.load(Ordering::SeqCst);
        if epoch == self.epoch {
            return;
        }
        self.epoch = epoch;
        let qps = self.shared.qps.read();
        self.runs.retain(|r| qps.contains_key(&r.qp.qpn));
        for (qpn, qp) in qps.iter() {
            if !self.runs.iter().any(|r| r.qp.qpn == *qpn) {
                self.runs.push(QpRun {
                    qp: qp.clone(),
                    active: None,
                    wait: Wait::None,
                    rnr_tries: 0,
                });
            }
        }
    }

    fn commands(&mut self) -> bool {
        let hold = self.shared.ignore_invalidations.load(Ordering::SeqCst);
        let mut batch: Vec<Command> = Vec::new();
        if !hold {
            batch.extend(self.held.drain(..));
        }
        batch.extend(self.shared.commands.lock().drain(..));
        let worked = !batch.is_empty();
        for cmd in batch {
            if hold
                && matches!(
                    cmd,
                    Command::Invalidate { .. }
                        | Command::Generation { .. }
                        | Command::Recover { .. }
                )
            {
                self.held.push_back(cmd);
                continue;
            }
            match cmd {
                Command::Invalidate {
                    mr,
                    start,
                    end,
                    done,
                } => {
                    mr.zap(start, end);
                    self.shared
                        .stats
                        .invalidations
                        .fetch_add(1, Ordering::Relaxed);
                    done.signal();
                }
                Command::Generation { mr, done } => {
                    mr.zap_all();
                    self.shared
                        .stats
                        .generations
                        .fetch_add(1, Ordering::Relaxed);
                    done.signal();
                }
                Command::FaultDone { mr, start, end, ok } => self.fault_done(mr, start, end, ok),
                Command::Dereg { mr, done } => {
                    self.inflight.retain(|f| f.0 != mr);
                    done.signal();
                }
                Command::Recover { mr } => self.recover(&mr),
            }
        }
        worked
    }

    /// Complete run `i`'s active WQE (or `wr` if given) with an error; the
    /// QP enters the error state.
    fn fail(&mut self, i: usize, status: WcStatus) {
        let run = &mut self.runs[i];
        // The error state is visible before the completion that reports it.
        run.qp.error.store(true, Ordering::Release);
        if let Some(a) = run.active.take() {
            run.qp.send_cq.push(wc(
                a.wr.wr_id,
                status,
                wc_opcode(&a.wr.opcode),
                0,
                run.qp.qpn,
            ));
            run.qp.send_retired.fetch_add(1, Ordering::AcqRel);
            if let (Some(recv), Some(peer)) = (a.recv, a.peer) {
                // The peer's receive was consumed: it completes with an error too.
                peer.recv_cq.push(wc(
                    recv.wr_id,
                    WcStatus::WrFlushErr,
                    WcOpcode::Recv,
                    0,
                    peer.qpn,
                ));
            }
        }
        run.wait = Wait::None;
        self.shared.stats.wc_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Flush everything queued on an errored QP.
    fn flush(&mut self, i: usize) -> bool {
        let qp = self.runs[i].qp.clone();
        let mut worked = false;
        if self.runs[i].active.is_some() {
            self.fail(i, WcStatus::WrFlushErr);
            worked = true;
        }
        let sq: Vec<SendWr> = qp.sq.lock().drain(..).collect();
        for wr in sq {
            qp.send_cq.push(wc(
                wr.wr_id,
                WcStatus::WrFlushErr,
                wc_opcode(&wr.opcode),
                0,
                qp.qpn,
            ));
            qp.send_retired.fetch_add(1, Ordering::AcqRel);
            worked = true;
        }
        let rq: Vec<RecvWr> = qp.rq.lock().drain(..).collect();
        for wr in rq {
            qp.recv_cq.push(wc(
                wr.wr_id,
                WcStatus::WrFlushErr,
                WcOpcode::Recv,
                0,
                qp.qpn,
            ));
            worked = true;
        }
        worked
    }

    /// Advance run `i` by at most one chunk. True if anything happened.
    fn step(&mut self, i: usize) -> bool {
        let qp = self.runs[i].qp.clone();
        // A RoCE port drives this QP's queues.
        if qp.destroyed.load(Ordering::Acquire) || qp.roce.load(Ordering::Acquire) {
            return false;
        }
        if !qp.error.load(Ordering::Acquire) && (qp.send_cq.is_overrun() || qp.recv_cq.is_overrun())
        {
            // As verbs: a CQ overrun is a CQ error, and the queue pairs
            // completing into it go to the error state.
            qp.error.store(true, Ordering::Release);
            self.shared
                .stats
                .cq_overruns
                .fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "rnic {}: QP {} completes into a CQ that overran; QP in error",
                self.shared.config.name,
                qp.qpn
            );
        }
        if qp.error.load(Ordering::Acquire) {
            return self.flush(i);
        }
        match self.runs[i].wait {
            Wait::Fault { .. } => return false,
            Wait::Rnr { until } if Instant::now() < until => return false,
            _ => self.runs[i].wait = Wait::None,
        }
        if self.runs[i].active.is_none() {
            let Some(wr) = qp.sq.lock().pop_front() else {
                return false;
            };
            match self.prepare(&qp, wr) {
                Ok(a) => self.runs[i].active = Some(a),
                Err((wr, status)) => {
                    self.runs[i].active = Some(Active {
                        wr,
                        src: Vec::new(),
                        dst: Vec::new(),
                        src_remote: false,
                        total: 0,
                        done: 0,
                        recv: None,
                        peer: None,
                    });
                    self.fail(i, status);
                    return true;
                }
            }
        }
        // SEND needs a receive at the peer.
        let needs_recv = {
            let a = self.runs[i].active.as_ref().expect("set above");
            matches!(a.wr.opcode, Opcode::Send) && a.recv.is_none()
        };
        if needs_recv {
            match self.take_recv(i) {
                RecvOutcome::Ready => {}
                // Not work: the device may sleep until the timer.
                RecvOutcome::Waiting => return false,
                RecvOutcome::Failed => return true,
            }
        }
        self.move_data(i)
    }

    /// Pop the peer's next receive for run `i`'s SEND and validate it.
    fn take_recv(&mut self, i: usize) -> RecvOutcome {
        let (peer, total) = {
            let a = self.runs[i].active.as_ref().expect("active");
            (a.peer.clone().expect("SEND has a peer"), a.total)
        };
        let Some(recv) = peer.rq.lock().pop_front() else {
            let rnr_retry = self.runs[i].qp.caps.rnr_retry;
            let run = &mut self.runs[i];
            run.rnr_tries = run.rnr_tries.saturating_add(1);
            self.shared.stats.rnr_waits.fetch_add(1, Ordering::Relaxed);
            // rnr_retry counts retries after the first attempt; 7 is forever.
            if rnr_retry != 7 && run.rnr_tries > rnr_retry {
                run.rnr_tries = 0;
                self.fail(i, WcStatus::RnrRetryExcErr);
                return RecvOutcome::Failed;
            }
            // The responder's RNR NAK carries its timer.
            run.wait = Wait::Rnr {
                until: Instant::now() + rnr_timer(peer.caps.min_rnr_timer),
            };
            return RecvOutcome::Waiting;
        };
        self.runs[i].rnr_tries = 0;
        let checked = self.local_segs(peer.pd, &recv.sges, true);
        let a = self.runs[i].active.as_mut().expect("active");
        match checked {
            Ok((segs, cap)) if cap >= total => {
                a.dst = segs;
                a.recv = Some(recv);
                RecvOutcome::Ready
            }
            other => {
                let (responder, requester) = match other {
                    Ok(_) => (WcStatus::LocLenErr, WcStatus::RemInvReqErr),
                    Err(()) => (WcStatus::LocProtErr, WcStatus::RemOpErr),
                };
                peer.error.store(true, Ordering::Release);
                peer.recv_cq
                    .push(wc(recv.wr_id, responder, WcOpcode::Recv, 0, peer.qpn));
                self.fail(i, requester);
                RecvOutcome::Failed
            }
        }
    }

    fn move_data(&mut self, i: usize) -> bool {
        let chunk = self.shared.config.chunk_bytes;
        let mut moved = 0u64;
        let (mut si, mut so, mut di, mut doff) = {
            let a = self.runs[i].active.as_ref().expect("active");
            let (si, so) = locate(&a.src, a.done);
            let (di, doff) = locate(&a.dst, a.done);
            (si, so, di, doff)
        };
        loop {
            let a = self.runs[i].active.as_ref().expect("active");
            if a.done >= a.total || moved >= chunk {
                break;
            }
            let (s, d) = (&a.src[si], &a.dst[di]);
            let (siova, diova) = (s.addr + so, d.addr + doff);
            let n = (s.len - so)
                .min(d.len - doff)
                .min(PAGE_SIZE - (siova & (PAGE_SIZE - 1)))
                .min(PAGE_SIZE - (diova & (PAGE_SIZE - 1)))
                .min(chunk - moved);
            let src_remote = a.src_remote;
            let delay = self.shared.copy_delay_us.load(Ordering::Relaxed);
            match copy_page(&s.mr, siova, &d.mr, diova, n, delay) {
                CopyOutcome::Copied => {}
                // A fenced or deregistered MR: the side it is on decides
                // the status.
                CopyOutcome::SrcDead => {
                    self.fail(i, side_error(src_remote));
                    return true;
                }
                CopyOutcome::DstDead => {
                    self.fail(i, side_error(!src_remote));
                    return true;
                }
                CopyOutcome::SrcMissing => {
                    let (mr, end) = (s.mr.clone(), s.addr + s.len);
                    self.fault(i, &mr, end, siova, false, src_remote);
                    return moved > 0;
                }
                CopyOutcome::DstMissing => {
                    let (mr, end) = (d.mr.clone(), d.addr + d.len);
                    self.fault(i, &mr, end, diova, true, !src_remote);
                    return moved > 0;
                }
            }
            moved += n;
            so += n;
            doff += n;
            let a = self.runs[i].active.as_mut().expect("active");
            a.done += n;
            if so == a.src[si].len {
                si += 1;
                so = 0;
            }
            if doff == a.dst[di].len {
                di += 1;
                doff = 0;
            }
        }
        self.shared
            .stats
            .bytes_moved
            .fetch_add(moved, Ordering::Relaxed);
        let done = {
            let a = self.runs[i].active.as_ref().expect("active");
            a.done >= a.total
        };
        if done {
            self.complete(i);
        }
        true
    }

    fn complete(&mut self, i: usize) {
        let run = &mut self.runs[i];
        let a = run.active.take().expect("active");
        if a.wr.signaled {
            run.qp.send_cq.push(wc(
                a.wr.wr_id,
                WcStatus::Success,
                wc_opcode(&a.wr.opcode),
                a.total,
                run.qp.qpn,
            ));
        }
        run.qp.send_retired.fetch_add(1, Ordering::AcqRel);
        if let (Some(recv), Some(peer)) = (a.recv, a.peer) {
            peer.recv_cq.push(wc(
                recv.wr_id,
                WcStatus::Success,
                WcOpcode::Recv,
                a.total,
                peer.qpn,
            ));
        }
        self.shared.stats.wqes.fetch_add(1, Ordering::Relaxed);
    }
}
