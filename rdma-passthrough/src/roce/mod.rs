//! RoCEv2 for the emulated RNIC: reliable-connection queue pairs whose
//! other end is another RNIC — another odpvm process on this host or
//! another, and by construction Linux rxe or a hardware RNIC — reached
//! over UDP port 4791.
//!
//! * [`wire`] — packet layout (BTH/RETH/AETH, opcodes, pad, 24-bit PSNs).
//! * [`icrc`] — the invariant CRC with rxe's masking.
//! * [`RocePort`] (`port.rs`) — one UDP socket and one thread per RNIC.
//! * `requester.rs`, `responder.rs` — the RC transport: window, ACK
//!   coalescing, go-back-N, NAKs, RNR, retry counts.
//! * `memory.rs` — how packets reach memory: through the RNIC's (ODP)
//!   memory regions, page by page under the MR's update lock, with device
//!   page faults for missing pages.
//!
//! A QP handed to [`RocePort::connect`] is driven by the port thread; the
//! device thread leaves it alone. Its work requests, receives and
//! completions use the QP's usual queues and CQs.

pub mod icrc;
mod memory;
mod port;
mod qp;
mod requester;
mod responder;
mod stats;
pub mod wire;

pub use port::RocePort;
pub use qp::RemoteEnd;
pub use stats::RoceStatsSnapshot;

use std::time::Duration;

/// Transport parameters of a port (one set for all its QPs).
#[derive(Clone, Debug)]
pub struct RoceConfig {
    /// Path MTU: payload bytes per packet, 1024 or 4096.
    pub mtu: usize,
    /// PSNs sent and not yet acknowledged, at most.
    pub window: u32,
    /// Ask for an ACK at least every this many PSNs (and at the end of
    /// every message).
    pub ack_every: u32,
    /// Go back to the oldest unacknowledged PSN after this long without
    /// progress.
    pub retransmit_timeout: Duration,
    /// Consecutive timer expiries with no response before RETRY_EXC_ERR
    /// (0–7). (The RNR NAK timer is per QP: `QpCaps::min_rnr_timer`.)
    pub retry_cnt: u8,
    /// Socket send and receive buffer bytes.
    pub socket_buffer: usize,
}

impl Default for RoceConfig {
    fn default() -> Self {
        RoceConfig {
            mtu: 4096,
            window: 128,
            ack_every: 32,
            retransmit_timeout: Duration::from_millis(10),
            retry_cnt: 7,
            socket_buffer: 8 << 20,
        }
    }
}

impl RoceConfig {
    fn validate(&self) -> std::io::Result<()> {
        let bad = |m: String| Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, m));
        if self.mtu != 1024 && self.mtu != 4096 {
            return bad(format!("path MTU {} is not 1024 or 4096", self.mtu));
        }
        if self.window == 0 || self.window > 1 << 16 {
            return bad(format!("window {} is not in 1..=65536", self.window));
        }
        if self.ack_every == 0 {
            return bad("ack_every must be positive".into());
        }
        if self.retry_cnt > 7 {
            return bad("retry_cnt is 0..=7".into());
        }
        if self.retransmit_timeout.is_zero() {
            return bad("retransmit_timeout must be positive".into());
        }
        Ok(())
    }
}
