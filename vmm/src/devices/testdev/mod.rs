//! The test device: how built-in payloads talk to the VMM. One MMIO page
//! at `layout::TESTDEV_MMIO_GPA` with two 32-bit registers: the payload
//! writes arguments to `ARG`, then a command to `CMD`. Arguments are per
//! vCPU (the exit arrives on the vCPU's own thread).

mod device;

pub use device::{Barrier, Outcome, TestDevice, VcpuReport};

/// Register offsets in the MMIO page.
pub const CMD: u64 = 0x0;
pub const ARG: u64 = 0x4;
/// Read: non-zero once the host wants looping payloads to finish.
pub const STOP: u64 = 0x8;

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
