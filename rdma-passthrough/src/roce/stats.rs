//! Counters of a RoCE port: what went out, what came in, what was dropped
//! and why.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Default, Debug)]
        pub(crate) struct RoceStats {
            $(pub(crate) $name: AtomicU64,)*
        }

        /// A copy of a port's counters.
        #[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
        pub struct RoceStatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl RoceStatsSnapshot {
            /// Every counter with its name, so reports list them all (a
            /// counter left out of a report hides the drops it counts).
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }

        impl RoceStats {
            pub(crate) fn snapshot(&self) -> RoceStatsSnapshot {
                RoceStatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Datagrams sent.
    tx_packets,
    /// Datagrams received.
    rx_packets,
    /// Payload bytes sent (requests and read responses, retransmissions too).
    tx_payload_bytes,
    /// Request packets sent again (go-back-N).
    retransmits,
    /// Retransmit timer expiries.
    timeouts,
    /// ACKs sent by the responder.
    acks_sent,
    /// PSN-sequence-error NAKs sent / received.
    seq_naks_sent,
    seq_naks_received,
    /// RNR NAKs sent / received.
    rnr_naks_sent,
    rnr_naks_received,
    /// Remote-access-error NAKs sent (bad rkey, bounds, rights).
    access_naks_sent,
    /// Invalid-request NAKs sent (bad opcode sequence, lengths).
    invalid_naks_sent,
    /// Remote-operational-error NAKs sent.
    op_naks_sent,
    /// Error NAKs (access, invalid, operational) received.
    error_naks_received,
    /// Duplicate requests (re-ACKed) and READs replayed.
    duplicates,
    read_replays,
    /// Dropped: datagram not a packet we speak (truncated, opcode, pad).
    malformed,
    /// Dropped: ICRC did not verify.
    bad_icrc,
    /// Dropped: no connected QP with that number.
    unknown_qpn,
    /// Dropped: from an address other than the QP's peer.
    wrong_source,
    /// Dropped: PSN far outside the window.
    out_of_window,
    /// Dropped: an ACK or response that matches nothing outstanding.
    unexpected_responses,
    /// Sends the socket refused: no buffer (retried or recovered by
    /// retransmission) or an error such as a datagram over the path's MTU.
    send_would_block,
    /// Work requests completed successfully / with an error.
    wqes_completed,
    wqe_errors,
    /// Receives completed.
    recvs_completed,
}
