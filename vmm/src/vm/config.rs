//! What a VM is made of (`VmConfig`: memory, vCPUs, guest, RNIC, tracking)
//! and its validation, done before anything is built so bad flags give one
//! clear error (`vmm/tests/cli.rs` checks the messages).

use super::Error;
use crate::devices::rnic::HostPeer;
use crate::devices::serial::Sink;
use crate::fault::Tracking;
use crate::layout::*;
use crate::memory::Backing;
use crate::payload::Guest;
use mmu::LockPolicy;
use std::path::PathBuf;
use std::sync::Arc;

/// Which RNIC the VM gets.
#[derive(Clone, Default)]
pub enum RnicChoice {
    None,
    /// A new emulated RNIC with its own host peer.
    #[default]
    Emulated,
    /// An emulated RNIC (and host peer) shared with other VMs.
    Shared(Arc<rdma_passthrough::EmulatedRnic>, Arc<HostPeer>),
    /// A real device by ibverbs name: guest RAM becomes one ODP MR on it.
    Assigned(String),
}

impl std::fmt::Debug for RnicChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RnicChoice::None => f.write_str("none"),
            RnicChoice::Emulated => f.write_str("emulated"),
            RnicChoice::Shared(nic, _) => write!(f, "shared:{}", nic.name()),
            RnicChoice::Assigned(d) => write!(f, "assigned:{d}"),
        }
    }
}

impl std::str::FromStr for RnicChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(RnicChoice::None),
            "emulated" => Ok(RnicChoice::Emulated),
            _ => match s.strip_prefix("assigned:") {
                Some(dev) if !dev.is_empty() => Ok(RnicChoice::Assigned(dev.into())),
                _ => Err(format!(
                    "unknown --rnic {s:?} (emulated, none, or assigned:<ibdev> such as assigned:mlx5_0)"
                )),
            },
        }
    }
}

/// Default largest fault-around window (pages): 256 KiB, grown to only by
/// sequential access.
pub const DEFAULT_FAULT_AROUND: u64 = 64;

/// Host peer buffer for a VM's own emulated RNIC.
pub const PEER_BUFFER: u64 = 64 << 20;

/// What runs in the VM.
#[derive(Clone, Debug)]
pub enum GuestConfig {
    Builtin(Guest),
    /// A user's static x86-64 ELF (`--payload`), run in ring 3 on every
    /// vCPU with these `--payload-arg`s (`payload::user`).
    Program {
        path: PathBuf,
        args: Vec<u64>,
    },
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

#[derive(Clone)]
pub struct VmConfig {
    pub memory: u64,
    pub vcpus: usize,
    pub guest: GuestConfig,
    pub backing: Backing,
    pub lock: LockPolicy,
    /// Payload pattern seed.
    pub seed: u64,
    /// Passes for looping payloads.
    pub rounds: u64,
    /// Pages payloads work on (default: all of RAM).
    pub work_pages: Option<u64>,
    /// Guest console output.
    pub console: Sink,
    /// How faults are resolved (anything but `Mmu` is a benchmark baseline).
    pub tracking: Tracking,
    pub rnic: RnicChoice,
    /// RDMA workloads: message size and messages (0: until stopped).
    pub msg: u64,
    pub iters: u64,
    /// Largest fault-around window in 4 KiB pages (0: off).
    pub fault_around: u64,
    /// Each vCPU on a CPU of its own, the VMM's other threads on the CPUs
    /// left over (`affinity.rs`).
    pub pin_vcpus: bool,
    /// With `pin_vcpus`: where the threads a lone vCPU waits on run.
    pub helpers: crate::affinity::Helpers,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory: 256 << 20,
            vcpus: 2,
            guest: GuestConfig::Builtin(Guest::Touch),
            backing: Backing::Anonymous,
            lock: LockPolicy::Spin,
            seed: 0x5eed,
            rounds: 1,
            work_pages: None,
            console: Sink::Stdout,
            tracking: Tracking::Mmu,
            rnic: RnicChoice::Emulated,
            msg: 64 << 10,
            iters: 5000,
            fault_around: DEFAULT_FAULT_AROUND,
            pin_vcpus: false,
            helpers: Default::default(),
        }
    }
}

impl VmConfig {
    pub(super) fn validate(&self, max_vcpus: usize) -> Result<(), Error> {
        let max = max_vcpus.min(MAX_VCPUS);
        if self.vcpus == 0 || self.vcpus > max {
            return Err(Error::Config(format!(
                "--vcpus {} is out of range: this host allows 1 to {max}",
                self.vcpus
            )));
        }
        if self.memory < HUGE || !self.memory.is_multiple_of(HUGE) {
            return Err(Error::Config(format!(
                "--memory {} bytes ({:.2} MiB) must be a positive multiple of 2 MiB",
                self.memory,
                self.memory as f64 / (1 << 20) as f64
            )));
        }
        if let GuestConfig::Builtin(_) = self.guest {
            if self.memory > MAX_PAYLOAD_RAM - GIB {
                return Err(Error::Config(format!(
                    "built-in payloads support at most {} GiB of memory",
                    MAX_PAYLOAD_RAM / GIB - 1
                )));
            }
            if let GuestConfig::Builtin(g) = self.guest {
                if g.is_rdma() {
                    let msg = self.msg;
                    if !(PAGE..=(512 << 10)).contains(&msg) || !msg.is_multiple_of(PAGE) {
                        return Err(Error::Config(format!(
                            "--msg {msg}: RDMA workloads take 4K to 512K in whole pages"
                        )));
                    }
                    if self.vcpus > 8
                        || self.memory < self.vcpus as u64 * crate::payload::rdma::REGION
                    {
                        return Err(Error::Config(format!(
                            "RDMA workloads need at most 8 vCPUs and 16 MiB of RAM per vCPU ({} MiB here)",
                            self.memory >> 20
                        )));
                    }
                    if matches!(self.rnic, RnicChoice::None | RnicChoice::Assigned(_)) {
                        return Err(Error::Config(
                            "RDMA workloads drive the emulated RNIC's paravirtual device: use --rnic emulated"
                                .into(),
                        ));
                    }
                }
            }
            if let Some(w) = self.work_pages {
                if w > self.memory / PAGE {
                    return Err(Error::Config(format!(
                        "--pages {w} is more than the {} pages of RAM",
                        self.memory / PAGE
                    )));
                }
            }
        }
        Ok(())
    }
}
