//! `odpvm demo`: the whole idea end to end. A 2-vCPU microVM runs
//! `rdma-write-bw` against the host peer through the emulated RNIC, whose
//! one ODP MR covers all guest RAM, while a host thread
//! invalidates random guest ranges and periodically tears everything down.
//! Every page carries a stamp; the device checks each page it delivered,
//! the guest counts what it could not use. Zero stale accesses is the
//! claim; everything else is the cost.

use crate::cli::{print_line, OutputError};
use crate::devices::serial::Sink;
use crate::payload::Guest;
use crate::vm::{Exit, GuestConfig, GuestResult, RnicChoice, RunReport, Vm, VmConfig, VmHandle};
use parking_lot::{Condvar, Mutex};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct DemoArgs {
    pub seconds: Duration,
    pub memory: u64,
    pub vcpus: usize,
    pub msg: u64,
    /// Mean gap between range invalidations.
    pub invalidate_every: Duration,
    /// Gap between whole-VM teardowns.
    pub teardown_every: Duration,
    pub seed: u64,
    pub json: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            seconds: Duration::from_secs(10),
            memory: 256 << 20,
            vcpus: 2,
            msg: 64 << 10,
            invalidate_every: Duration::from_millis(2),
            teardown_every: Duration::from_millis(500),
            seed: 0x00dd_5eed,
            json: false,
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoReport {
    pub guest_result: GuestResult,
    pub seconds: f64,
    pub stale_accesses: u64,
    pub kvm_invalidations: u64,
    pub rnic_invalidations: u64,
    pub device_faults: u64,
    pub guest_faults: u64,
    pub teardowns: u64,
    pub teardown_ns_p50: u64,
    pub teardown_ns_p99: u64,
    pub guest_write_bw_gbps: f64,
    pub host_invalidations: u64,
    pub pages_verified: u64,
    pub pages_zero: u64,
    pub guest_wqe_errors: u64,
    pub guest_recoveries: u64,
    pub device_errors: u64,
    pub fenced_mrs: u64,
    pub exit: Exit,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Tells the chaos thread to end, waking it from its sleep: a gap may be
/// as long as the flags allow (a year), the demo's end must not wait for it.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stop {
    fn set(&self) {
        *self.stopped.lock() = true;
        self.cv.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.stopped.lock()
    }

    /// Sleep for `d` unless stopped first; true if stopped.
    fn sleep(&self, d: Duration) -> bool {
        let mut stopped = self.stopped.lock();
        if !*stopped {
            let _ = self.cv.wait_for(&mut stopped, d);
        }
        *stopped
    }
}

/// Invalidate random RAM ranges and tear everything down now and then,
/// until `stop`. Returns the teardown latencies (ns) and invalidations.
fn chaos(h: VmHandle, args: DemoArgs, stop: Arc<Stop>) -> (Vec<u64>, u64) {
    let mut rng = Rng(args.seed | 1);
    let ram: Vec<(u64, u64)> = h
        .mmu()
        .regions()
        .iter()
        .filter(|r| r.name.starts_with("ram"))
        .map(|r| (r.gpa, r.size))
        .collect();
    let mut teardown_ns = Vec::new();
    let mut invalidations = 0;
    // Gaps are at most a year (the flags' bound), so these sums fit.
    let mut next_teardown = Instant::now() + args.teardown_every;
    while !stop.is_set() {
        let (gpa, size) = ram[(rng.next() % ram.len() as u64) as usize];
        let pages = size / 4096;
        let len = 1 + rng.next() % 64;
        let page = rng.next() % (pages - len);
        if h.invalidate(gpa + page * 4096, len * 4096).is_ok() {
            invalidations += 1;
        }
        if Instant::now() >= next_teardown {
            if let Ok(ns) = h.teardown() {
                teardown_ns.push(ns);
            }
            next_teardown = Instant::now() + args.teardown_every;
        }
        let gap = u64::try_from(args.invalidate_every.as_micros()).unwrap_or(u64::MAX / 4);
        let sleep = Duration::from_micros(rng.next() % (2 * gap + 1));
        if stop.sleep(sleep) {
            break;
        }
    }
    (teardown_ns, invalidations)
}

fn pct(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

pub fn run(args: DemoArgs) -> Result<(DemoReport, RunReport), String> {
    if args.seconds.is_zero() || args.seconds > crate::cli::duration_max() {
        return Err(format!(
            "--seconds {:?}: must be positive and at most a year",
            args.seconds
        ));
    }
    let cfg = VmConfig {
        guest: GuestConfig::Builtin(Guest::RdmaWriteBw),
        memory: args.memory,
        vcpus: args.vcpus,
        msg: args.msg,
        iters: 0, // until told to stop
        rnic: RnicChoice::Emulated,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(cfg).map_err(|e| e.to_string())?;
    let h = vm.handle();
    let dev = h.rnic().ok_or("the demo needs the emulated RNIC")?;
    vm.start().map_err(|e| e.to_string())?;
    let stop = Arc::new(Stop::default());
    let chaos_thread = {
        let (h, a, s) = (h.clone(), args.clone(), stop.clone());
        std::thread::Builder::new()
            .name("odpvm-chaos".into())
            .spawn(move || chaos(h, a, s))
            .map_err(|e| e.to_string())?
    };
    let progress = |line: String| -> Result<(), OutputError> {
        if args.json {
            eprintln!("{line}");
            Ok(())
        } else {
            print_line(line)
        }
    };
    let mut closed = progress(format!(
        "odpvm demo: {} vCPUs, {} MiB, rdma-write-bw {} KiB messages for {:.0}s; invalidating every ~{:?}, tearing down every {:?}",
        args.vcpus,
        args.memory >> 20,
        args.msg >> 10,
        args.seconds.as_secs_f64(),
        args.invalidate_every,
        args.teardown_every
    ))
    .err();
    let t0 = Instant::now();
    let deadline = t0 + args.seconds;
    let mut last = (t0, 0u64);
    while closed.is_none() && Instant::now() < deadline && h.running() && !h.finished() {
        std::thread::sleep(
            Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
        );
        let now = Instant::now();
        if now.duration_since(last.0) >= Duration::from_secs(1) || now >= deadline {
            let written = dev.stats.bytes_written.load(Ordering::Relaxed);
            let gbps =
                (written - last.1) as f64 * 8.0 / now.duration_since(last.0).as_secs_f64() / 1e9;
            let s = h.stats();
            let r = dev.rnic().stats();
            closed = progress(format!(
                "[{:5.1}s] {:6.2} Gb/s  invalidations kvm {:6} rnic {:6}  device faults {:6}  guest faults {:7}  teardowns {:3}  stale {}",
                now.duration_since(t0).as_secs_f64(),
                gbps,
                s.kvm_invalidations,
                r.invalidations + r.generations,
                r.device_faults,
                s.faults_tracked,
                s.teardowns,
                dev.stats.stale_accesses.load(Ordering::Relaxed)
            ))
            .err();
            last = (now, written);
        }
    }
    stop.set();
    let (mut teardown_ns, host_invalidations) =
        chaos_thread.join().map_err(|_| "chaos thread panicked")?;
    h.request_stop();
    let run = vm.wait(Some(Duration::from_secs(120)));
    if let Some(e) = closed {
        return Err(e.to_string());
    }
    let r = dev.rnic().stats();
    let k = h.kvm_mirror_stats();
    let guest_stale: u64 = run.perftest.iter().map(|f| f.stale).sum();
    let report = DemoReport {
        guest_result: run.guest_result,
        seconds: t0.elapsed().as_secs_f64(),
        stale_accesses: dev.stats.stale_accesses.load(Ordering::Relaxed) + guest_stale,
        kvm_invalidations: k.invalidations.load(Ordering::Relaxed)
            + k.generations.load(Ordering::Relaxed),
        rnic_invalidations: r.invalidations + r.generations,
        device_faults: r.device_faults,
        guest_faults: run.faults_tracked,
        teardowns: run.teardowns,
        teardown_ns_p50: pct(&mut teardown_ns, 0.5),
        teardown_ns_p99: pct(&mut teardown_ns, 0.99),
        guest_write_bw_gbps: run.perftest.iter().map(|f| f.bw_avg_gbps).sum(),
        host_invalidations,
        pages_verified: dev.stats.pages_verified.load(Ordering::Relaxed),
        pages_zero: dev.stats.pages_zero.load(Ordering::Relaxed),
        guest_wqe_errors: run.perftest.iter().map(|f| f.errors).sum(),
        guest_recoveries: run.perftest.iter().map(|f| f.recoveries).sum(),
        device_errors: dev.stats.device_errors.load(Ordering::Relaxed),
        fenced_mrs: r.fenced_mrs,
        exit: run.exit.clone(),
    };
    Ok((report, run))
}

/// Print the report; the exit code says whether the claim held.
pub fn print(report: &DemoReport, run: &RunReport, json_out: bool) -> Result<i32, OutputError> {
    if json_out {
        print_line(json!(report))?;
    } else {
        crate::cli::print_text(&crate::perftest::table(false, &run.perftest))?;
        let v: Value = json!(report);
        let width = v
            .as_object()
            .map_or(0, |o| o.keys().map(|k| k.len()).max().unwrap_or(0));
        if let Some(o) = v.as_object() {
            for (k, x) in o {
                print_line(format!("  {k:width$}  {x}"))?;
            }
        }
        print_line(if report.stale_accesses == 0 {
            "no stale access: every invalidation reached KVM and the RNIC before the memory was reused"
        } else {
            "STALE ACCESSES DETECTED"
        })?;
    }
    let ok = report.stale_accesses == 0
        && report.guest_result == GuestResult::Pass
        && report.exit == Exit::GuestDone;
    Ok(if ok { 0 } else { 1 })
}
