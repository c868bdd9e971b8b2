//! The device's RoCE side: queue pairs connected to another odpvm
//! (`devices::rnic::roce`), handed to the guest's banks, and which of them
//! lost their connection.

use super::{RnicDevice, ERR_ROCE_GONE, MAX_RING};
use crate::devices::rnic::roce::{RoceLinkError, RoceRemote};
use rdma_passthrough::{Cq, Pd, Qp, QpCaps};

impl RnicDevice {
    /// Queue pairs go to another odpvm over RoCE: one QP per bank is
    /// created now (on the bank's CQ) and handed to `connect`, which
    /// returns the link; the guest's next enable of a bank takes its QP.
    /// A reset keeps a healthy one; one in the error state is dropped, and
    /// the bank's next enable fails with `ERR_ROCE_GONE` (connections are
    /// not re-established).
    pub(in crate::devices::rnic) fn attach_roce(
        &self,
        connect: impl FnOnce(&Pd, &[&Qp]) -> Result<RoceRemote, RoceLinkError>,
    ) -> Result<(), RoceLinkError> {
        let caps = QpCaps {
            max_send_wr: MAX_RING as usize,
            max_recv_wr: MAX_RING as usize,
            max_sge: 1,
            rnr_retry: 7,
            // ODP faults on this responder resolve in tens of µs: have the
            // requester retry soon (perftest's default, 0.64 ms, would
            // idle the link for most of each fault).
            min_rnr_timer: rdma_passthrough::roce::wire::rnr_timer_code(
                std::time::Duration::from_micros(100),
            ),
        };
        let mut qps = Vec::with_capacity(self.qps.len());
        for q in &self.qps {
            let cq = q.lock().cq.clone();
            qps.push(self.rnic.create_qp(&self.pd, &cq, &cq, caps)?);
        }
        let remote = connect(&self.pd, &qps.iter().collect::<Vec<_>>())?;
        for (q, qp) in self.qps.iter().zip(qps) {
            q.lock().preconnected = Some(qp);
        }
        *self.roce.write() = Some(remote);
        Ok(())
    }

    /// Take the RoCE-connected queue pairs (with their CQs) away from the
    /// guest, for the host to drive (`odpvm run --roce-echo` answers the
    /// peer's SENDs for an idle guest).
    pub fn take_roce_qps(&self) -> Vec<(Qp, Cq)> {
        self.qps
            .iter()
            .filter_map(|q| {
                let mut q = q.lock();
                let cq = q.cq.clone();
                q.preconnected.take().map(|qp| (qp, cq))
            })
            .collect()
    }

    pub(super) fn kick_roce(&self) {
        if let Some(r) = self.roce.read().as_ref() {
            r.port.kick();
        }
    }

    pub fn roce(&self) -> parking_lot::RwLockReadGuard<'_, Option<RoceRemote>> {
        self.roce.read()
    }

    /// Queue-pair banks whose RoCE connection is gone: their QP is in the
    /// error state, or a reset dropped it (`ERR_ROCE_GONE`).
    pub fn roce_qps_lost(&self) -> usize {
        self.qps
            .iter()
            .filter(|q| {
                let q = q.lock();
                q.error == ERR_ROCE_GONE
                    || q.qp.as_ref().is_some_and(|qp| qp.in_error())
                    || q.preconnected.as_ref().is_some_and(|qp| qp.in_error())
            })
            .count()
    }
}
