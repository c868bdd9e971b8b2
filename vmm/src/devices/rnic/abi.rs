//! The paravirtual RNIC's guest ABI, defined once: register offsets, their
//! values, and the layouts of the send WQE and the receive entry in guest
//! memory. The device decodes rings with these types (`read_obj`), the
//! built-in payloads assemble their stores with `offset_of!` on them, and
//! the guest SDK's files (`guest/include/odpvm_abi.h`,
//! `guest/rust/src/abi.rs`) are generated from them by `payload::sdk`
//! (test `payload::sdk::tests::checked_in_sdk_abi_is_current`).
//!
//! Everything is little endian. The layouts are checked at compile time
//! below, so a field moved here moves everywhere or the build fails.
//!
//! This file depends on `core` only: the vm-memory `ByteValued` impls live
//! in the module that re-exports it.

use core::mem::{offset_of, size_of};

/// The ID register's value: "ODPR".
pub const RNIC_ID: u32 = 0x4f44_5052;
pub const RNIC_VERSION: u32 = 1;

// Global registers, at offset 0 of the window (RO).
pub const REG_ID: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_NUM_QPS: u64 = 0x08;
/// Key of the guest-RAM MR (also its rkey).
pub const REG_LKEY: u64 = 0x10;
/// The peer's buffer (64-bit, an address in the peer's space), its length
/// (64-bit) and its rkey.
pub const REG_PEER_ADDR: u64 = 0x18;
pub const REG_PEER_LEN: u64 = 0x20;
pub const REG_PEER_RKEY: u64 = 0x28;

/// Queue pair `q`'s registers start at `QP_BANK * (q + 1)`.
pub const QP_BANK: u64 = 0x100;
/// RO: `STATUS_*` bits.
pub const QP_STATUS: u64 = 0x00;
/// RO: why the device stopped the queue pair (`ERR_*`).
pub const QP_ERROR: u64 = 0x04;
/// WO: `CTRL_RESET` or `CTRL_ENABLE`.
pub const QP_CTRL: u64 = 0x08;
/// RW 64: send ring (guest-physical, `WQE_SIZE` entries).
pub const QP_SQ_BASE: u64 = 0x10;
/// RW: send ring entries, a power of two up to `MAX_RING`.
pub const QP_SQ_SIZE: u64 = 0x18;
/// RW 64: receive ring (`RQE_SIZE` entries).
pub const QP_RQ_BASE: u64 = 0x20;
pub const QP_RQ_SIZE: u64 = 0x28;
/// WO: send doorbell, the producer index (free running).
pub const QP_SQ_PI: u64 = 0x30;
/// WO: receive doorbell.
pub const QP_RQ_PI: u64 = 0x34;
/// RO: WQEs / receives the device has taken.
pub const QP_SQ_CI: u64 = 0x38;
pub const QP_RQ_CI: u64 = 0x3c;
/// RO: completions waiting.
pub const QP_CQ_COUNT: u64 = 0x40;
/// RO 64: the oldest completion's wr_id; then its `ibv_wc_status` code,
/// its `OP_*` and its byte count (32-bit each).
pub const QP_CQE_WR_ID: u64 = 0x48;
pub const QP_CQE_STATUS: u64 = 0x50;
pub const QP_CQE_OPCODE: u64 = 0x54;
pub const QP_CQE_LEN: u64 = 0x58;
/// WO: drop the oldest completion.
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
/// Completions only.
pub const OP_RECV: u32 = 4;
/// `SendWqe::flags`: ask for a completion.
pub const WQE_SIGNALED: u32 = 1;
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
/// Enable of a queue pair whose RoCE connection is gone: it went into the
/// error state (retries exhausted, a NAK, the peer's QP gone) and a reset
/// dropped it. RoCE queue pairs are not re-connected; the VM must be
/// restarted with a new exchange.
pub const ERR_ROCE_GONE: u32 = 6;

/// One send-ring entry. `addr` is guest-physical; `remote_addr` is an
/// address in the peer's space (`REG_PEER_ADDR`); `rkey` the peer's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendWqe {
    pub wr_id: u64,
    /// `OP_WRITE`, `OP_READ` or `OP_SEND`.
    pub opcode: u32,
    /// `WQE_SIGNALED` or 0.
    pub flags: u32,
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
    pub remote_addr: u64,
    pub rkey: u32,
    /// Ignored by the device; keeps the entry 64 bytes with no padding.
    pub reserved: [u32; 5],
}

/// One receive-ring entry: where a SEND from the peer lands.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvEntry {
    pub wr_id: u64,
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
    /// Ignored by the device.
    pub reserved: u64,
}

pub const WQE_SIZE: u64 = size_of::<SendWqe>() as u64;
pub const RQE_SIZE: u64 = size_of::<RecvEntry>() as u64;

// The wire layout, checked by the compiler (the guest SDK header repeats
// these as C `_Static_assert`s).
const _: () = assert!(size_of::<SendWqe>() == 64);
const _: () = assert!(offset_of!(SendWqe, wr_id) == 0);
const _: () = assert!(offset_of!(SendWqe, opcode) == 8);
const _: () = assert!(offset_of!(SendWqe, flags) == 12);
const _: () = assert!(offset_of!(SendWqe, addr) == 16);
const _: () = assert!(offset_of!(SendWqe, length) == 24);
const _: () = assert!(offset_of!(SendWqe, lkey) == 28);
const _: () = assert!(offset_of!(SendWqe, remote_addr) == 32);
const _: () = assert!(offset_of!(SendWqe, rkey) == 40);
const _: () = assert!(offset_of!(SendWqe, reserved) == 44);
const _: () = assert!(size_of::<RecvEntry>() == 32);
const _: () = assert!(offset_of!(RecvEntry, wr_id) == 0);
const _: () = assert!(offset_of!(RecvEntry, addr) == 8);
const _: () = assert!(offset_of!(RecvEntry, length) == 16);
const _: () = assert!(offset_of!(RecvEntry, lkey) == 20);
const _: () = assert!(offset_of!(RecvEntry, reserved) == 24);
// Rings are arrays of entries: each must be naturally aligned.
const _: () = assert!(WQE_SIZE.is_power_of_two() && RQE_SIZE.is_power_of_two());
// Every queue-pair register fits in its bank.
const _: () = assert!(QP_CQ_POP + 4 <= QP_BANK && REG_PEER_RKEY + 4 <= QP_BANK);
