//! One RC queue pair connected over RoCEv2: the emulated RNIC's QP (its
//! queues and completion queues) plus the transport state of its requester
//! (`requester.rs`) and responder (`responder.rs`). Only the port thread
//! touches it.

use super::requester::Requester;
use super::responder::Responder;
use super::stats::RoceStats;
use super::RoceConfig;
use crate::emulated::QpState;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Where the other end of a connection is: what perftest exchanges out of
/// band (QPN, PSN, GID — an IPv4 address here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteEnd {
    /// The peer port's address (UDP port 4791 unless configured otherwise).
    pub addr: SocketAddrV4,
    pub qpn: u32,
    /// The peer's first send PSN (our responder's expected PSN).
    pub psn: u32,
}

pub(crate) struct RcQp {
    pub(crate) qp: Arc<QpState>,
    pub(crate) remote: SocketAddrV4,
    pub(crate) remote_qpn: u32,
    pub(crate) mtu: usize,
    pub(crate) config: RoceConfig,
    pub(crate) stats: Arc<RoceStats>,
    pub(crate) req: Requester,
    pub(crate) resp: Responder,
    /// Payload buffer reused between packets.
    pub(crate) scratch: Vec<u8>,
}

impl RcQp {
    pub(crate) fn new(
        qp: Arc<QpState>,
        local_psn: u32,
        remote: RemoteEnd,
        config: RoceConfig,
        stats: Arc<RoceStats>,
    ) -> RcQp {
        let rnr = qp.caps.rnr_retry;
        RcQp {
            req: Requester::new(local_psn & super::wire::PSN_MASK, config.retry_cnt, rnr),
            resp: Responder::new(remote.psn & super::wire::PSN_MASK),
            qp,
            remote: remote.addr,
            remote_qpn: remote.qpn & super::wire::QPN_MASK,
            mtu: config.mtu,
            scratch: Vec::with_capacity(config.mtu),
            config,
            stats,
        }
    }

    pub(crate) fn in_error(&self) -> bool {
        self.qp.error.load(Ordering::Acquire)
    }

    /// Enter the error state (visible before the completions that follow).
    pub(crate) fn set_error(&self) {
        self.qp.error.store(true, Ordering::Release);
    }
}
