//! The `odpvm` command line.
//!
//! Exit codes: 0 success; 1 the guest or the check failed (or the VM
//! stopped on an error); 2 an error before or around the run (a bad command
//! line, the VMM could not start, stdout closed) with one line on stderr;
//! 128 + the signal number (130 SIGINT, 143 SIGTERM) when a signal stopped
//! the VM, whatever the guest did (`a_signal_gives_a_fixed_exit_code`).

mod duration;
pub(crate) mod output;

pub use duration::{millis, seconds, DurationError};
pub use output::{line as print_line, text_to_stdout as print_text, OutputError};

/// The longest duration any flag or API takes (one year).
pub fn duration_max() -> Duration {
    duration::MAX
}

use crate::api::{self, ApiServer};
use crate::devices::serial::Sink;
use crate::memory::Backing;
use crate::payload::Guest;
use crate::vm::{Exit, GuestConfig, RunReport, Vm, VmConfig};
use clap::{Args, Parser, Subcommand};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use mmu::LockPolicy;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        #[arg(long, default_value_t = 2)]
        vcpus: usize,
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
fn guest_help() -> String {
    let names: Vec<&str> = Guest::ALL.iter().map(|g| g.name()).collect();
    format!("Built-in guest: {}", names.join(", "))
}

/// Set by SIGINT/SIGTERM; the main loop turns it into a clean stop.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

impl RunArgs {
    pub fn config(&self) -> Result<VmConfig, String> {
        let guest = match (&self.kernel, self.guest) {
            (Some(k), _) => {
                if !k.is_file() {
                    return Err(format!("--kernel {}: no such file", k.display()));
                }
                if let Some(i) = &self.initrd {
                    if !i.is_file() {
                        return Err(format!("--initrd {}: no such file", i.display()));
                    }
                }
                GuestConfig::Linux {
                    kernel: k.clone(),
                    initrd: self.initrd.clone(),
                    cmdline: self
                        .cmdline
                        .clone()
                        .unwrap_or_else(|| crate::linux::DEFAULT_CMDLINE.into()),
                }
            }
            (None, _) if self.initrd.is_some() || self.cmdline.is_some() => {
                return Err("--initrd and --cmdline only apply to --kernel".into())
            }
            (None, Some(g)) => GuestConfig::Builtin(g),
            (None, None) => match &self.payload {
                Some(p) => GuestConfig::Program {
                    path: p.clone(),
                    args: self.payload_arg.clone(),
                },
                None => {
                    return Err(format!(
                        "give --guest, --payload FILE or --kernel PATH ({})",
                        guest_help()
                    ))
                }
            },
        };
        Ok(VmConfig {
            memory: self.vm.memory,
            vcpus: self.vm.vcpus,
            guest,
            backing: self.vm.backing,
            lock: self.vm.lock,
            seed: self.seed,
            rounds: self.rounds,
            work_pages: self.pages,
            console: Sink::Stdout,
            tracking: Default::default(),
            rnic: self.rnic.clone(),
            msg: self.msg,
            iters: self.iters,
            fault_around: self.fault_around,
        })
    }
}

/// How a VM run by [`serve`] ended.
pub struct Outcome {
    pub report: RunReport,
    /// The signal that stopped it, if one did.
    pub signal: Option<i32>,
}

