//! The `odpvm` command line.
//!
//! Exit codes: 0 success; 1 the guest or the check failed (or the VM
//! stopped on an error); 2 an error before or around the run (a bad command
//! line, the VMM could not start, stdout closed) with one line on stderr;
//! 128 + the signal number (130 SIGINT, 143 SIGTERM) when a signal stopped
//! the VM, whatever the guest did (`a_signal_gives_a_fixed_exit_code`).

mod args;
mod duration;
pub(crate) mod output;

use args::guest_help;
pub use args::*;

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

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use mmu::LockPolicy;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        let helpers = helpers_with_pinning(self.vm.helpers, self.vm.pin_vcpus)?;
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
            pin_vcpus: self.vm.pin_vcpus,
            helpers,
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
            pin_vcpus,
            helpers,
            plot,
            prezap,
            backing,
            json,
        } => crate::bench::teardown(&crate::bench::TeardownBench {
            helpers: helpers_with_pinning(helpers, pin_vcpus)?,
            prezap,
            backing,
            sizes: memory,
            methods,
            mirrors,
            reps,
            vcpus,
            pin_vcpus,
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

/// `--helpers` places threads only among pinned ones: asked for without
/// pinning it would be silently ignored, so it is refused.
fn helpers_with_pinning(
    helpers: Option<crate::affinity::Helpers>,
    pinned: bool,
) -> Result<crate::affinity::Helpers, String> {
    match helpers {
        Some(h) if !pinned => Err(format!(
            "--helpers {} places threads only with --pin-vcpus",
            h.name()
        )),
        h => Ok(h.unwrap_or_default()),
    }
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
