//! The paravirtual RNIC: an MMIO register window through which a guest
//! drives RC queue pairs on the emulated (or assigned) RNIC, with send and
//! receive rings in guest memory and guest-physical addresses in WQEs.
//!
//! All guest RAM is one implicit ODP memory region (iova = guest-physical)
//! whose translations come from the mmu, so KVM and the RNIC are both mmu
//! mirrors of the same guest memory.
//!
//! ## Registers (little endian; 32-bit unless marked 64)
//!
//! Global, at offset 0:
//!
//! | off  | name      | access | meaning |
//! |------|-----------|--------|---------|
//! | 0x00 | ID        | RO     | `0x4f445052` ("ODPR") |
//! | 0x04 | VERSION   | RO     | 1 |
//! | 0x08 | NUM_QPS   | RO     | queue-pair banks |
//! | 0x10 | LKEY      | RO     | key of the guest-RAM MR (also its rkey) |
//! | 0x18 | PEER_ADDR | RO 64  | the peer's buffer (an address in the peer's space) |
//! | 0x20 | PEER_LEN  | RO 64  | its length |
//! | 0x28 | PEER_RKEY | RO     | its rkey |
//!
//! Queue pair `q` at `0x100 * (q + 1)`:
//!
//! | off  | name       | access | meaning |
//! |------|------------|--------|---------|
//! | 0x00 | STATUS     | RO     | bit 0 enabled, bit 1 device error, bit 2 QP error, bit 3 CQ overrun |
//! | 0x04 | ERROR      | RO     | why the device stopped (`ERR_*`) |
//! | 0x08 | CTRL       | WO     | 1 reset, 2 enable |
//! | 0x10 | SQ_BASE    | RW 64  | send ring (guest-physical, 64-byte WQEs) |
//! | 0x18 | SQ_SIZE    | RW     | entries, a power of two up to 1024 |
//! | 0x20 | RQ_BASE    | RW 64  | receive ring (32-byte entries) |
//! | 0x28 | RQ_SIZE    | RW     | entries |
//! | 0x30 | SQ_PI      | WO     | send doorbell: producer index (free running) |
//! | 0x34 | RQ_PI      | WO     | receive doorbell |
//! | 0x38 | SQ_CI      | RO     | WQEs the device has taken |
//! | 0x3c | RQ_CI      | RO     | receives the device has taken |
//! | 0x40 | CQ_COUNT   | RO     | completions waiting |
//! | 0x48 | CQE_WR_ID  | RO 64  | oldest completion: wr_id |
//! | 0x50 | CQE_STATUS | RO     | its `ibv_wc_status` code |
//! | 0x54 | CQE_OPCODE | RO     | 1 write, 2 read, 3 send, 4 recv |
//! | 0x58 | CQE_LEN    | RO     | its byte count |
//! | 0x5c | CQ_POP     | WO     | drop the oldest completion |
//!
//! Send WQE (64 bytes): `wr_id:u64, opcode:u32 (1 WRITE, 2 READ, 3 SEND),
//! flags:u32 (bit 0 signaled), addr:u64, length:u32, lkey:u32,
//! remote_addr:u64, rkey:u32`. Receive entry (32 bytes): `wr_id:u64,
//! addr:u64, length:u32, lkey:u32`.
//!
//! Everything the guest writes is validated: a malformed ring, doorbell or
//! register access puts the queue pair in a device error state the guest
//! can clear with CTRL reset; a malformed WQE completes with an error;
//! keys, bounds and rights are checked by the RNIC on every access.

mod device;
pub mod fuzz;
mod peer;

pub use device::{
    GuestMemory, GuestPeer, NotGuestRam, RnicDevice, RnicDeviceError, RnicDeviceStats,
};
pub use peer::{HostPeer, PeerError, PeerWindow, READ_STAMP_MAGIC, WINDOW_UNIT};

pub const RNIC_ID: u32 = 0x4f44_5052;
pub const RNIC_VERSION: u32 = 1;

pub const REG_ID: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_NUM_QPS: u64 = 0x08;
pub const REG_LKEY: u64 = 0x10;
pub const REG_PEER_ADDR: u64 = 0x18;
pub const REG_PEER_LEN: u64 = 0x20;
pub const REG_PEER_RKEY: u64 = 0x28;

pub const QP_BANK: u64 = 0x100;
pub const QP_STATUS: u64 = 0x00;
pub const QP_ERROR: u64 = 0x04;
pub const QP_CTRL: u64 = 0x08;
pub const QP_SQ_BASE: u64 = 0x10;
pub const QP_SQ_SIZE: u64 = 0x18;
pub const QP_RQ_BASE: u64 = 0x20;
pub const QP_RQ_SIZE: u64 = 0x28;
pub const QP_SQ_PI: u64 = 0x30;
pub const QP_RQ_PI: u64 = 0x34;
pub const QP_SQ_CI: u64 = 0x38;
pub const QP_RQ_CI: u64 = 0x3c;
pub const QP_CQ_COUNT: u64 = 0x40;
pub const QP_CQE_WR_ID: u64 = 0x48;
pub const QP_CQE_STATUS: u64 = 0x50;
pub const QP_CQE_OPCODE: u64 = 0x54;
pub const QP_CQE_LEN: u64 = 0x58;
pub const QP_CQ_POP: u64 = 0x5c;

pub const CTRL_RESET: u32 = 1;
pub const CTRL_ENABLE: u32 = 2;

pub const STATUS_ENABLED: u32 = 1;
pub const STATUS_DEVICE_ERROR: u32 = 2;
pub const STATUS_QP_ERROR: u32 = 4;
/// The queue pair's completion queue overran (completions were lost); the
/// queue pair is in error too. Cleared by CTRL reset.
pub const STATUS_CQ_OVERRUN: u32 = 8;

pub const OP_WRITE: u32 = 1;
pub const OP_READ: u32 = 2;
pub const OP_SEND: u32 = 3;
pub const OP_RECV: u32 = 4;
pub const WQE_SIGNALED: u32 = 1;
pub const WQE_SIZE: u64 = 64;
pub const RQE_SIZE: u64 = 32;
pub const MAX_RING: u32 = 1024;
/// Largest message a WQE may carry.
pub const MAX_MSG: u32 = 1 << 30;

/// Why a queue pair's device state stopped (the ERROR register).
pub const ERR_NONE: u32 = 0;
/// Doorbell or enable before the rings were set up.
pub const ERR_NOT_ENABLED: u32 = 1;
/// A ring outside guest RAM, misaligned, or of a bad size.
pub const ERR_BAD_RING: u32 = 2;
/// A doorbell index more than a ring ahead of the consumer (or behind it).
pub const ERR_DOORBELL: u32 = 3;
/// A register access of the wrong width or to an unknown offset.
pub const ERR_REGISTER: u32 = 4;
/// Reading a ring entry from guest memory failed.
pub const ERR_RING_READ: u32 = 5;
