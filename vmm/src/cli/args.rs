//! The command line's grammar: subcommands, their flags and parsers
//! (`clap`), and `--guest`'s help. What each subcommand does is in the
//! parent module.

use super::*;
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "odpvm",
    version,
    about = "A microVM whose guest memory is tracked by a userspace secondary MMU and mirrored into RDMA ODP memory regions"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of `RunArgs` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a microVM and run a built-in guest, your own program (--payload) or a Linux kernel.
    Run(Box<RunArgs>),
    /// Send one request to a running VM's control socket.
    Ctl(CtlArgs),
    /// Benchmarks (one JSON object per line with --json).
    Bench(BenchArgs),
    /// The main demo: guest RDMA through one ODP MR over all guest RAM while the host
    /// invalidates and tears down guest memory; zero stale accesses.
    Demo(DemoCli),
}

#[derive(Args, Debug)]
pub struct DemoCli {
    /// How long the workload runs, in seconds.
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub seconds: Duration,
    /// Guest RAM (K/M/G suffixes; a multiple of 2 MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// vCPUs, each running the RDMA WRITE workload on its own queue pair.
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// RDMA message size.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub msg: u64,
    /// Mean gap between random range invalidations, in milliseconds.
    #[arg(long, default_value = "2", value_parser = millis)]
    pub invalidate_ms: Duration,
    /// Gap between whole-VM teardowns, in milliseconds.
    #[arg(long, default_value = "500", value_parser = millis)]
    pub teardown_ms: Duration,
    /// Print the final report as one JSON object (the last stdout line).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchKind,
}

#[derive(Subcommand, Debug)]
pub enum BenchKind {
    /// Guest first-touch fault cost: mmu-tracked vs raw userfaultfd vs no
    /// userfaultfd; start-up time and VMM RSS.
    Faults {
        /// Guest RAM the touch payload covers.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        memory: u64,
        /// Guest RAM for the fault-around rows.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        fault_around_memory: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// Repetitions per mode (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long)]
        json: bool,
    },
    /// Emulated RNIC: write bandwidth vs memcpy, invalidation round trip,
    /// KVM + RNIC fan-out, ODP vs re-registration vs bounce copies.
    Rnic {
        /// Bytes per bandwidth measurement.
        #[arg(long, default_value = "2G", value_parser = parse_size)]
        total: u64,
        /// Memory budget of the ODP comparison (working set = 4x).
        #[arg(long, default_value = "16M", value_parser = parse_size)]
        budget: u64,
        /// Message size.
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        msg: u64,
        #[arg(long)]
        json: bool,
    },
    /// Whole-VM teardown against memory size, as a running guest feels it:
    /// guest stall, completion and each mirror's share, release time,
    /// guest progress; methods generation / invalidate-all / walk, mirrors
    /// kvm / rnic / kvm+rnic. Progress on stderr.
    Teardown {
        /// Guest RAM sizes, comma-separated (all of it written by the
        /// running guest before each measurement).
        #[arg(long, default_value = "256M,1G,4G,16G", value_delimiter = ',', value_parser = parse_size)]
        memory: Vec<u64>,
        /// Methods: generation, invalidate-all, walk.
        #[arg(
            long,
            default_value = "generation,invalidate-all,walk",
            value_delimiter = ','
        )]
        methods: Vec<crate::bench::teardown::Method>,
        /// Mirror sets: kvm, rnic, kvm+rnic.
        #[arg(long, default_value = "kvm,rnic,kvm+rnic", value_delimiter = ',')]
        mirrors: Vec<crate::bench::teardown::Mirrors>,
        /// Repetitions per row (p50/p99 over them; at least 5).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Busy vCPUs in the guest. The default leaves the VMM a CPU of its
        /// own on any host with two or more, as a production host reserves
        /// CPUs for the VMM's threads (libvirt's emulatorpin); `--vcpus N
        /// --pin-vcpus false`, N the host's CPUs, measures a host with none
        /// to spare.
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// Pin each vCPU to a CPU of its own and the VMM's threads to the
        /// CPUs left over (see `odpvm run --help`); `--pin-vcpus false`
        /// lets the scheduler place them.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set,
              num_args = 0..=1, default_missing_value = "true")]
        pin_vcpus: bool,
        /// Where the threads a lone pinned vCPU waits on run: beside-vcpu
        /// or housekeeping (see `odpvm run --help`). [default: beside-vcpu]
        #[arg(long)]
        helpers: Option<crate::affinity::Helpers>,
        /// Also draw stall and completion against memory (log-log SVG).
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// First empty KVM's shadow tables through a throwaway memslot,
        /// vCPUs running (off in the product: measured slower with a busy
        /// guest, which rebuilds them meanwhile).
        #[arg(long)]
        prezap: bool,
        /// What backs guest RAM: anonymous (moved out in place) or memfd
        /// (vCPUs paused while memslots move).
        #[arg(long, default_value = "anonymous")]
        backing: Backing,
        #[arg(long)]
        json: bool,
    },
    /// Guest RDMA WRITE/READ and stamped SEND/RECV (guest to guest)
    /// between two odpvm processes over RoCEv2 in two network namespaces,
    /// at 0 % and 1 % real (nftables) loss, beside a plain UDP socket pair
    /// on the same path. Needs root.
    Roce {
        /// Messages per 64 KiB row (4 KiB rows send 8x as many, SEND rows
        /// a quarter, at least 200).
        #[arg(long, default_value_t = 3000)]
        iters: u64,
        /// Loss percentages (comma separated).
        #[arg(long, value_delimiter = ',', default_value = "0,1")]
        loss: Vec<u32>,
        /// Invalidate and tear down the responder's memory during traffic.
        #[arg(long)]
        churn: bool,
        #[arg(long)]
        json: bool,
    },
}