/// Run a started VM to its end, serving `api` meanwhile, and watching for
/// signals, the timeout and a dead or stalled fault thread (which stops the
/// VM with the reason as its exit).
pub fn serve(
    mut vm: Vm,
    api: Option<ApiServer>,
    timeout: Option<Duration>,
) -> Result<Outcome, String> {
    let handle = vm.handle();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| format!("creating the event loop: {e:?}"))?;
    if let Some(server) = api {
        em.add_subscriber(Arc::new(Mutex::new(server)));
    }
    install_signal_handlers();
    vm.start().map_err(|e| e.to_string())?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut watchdog = crate::fault::Watchdog::new(&handle);
    let mut signal = None;
    while !handle.finished() {
        if let Err(e) = em.run_with_timeout(50) {
            log::warn!("event loop: {e:?}");
        }
        match SIGNAL.swap(0, Ordering::SeqCst) {
            0 => {}
            sig => {
                signal.get_or_insert(sig);
                handle.stop_for(Exit::Signal(if sig == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                }));
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            handle.stop_for(Exit::Timeout(timeout.unwrap_or_default()));
        }
        if let Some(why) = watchdog.check() {
            log::error!("{why}; stopping the VM");
            handle.stop_for(Exit::FaultThread(why));
            watchdog.release(&handle);
        }
    }
    drop(em);
    Ok(Outcome {
        report: vm.wait(None),
        signal,
    })
}

/// Build and run a VM to completion, serving the control socket meanwhile.
pub fn run_vm(
    config: VmConfig,
    api_sock: Option<&std::path::Path>,
    limits: api::Limits,
    timeout: Option<Duration>,
) -> Result<Outcome, String> {
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let server = match api_sock {
        Some(path) => Some(
            ApiServer::bind(path, vm.handle(), limits)
                .map_err(|e| format!("control socket: {e}"))?,
        ),
        None => None,
    };
    serve(vm, server, timeout)
}

fn human(r: &RunReport) -> String {
    let mut s = format!(
        "guest {}: {} ({}), {} vCPUs, {} MiB {} RAM\n",
        r.guest,
        r.guest_result,
        r.exit,
        r.vcpus,
        r.memory_bytes >> 20,
        r.backing
    );
    s += &format!(
        "pages touched {}, faults tracked {} ({} payload, {} RAM), retries {}, invalidations {}, teardowns {}\n",
        r.pages_touched,
        r.faults_tracked,
        r.payload_pages,
        r.ram_faults,
        r.fault_retries,
        r.invalidations,
        r.teardowns
    );
    if r.guest.starts_with("payload:") {
        for (i, v) in r.vcpu_reports.iter().enumerate() {
            match (v.get("exit_code"), v.get("crash")) {
                (Some(code), _) => s += &format!("vCPU {i}: exit {code}\n"),
                (_, Some(crash)) => s += &format!("{}\n", crash.as_str().unwrap_or("crash")),
                _ => {
                    s += &format!(
                        "vCPU {i}: {}\n",
                        v.get("end").unwrap_or(&serde_json::Value::Null)
                    )
                }
            }
        }
    }
    s += &format!("boot {:.1} ms, run {:.1} ms\n", r.boot_ms, r.run_ms);
    if !r.perftest.is_empty() {
        let latency = r.guest.ends_with("-lat");
        s += &crate::perftest::table(latency, &r.perftest);
    }
    s
}

/// `odpvm run`; returns the process exit code.
pub fn run(args: RunArgs) -> Result<i32, String> {
    let config = args.config()?;
    let limits = api::Limits {
        idle: args.api_idle_timeout,
        ..Default::default()
    };
    let roce_args = args.roce_bind.map(|bind| crate::roce_run::RoceArgs {
        bind,
        listen: args.roce_listen,
        connect: args.roce_connect,
        mtu: args.roce_mtu,
        echo: args.roce_echo,
    });
    let (Outcome { report, signal }, roce) = match &roce_args {
        None => (
            run_vm(config, args.api_sock.as_deref(), limits, args.timeout)?,
            None,
        ),
        Some(r) => {
            let (outcome, link) =
                crate::roce_run::run(config, args.api_sock.as_deref(), limits, args.timeout, r)?;
            (outcome, Some(link))
        }
    };
    let text = if args.json {
        let mut v = serde_json::to_value(&report).map_err(|e| e.to_string())?;
        if let (Some(r), Some(o)) = (&roce, v.as_object_mut()) {
            o.insert("roce".into(), r.report());
        }
        format!("{v}\n")
    } else {
        let mut t = human(&report);
        if let Some(r) = &roce {
            t += &format!("roce {}\n", r.report());
        }
        t
    };
    print_text(&text).map_err(|e| e.to_string())?;
    if let Some(sig) = signal {
        return Ok(128 + sig);
    }
    Ok(report.exit_code())
}

