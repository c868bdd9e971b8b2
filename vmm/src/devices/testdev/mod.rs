//! The test device: how payloads talk to the VMM. One MMIO page at
//! `layout::TESTDEV_MMIO_GPA`: the payload writes arguments to `ARG`, then
//! a command to `CMD` (32-bit registers); user programs (`--payload`) also
//! print through `CONSOLE` and end with `EXIT`. Arguments and console lines
//! are per vCPU (the exit arrives on the vCPU's own thread).
//!
//! The guest SDK (`guest/include/odpvm_abi.h`) is generated from these
//! constants (test `payload::sdk::tests::checked_in_sdk_abi_is_current`).

mod console;
mod device;

pub use console::Console;
pub use device::{Barrier, Ending, Epochs, Outcome, ProgressMark, TestDevice, VcpuReport};

/// Register offsets in the MMIO page.
pub const CMD: u64 = 0x0;
pub const ARG: u64 = 0x4;
/// Read: non-zero once the host wants looping payloads to finish.
pub const STOP: u64 = 0x8;
/// Write (32-bit): end this vCPU's program with this status (0 = pass).
pub const EXIT: u64 = 0xc;
/// Write (1, 2, 4 or 8 bytes): console text; every byte written is text.
pub const CONSOLE: u64 = 0x10;
/// Read: how many host actions that make guest RAM fresh (teardowns,
/// range invalidations) have started / completed (low 32 bits). A page
/// written before a round began and read back zero, with no such action
/// started since, is a lost write.
pub const EPOCH_STARTED: u64 = 0x18;
pub const EPOCH_DONE: u64 = 0x1c;
/// Write: a progress mark (the payload did a fixed amount of work); the
/// value is the longest gap the vCPU saw between two steps since its last
/// mark, in units of 1024 TSC cycles.
pub const PROGRESS: u64 = 0x20;
/// Write: a span mark, as `PROGRESS` but for no fixed amount of work: it
/// only ends the span the next mark's gap is measured over (the host
/// reads the vCPU thread's scheduler account at every mark).
pub const PROGRESS_SPAN: u64 = 0x24;

/// Progress marks kept (oldest first; later ones are dropped until taken):
/// what a guest that posts marks nobody takes can make the VMM hold
/// (~48 MiB).
pub const MAX_MARKS: usize = 1 << 20;

/// The vCPU finished successfully; args are payload-specific results.
pub const CMD_PASS: u32 = 1;
/// The vCPU found a problem; args say what.
pub const CMD_FAIL: u32 = 2;
/// Stop until the host releases the barrier (arg: phase number).
pub const CMD_BARRIER: u32 = 3;
/// Nothing to do: sleep briefly.
pub const CMD_IDLE: u32 = 4;
/// Record one latency sample (arg: cycles).
pub const CMD_SAMPLE: u32 = 5;
/// Wait until every vCPU still running has arrived here too; the last
/// one to arrive, or the end of the last one missing, releases them all
/// (arg: phase number; test `sync_releases_when_every_running_vcpu_is_there`).
pub const CMD_SYNC: u32 = 6;
/// Drop this vCPU's pending arguments.
pub const CMD_CLEAR: u32 = 7;
/// The vCPU took an exception (sent by the exception handlers of user
/// programs); args: `CRASH_ARGS`. Ends the vCPU.
pub const CMD_CRASH: u32 = 8;
/// A crash report's arguments: vector, error code, rip (low, high),
/// faulting address (cr2; low, high), code segment selector.
pub const CRASH_ARGS: usize = 7;

/// Samples kept per vCPU.
pub const MAX_SAMPLES: usize = 1 << 20;

/// Arguments a payload may push before one command (more is an error).
pub const MAX_ARGS: usize = 16;