/// A size with an optional K/M/G/T suffix (powers of two).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 256M, 4G, 1048576)"))?;
    let shift = match t[digits..].to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => {
            return Err(format!(
                "{s:?}: unknown size suffix {other:?} (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Guest RAM (K/M/G suffixes; a multiple of 2M).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// What backs guest RAM: anonymous, memfd or hugetlbfs.
    #[arg(long, default_value = "anonymous")]
    pub backing: Backing,
    /// The mmu lock: spin or mutex.
    #[arg(long, default_value = "spin")]
    pub lock: LockPolicy,
    /// Each vCPU on a CPU of its own, the VMM's other threads (faults,
    /// teardowns, devices) on the CPUs left over (libvirt's vcpupin and
    /// emulatorpin in one switch). A lone vCPU's fault thread and a
    /// teardown's page moves run on its own CPU instead (`--helpers`).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub pin_vcpus: bool,
    /// With `--pin-vcpus` and one vCPU, where the threads it waits on run
    /// (the fault thread, a teardown's page moves): beside-vcpu, on its
    /// own CPU, so that CPU seldom idles for the host's work while the vCPU
    /// waits; housekeeping, with the VMM's other threads, where device
    /// faults and moves cost the vCPU nothing but it waits on them with
    /// its CPU idle. [default: beside-vcpu]
    #[arg(long)]
    pub helpers: Option<crate::affinity::Helpers>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    #[arg(long, conflicts_with_all = ["kernel", "payload"], help = guest_help())]
    pub guest: Option<Guest>,
    /// Your own guest program: a static x86-64 ELF run in ring 3 on every
    /// vCPU (see guest/ and README "Write your own guest").
    #[arg(long, conflicts_with = "kernel")]
    pub payload: Option<PathBuf>,
    /// A value for --payload (repeatable; decimal or 0x-hex), passed in the
    /// parameter block `rdx` points to.
    #[arg(long, requires = "payload", value_parser = api::parse_u64)]
    pub payload_arg: Vec<u64>,
    /// A Linux bzImage to boot instead of a built-in guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initrd for --kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel (default: the serial console,
    /// no reboot).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Pages a built-in guest works on (default: all of RAM).
    #[arg(long)]
    pub pages: Option<u64>,
    /// Passes for looping guests (churn).
    #[arg(long, default_value_t = 1)]
    pub rounds: u64,
    /// Pattern seed for built-in guests.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// The RNIC: emulated (default), none, or assigned:<ibdev>.
    #[arg(long, default_value = "emulated")]
    pub rnic: crate::vm::RnicChoice,
    /// RDMA workloads: message size (at most 512K).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub msg: u64,
    /// RDMA workloads: messages (iterations) per vCPU.
    #[arg(long, default_value_t = 5000)]
    pub iters: u64,
    /// Largest fault-around window in 4 KiB pages (0: off, at most 512). The
    /// window grows on sequential faults and shrinks to one page otherwise.
    #[arg(long, default_value_t = crate::vm::DEFAULT_FAULT_AROUND)]
    pub fault_around: u64,
    /// Serve the control socket at this path (created 0600; only the
    /// VMM's uid and root may use it).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Close control connections idle for this many seconds.
    #[arg(long, default_value = "60", value_parser = seconds)]
    pub api_idle_timeout: Duration,
    /// Stop the VM after this many seconds.
    #[arg(long, value_parser = seconds)]
    pub timeout: Option<Duration>,
    /// Print the final report as one JSON object (the last stdout line).
    #[arg(long)]
    pub json: bool,
    /// RoCEv2: the RNIC's port at IP[:PORT] (UDP, 4791 by default); guest
    /// queue pairs then reach another odpvm (see --roce-listen/--roce-connect).
    #[arg(long, value_parser = crate::roce_run::parse_bind)]
    pub roce_bind: Option<std::net::SocketAddrV4>,
    /// RoCEv2: wait for the peer's out-of-band exchange on ADDR:PORT (TCP).
    #[arg(long, requires = "roce_bind", conflicts_with = "roce_connect")]
    pub roce_listen: Option<std::net::SocketAddr>,
    /// RoCEv2: exchange with a peer listening on ADDR:PORT (TCP).
    #[arg(long, requires = "roce_bind")]
    pub roce_connect: Option<std::net::SocketAddr>,
    /// RoCEv2 path MTU: 1024 or 4096.
    #[arg(long, default_value_t = 4096)]
    pub roce_mtu: usize,
    /// RoCEv2 diagnostic: the host answers each SEND from the peer with the
    /// same bytes on the guest's queue pairs (with `--guest idle`, for the
    /// peer's `send-lat`). Guest-to-guest SEND/RECV is `recv-pong`.
    #[arg(long, requires = "roce_bind")]
    pub roce_echo: bool,
}

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The VM's control socket.
    #[arg(long)]
    pub api_sock: PathBuf,
    /// Give up waiting for the answer after this many seconds.
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub request: CtlRequest,
}

#[derive(Subcommand, Debug)]
pub enum CtlRequest {
    /// Counters of the running VM.
    Stats,
    /// Invalidate a guest-physical range (page aligned; decimal or 0x-hex).
    Invalidate {
        #[arg(value_parser = api::parse_u64)]
        gpa: u64,
        #[arg(value_parser = api::parse_u64)]
        len: u64,
    },
    /// O(1) teardown of every translation.
    Teardown,
    /// Hold every vCPU outside the guest.
    Pause,
    /// Undo pause; release vCPUs waiting at a payload barrier.
    Resume,
    /// Stop the VM.
    Shutdown,
    /// Send a raw JSON request.
    Send { json: String },
}

/// `--guest`'s help, from the list of built-in guests.
pub(super) fn guest_help() -> String {
    let names: Vec<&str> = Guest::ALL.iter().map(|g| g.name()).collect();
    format!("Built-in guest: {}", names.join(", "))
}
