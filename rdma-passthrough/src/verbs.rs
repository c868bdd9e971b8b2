//! The verbs-shaped vocabulary both RNICs share: access flags, work
//! requests, work completions and their standard status codes.

use std::fmt;

/// `ibv_access_flags`, the subset that matters here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Access(pub u32);

impl Access {
    pub const LOCAL_WRITE: Access = Access(1 << 0);
    pub const REMOTE_WRITE: Access = Access(1 << 1);
    pub const REMOTE_READ: Access = Access(1 << 2);
    /// On-demand paging: no pinning; pages are mapped on device faults and
    /// dropped on invalidation.
    pub const ON_DEMAND: Access = Access(1 << 6);
    pub const ALL_REMOTE: Access =
        Access(Self::LOCAL_WRITE.0 | Self::REMOTE_WRITE.0 | Self::REMOTE_READ.0);

    pub fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, o: Access) -> Access {
        Access(self.0 | o.0)
    }
}

/// `ibv_wc_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WcStatus {
    Success,
    /// Local length error (a receive buffer too small).
    LocLenErr,
    /// Local QP operation error.
    LocQpOpErr,
    /// Local protection error: bad lkey, wrong PD, missing access right,
    /// address outside the MR, or a fenced MR.
    LocProtErr,
    /// Flushed: the QP was in the error state.
    WrFlushErr,
    /// The responder saw an invalid request (its receive was too short).
    RemInvReqErr,
    /// Remote access error: bad rkey, wrong PD, missing remote right,
    /// address outside the remote MR, or a fenced remote MR.
    RemAccessErr,
    /// Remote operation error.
    RemOpErr,
    /// Transport retries exhausted (no connected peer).
    RetryExcErr,
    /// Receiver-not-ready retries exhausted (no receive posted).
    RnrRetryExcErr,
    GeneralErr,
}

impl WcStatus {
    /// perftest/libibverbs spelling (`ibv_wc_status_str`).
    pub fn as_str(self) -> &'static str {
        match self {
            WcStatus::Success => "success",
            WcStatus::LocLenErr => "local length error",
            WcStatus::LocQpOpErr => "local QP operation error",
            WcStatus::LocProtErr => "local protection error",
            WcStatus::WrFlushErr => "Work Request Flushed Error",
            WcStatus::RemInvReqErr => "remote invalid request error",
            WcStatus::RemAccessErr => "remote access error",
            WcStatus::RemOpErr => "remote operation error",
            WcStatus::RetryExcErr => "transport retry counter exceeded",
            WcStatus::RnrRetryExcErr => "RNR retry counter exceeded",
            WcStatus::GeneralErr => "general error",
        }
    }

    /// The numeric code of `enum ibv_wc_status`.
    pub fn code(self) -> u32 {
        match self {
            WcStatus::Success => 0,
            WcStatus::LocLenErr => 1,
            WcStatus::LocQpOpErr => 2,
            WcStatus::LocProtErr => 4,
            WcStatus::WrFlushErr => 5,
            WcStatus::RemInvReqErr => 9,
            WcStatus::RemAccessErr => 10,
            WcStatus::RemOpErr => 11,
            WcStatus::RetryExcErr => 12,
            WcStatus::RnrRetryExcErr => 13,
            WcStatus::GeneralErr => 21,
        }
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scatter/gather element: `length` bytes at `addr` in the MR `lkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Send,
    RdmaWrite { remote_addr: u64, rkey: u32 },
    RdmaRead { remote_addr: u64, rkey: u32 },
}

/// `ibv_send_wr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendWr {
    pub wr_id: u64,
    pub opcode: Opcode,
    pub sges: Vec<Sge>,
    /// Produce a completion on success (errors always complete).
    pub signaled: bool,
}

/// `ibv_recv_wr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvWr {
    pub wr_id: u64,
    pub sges: Vec<Sge>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcOpcode {
    Send,
    RdmaWrite,
    RdmaRead,
    Recv,
}

/// `ibv_wc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wc {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    pub byte_len: u32,
    pub qp_num: u32,
}

/// `ibv_advise_mr_advice`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// Map the pages for reading.
    Prefetch,
    /// Map the pages writable.
    PrefetchWrite,
    /// Map only pages already present; never fault.
    PrefetchNoFault,
}

/// `IB_UVERBS_ADVISE_MR_FLAG_FLUSH`: return only once the pages are mapped.
pub const ADVISE_FLAG_FLUSH: u32 = 1;

/// Queue pair limits and retry counts (`ibv_qp_cap` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    pub max_send_wr: usize,
    pub max_recv_wr: usize,
    pub max_sge: usize,
    /// Receiver-not-ready retries before RNR_RETRY_EXC_ERR (7 = forever,
    /// as in IB).
    pub rnr_retry: u8,
    /// As a responder: the IBTA-encoded RNR timer this QP's "receiver not
    /// ready" NAKs carry (`min_rnr_timer`, see [`rnr_timer`]); the requester
    /// waits that long before it retries.
    pub min_rnr_timer: u8,
}

impl Default for QpCaps {
    fn default() -> Self {
        QpCaps {
            max_send_wr: 256,
            max_recv_wr: 256,
            max_sge: 16,
            rnr_retry: 7,
            min_rnr_timer: 12,
        }
    }
}

/// The RNR NAK timer of IBTA table 45 (`ibv_qp_attr::min_rnr_timer`): a
/// 5-bit code for how long a requester waits before retrying a SEND the
/// responder had no receive for. Code 0 is the longest (655.36 ms); codes
/// above 31 are read modulo 32, as the field is 5 bits wide.
pub fn rnr_timer(code: u8) -> std::time::Duration {
    /// In units of 10 µs, by code.
    const TENS_OF_US: [u64; 32] = [
        65536, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
        1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152,
    ];
    std::time::Duration::from_micros(10 * TENS_OF_US[usize::from(code & 31)])
}

/// Errors returned synchronously by verbs calls (`errno`-like).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerbsError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("queue full")]
    QueueFull,
    #[error("no such {what} {id:#x}")]
    NotFound { what: &'static str, id: u32 },
    #[error("resource limit: {0}")]
    Limit(String),
    #[error("memory: {0}")]
    Memory(String),
    #[error("the device is shut down")]
    Shutdown,
    #[error("{0}")]
    Unsupported(String),
}
