//! The test device: how built-in payloads talk to the VMM. One MMIO page
//! at `layout::TESTDEV_MMIO_GPA` with two 32-bit registers: the payload
//! writes arguments to `ARG`, then a command to `CMD`. Arguments are per
//! vCPU (the exit arrives on the vCPU's own thread).

mod device;

pub use device::{Barrier, Epochs, Outcome, ProgressMark, TestDevice, VcpuReport};

/// Register offsets in the MMIO page.
pub const CMD: u64 = 0x0;
pub const ARG: u64 = 0x4;
/// Read: non-zero once the host wants looping payloads to finish.
pub const STOP: u64 = 0x8;
/// Read: how many host actions that make guest RAM fresh (teardowns,
/// range invalidations) have started / completed (low 32 bits). A page
/// written before a round began and read back zero, with no such action
/// started since, is a lost write.
pub const EPOCH_STARTED: u64 = 0xc;
pub const EPOCH_DONE: u64 = 0x10;
/// Write: a progress mark (the payload did a fixed amount of work); the
/// value is the longest gap the vCPU saw between two steps since its last
/// mark, in units of 1024 TSC cycles.
pub const PROGRESS: u64 = 0x14;

/// Progress marks kept (oldest first; later ones are dropped until taken).
pub const MAX_MARKS: usize = 1 << 22;

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

/// Samples kept per vCPU.
pub const MAX_SAMPLES: usize = 1 << 20;

/// Arguments a payload may push before one command (more is an error).
pub const MAX_ARGS: usize = 16;
