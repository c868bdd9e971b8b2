//! The paravirtual RNIC: an MMIO register window through which a guest
//! drives RC queue pairs on the emulated (or assigned) RNIC, with send and
//! receive rings in guest memory and guest-physical addresses in WQEs.
//!
//! All guest RAM is one ODP memory region (iova = guest-physical) whose
//! translations come from the mmu, so KVM and the RNIC are both mmu
//! mirrors of the same guest memory. For built-in and user programs it
//! starts at the end of the VMM's boot region: ring 3 must not reach page
//! tables, the IDT or the parameters by DMA any more than by loads and
//! stores, and rings there are refused (test:
//! `guest_sdk::the_rnic_cannot_reach_the_vmms_boot_region`). A Linux guest
//! owns all its RAM: the MR is implicit over the whole space.
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
//! addr:u64, length:u32, lkey:u32`. These tables are documentation; the
//! definitions (and their compile-time layout checks) are in [`abi`].
//!
//! Everything the guest writes is validated: a malformed ring, doorbell or
//! register access puts the queue pair in a device error state the guest
//! can clear with CTRL reset; a malformed WQE completes with an error;
//! keys, bounds and rights are checked by the RNIC on every access.
//!
//! Completions: a queue pair's completion queue holds 20 480 completions
//! (16 384 in the RNIC's CQ, 4 096 buffered behind the CQE registers). One
//! more without CQ_POP is an overrun, as in verbs a CQ error: STATUS shows
//! CQ overrun and QP error, later WQEs are flushed, CTRL reset clears it.
//! Unsignaled WQEs need no completion; the device retires them in order.
//! PEER_ADDR/PEER_LEN/PEER_RKEY describe this guest's own window of the
//! peer, and the rkey reaches nothing outside it.

pub mod abi;
mod device;
pub mod fuzz;
mod peer;
pub mod roce;

pub use abi::*;
pub use device::{
    GuestMemory, GuestPeer, NotGuestRam, RnicDevice, RnicDeviceError, RnicDeviceStats,
};
pub use peer::{HostPeer, PeerError, PeerWindow, READ_STAMP_MAGIC, WINDOW_UNIT};

// SAFETY: `SendWqe` is `repr(C)`, made of integers only, with no padding
// (its size is the sum of its fields', asserted in `abi`): every byte
// pattern is a valid value.
unsafe impl vm_memory::ByteValued for SendWqe {}
// SAFETY: as above: `repr(C)` integers, no padding (asserted in `abi`).
unsafe impl vm_memory::ByteValued for RecvEntry {}
