//! Validation of a WQE before it runs: every scatter/gather entry and the
//! remote address are checked against live MRs (keys, protection domain,
//! access rights, bounds with overflow-checked arithmetic); what fails
//! becomes an error completion, never an access.

use super::*;
impl Engine {
    /// Look up a local SGE list in `pd`, needing `write` access.
    pub(super) fn local_segs(
        &self,
        pd: u32,
        sges: &[Sge],
        write: bool,
    ) -> Result<(Vec<Seg>, u64), ()> {
        let mrs = self.shared.mrs.read();
        let mut out = Vec::with_capacity(sges.len());
        let mut total = 0u64;
        for s in sges {
            let len = u64::from(s.length);
            let mr = mrs.get(&s.lkey).ok_or(())?;
            if mr.pd != pd || !mr.live() || (write && !mr.access.contains(Access::LOCAL_WRITE)) {
                return Err(());
            }
            if !mr.contains(s.addr, len) {
                return Err(());
            }
            total += len;
            if len > 0 {
                out.push(Seg {
                    mr: mr.clone(),
                    addr: s.addr,
                    len,
                });
            }
        }
        Ok((out, total))
    }

    pub(super) fn remote_seg(
        &self,
        pd: u32,
        addr: u64,
        rkey: u32,
        len: u64,
        need: Access,
    ) -> Result<Vec<Seg>, ()> {
        let mrs = self.shared.mrs.read();
        let mr = mrs.get(&rkey).ok_or(())?;
        if mr.pd != pd || !mr.live() || !mr.access.contains(need) || !mr.contains(addr, len) {
            return Err(());
        }
        Ok(if len == 0 {
            Vec::new()
        } else {
            vec![Seg {
                mr: mr.clone(),
                addr,
                len,
            }]
        })
    }

    pub(super) fn peer(&self, qp: &QpState) -> Option<Arc<QpState>> {
        let qpn = qp.remote.load(Ordering::Acquire);
        if qpn == 0 {
            return None;
        }
        self.shared
            .qps
            .read()
            .get(&qpn)
            .filter(|p| !p.destroyed.load(Ordering::Acquire))
            .cloned()
    }

    /// Validate a new WQE into an `Active`, or the status to fail it with.
    pub(super) fn prepare(&self, qp: &QpState, wr: SendWr) -> Result<Active, (SendWr, WcStatus)> {
        let Some(peer) = self.peer(qp) else {
            return Err((wr, WcStatus::RetryExcErr));
        };
        if peer.error.load(Ordering::Acquire) {
            return Err((wr, WcStatus::RemOpErr));
        }
        let read = matches!(wr.opcode, Opcode::RdmaRead { .. });
        let (local, total) = match self.local_segs(qp.pd, &wr.sges, read) {
            Ok(x) => x,
            Err(()) => return Err((wr, WcStatus::LocProtErr)),
        };
        let (src, dst, src_remote) = match wr.opcode {
            Opcode::RdmaWrite { remote_addr, rkey } => {
                match self.remote_seg(peer.pd, remote_addr, rkey, total, Access::REMOTE_WRITE) {
                    Ok(r) => (local, r, false),
                    Err(()) => return Err((wr, WcStatus::RemAccessErr)),
                }
            }
            Opcode::RdmaRead { remote_addr, rkey } => {
                match self.remote_seg(peer.pd, remote_addr, rkey, total, Access::REMOTE_READ) {
                    Ok(r) => (r, local, true),
                    Err(()) => return Err((wr, WcStatus::RemAccessErr)),
                }
            }
            // The destination is the peer's receive, taken when it exists.
            Opcode::Send => (local, Vec::new(), false),
        };
        Ok(Active {
            wr,
            src,
            dst,
            src_remote,
            total,
            done: 0,
            recv: None,
            peer: Some(peer),
        })
    }
}