/// `odpvm demo`.
pub fn demo(a: DemoCli) -> Result<i32, String> {
    let args = crate::demo::DemoArgs {
        seconds: a.seconds,
        memory: a.memory,
        vcpus: a.vcpus,
        msg: a.msg,
        invalidate_every: a.invalidate_ms,
        teardown_every: a.teardown_ms,
        json: a.json,
        ..Default::default()
    };
    let (report, run) = crate::demo::run(args)?;
    crate::demo::print(&report, &run, a.json).map_err(|e| e.to_string())
}

/// `odpvm bench`.
pub fn bench(args: BenchArgs) -> Result<i32, String> {
    match args.which {
        BenchKind::Faults {
            memory,
            fault_around_memory,
            vcpus,
            reps,
            json,
        } => crate::bench::faults(memory, fault_around_memory, vcpus, reps, json)?,
        BenchKind::Rnic {
            total,
            budget,
            msg,
            json,
        } => {
            if msg == 0 || msg > (1 << 30) || total < msg || budget < msg || budget % msg != 0 {
                return Err(
                    "--msg must be 1..1G and divide --budget; --total at least --msg".into(),
                );
            }
            crate::bench::rnic(&crate::bench::RnicBench {
                msg,
                total,
                budget,
                json,
                ..Default::default()
            })?
        }
        BenchKind::Teardown {
            memory,
            methods,
            mirrors,
            reps,
            vcpus,
            plot,
            prezap,
            backing,
            json,
        } => crate::bench::teardown(&crate::bench::TeardownBench {
            prezap,
            backing,
            sizes: memory,
            methods,
            mirrors,
            reps,
            vcpus,
            json,
            plot,
        })?,
        BenchKind::Roce {
            iters,
            loss,
            churn,
            json,
        } => {
            if iters == 0 || loss.iter().any(|&l| l > 100) {
                return Err("--iters must be positive and --loss percentages at most 100".into());
            }
            crate::roce_bench::run(&crate::roce_bench::RoceBench {
                iters,
                losses: loss,
                churn,
                json,
            })?
        }
    }
    Ok(0)
}

/// `odpvm ctl`; returns the process exit code. The answer line goes to
/// stdout as received (a refusal too); no answer at all is an error.
pub fn ctl(args: CtlArgs) -> Result<i32, String> {
    use api::Request;
    let req = match &args.request {
        CtlRequest::Stats => Request::Stats,
        CtlRequest::Invalidate { gpa, len } => Request::Invalidate {
            gpa: api::Num(*gpa),
            len: api::Num(*len),
        },
        CtlRequest::Teardown => Request::Teardown,
        CtlRequest::Pause => Request::Pause,
        CtlRequest::Resume => Request::Resume,
        CtlRequest::Shutdown => Request::Shutdown,
        CtlRequest::Send { json } => {
            let answer =
                api::request_raw(&args.api_sock, json, args.timeout).map_err(|e| e.to_string())?;
            return ctl_answer(answer);
        }
    };
    let answer = api::request(&args.api_sock, &req, args.timeout).map_err(|e| e.to_string())?;
    ctl_answer(answer)
}

fn ctl_answer(answer: api::Answer) -> Result<i32, String> {
    print_line(&answer.line).map_err(|e| e.to_string())?;
    if !answer.reply.ok {
        eprintln!(
            "odpvm: the VMM refused: {}",
            answer.reply.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(if answer.reply.ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_fail_clearly() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").unwrap_err().contains("suffix"));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("1.5G").unwrap_err().contains("suffix"));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }
}
