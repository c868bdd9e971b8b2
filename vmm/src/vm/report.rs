//! The reports: `LiveStats` (counters while the VM runs, the control
//! socket's `stats`) and `RunReport` (what `odpvm run --json` prints last).
//! `GuestResult` and `Exit` are enums serialized as the strings the JSON has
//! always carried; they, not string matching, decide the process exit code
//! (`RunReport::exit_code`, proven by `report::tests`).

use super::{Core, GuestConfig};
use crate::devices::testdev::VcpuReport;
use crate::fault::FaultStats;
use crate::payload;
use crate::vstate::vcpu::VcpuEnd;
use serde::{Serialize, Serializer};
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Whether the guest's payload passed, as its vCPU reports say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestResult {
    Pass,
    Fail,
    /// Guests that report nothing (idle, Linux, the sparse/other builtins
    /// without report fields).
    NotApplicable,
}

impl GuestResult {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestResult::Pass => "pass",
            GuestResult::Fail => "fail",
            GuestResult::NotApplicable => "n/a",
        }
    }
}

impl fmt::Display for GuestResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for GuestResult {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Compares with the JSON spelling ("pass", "fail", "n/a").
impl PartialEq<&str> for GuestResult {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Why the VM stopped. Displayed and serialized exactly as the `exit`
/// strings of earlier versions ("guest-done", "hlt", "timeout after 5.0s",
/// "vcpu0: error: …"), so `--json` output is unchanged.
#[derive(Clone, Debug, PartialEq)]
pub enum Exit {
    /// Every vCPU ended and the guest has a payload that finished.
    GuestDone,
    /// Every vCPU ended with no payload to finish (no reason recorded).
    Stopped,
    /// A vCPU executed `hlt` with interrupts off.
    Halted,
    /// The guest asked for a reset.
    Reset,
    /// A vCPU hit a shutdown exit (a triple fault, usually).
    TripleFault { vcpu: usize, detail: String },
    /// Running a vCPU failed (a KVM error, an unhandled exit).
    VcpuError { vcpu: usize, detail: String },
    /// The run's time limit passed.
    Timeout(Duration),
    /// SIGINT or SIGTERM.
    Signal(&'static str),
    /// The fault thread died or stalled (the watchdog's reason).
    FaultThread(String),
    /// A controller asked (the control socket's `shutdown`, a RoCE peer
    /// that closed, `VmHandle::stop`).
    Requested(String),
}

impl Exit {
    /// Whether this end makes `odpvm run` exit non-zero: the VM broke
    /// (a vCPU error or triple fault, a failed fault thread), as opposed to
    /// ending or being stopped.
    pub fn is_failure(&self) -> bool {
        match self {
            Exit::TripleFault { .. } | Exit::VcpuError { .. } | Exit::FaultThread(_) => true,
            Exit::GuestDone
            | Exit::Stopped
            | Exit::Halted
            | Exit::Reset
            | Exit::Timeout(_)
            | Exit::Signal(_)
            | Exit::Requested(_) => false,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::GuestDone => f.write_str("guest-done"),
            Exit::Stopped => f.write_str("stopped"),
            Exit::Halted => f.write_str("hlt"),
            Exit::Reset => f.write_str("reset"),
            Exit::TripleFault { vcpu, detail } => {
                write!(f, "vcpu{vcpu}: shutdown (triple fault?): {detail}")
            }
            Exit::VcpuError { vcpu, detail } => write!(f, "vcpu{vcpu}: error: {detail}"),
            Exit::Timeout(t) => write!(f, "timeout after {:.1}s", t.as_secs_f64()),
            Exit::Signal(name) => write!(f, "signal {name}"),
            Exit::FaultThread(why) | Exit::Requested(why) => f.write_str(why),
        }
    }
}

impl Serialize for Exit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Compares with the JSON spelling (`exit == "guest-done"`).
impl PartialEq<&str> for Exit {
    fn eq(&self, other: &&str) -> bool {
        self.to_string().as_str() == *other
    }
}

/// Counters while the VM runs.
#[derive(Clone, Debug, Serialize)]
pub struct LiveStats {
    pub uptime_ms: f64,
    pub faults_tracked: u64,
    pub pages_tracked: u64,
    pub fault_retries: u64,
    pub faults_deferred: u64,
    pub faults_untracked: u64,
    pub fault_errors: u64,
    /// Expected fault/teardown races (not errors).
    pub fault_teardown_races: u64,
    pub remove_events: u64,
    pub invalidations: u64,
    pub teardowns: u64,
    pub mapped_bytes: u64,
    pub entries_reclaimed: u64,
    pub kvm_invalidations: u64,
    pub kvm_bytes_discarded: u64,
    pub kvm_slot_moves: u64,
    pub kvm_bytes_released: u64,
    pub kvm_mappings_unmapped: u64,
    pub retired_mappings: usize,
    pub teardown_pause_ns_max: u64,
    pub lock_hold_ns_p999: u64,
    pub lock_hold_ns_max: u64,
    pub barrier_waiting: usize,
    pub paused: bool,
    pub protocol_errors: u64,
    /// The paravirtual RNIC (zero without one).
    pub rnic_device_faults: u64,
    pub rnic_invalidations: u64,
    pub rnic_device_errors: u64,
    pub rnic_wqes_rejected: u64,
    pub rnic_recvs_refused: u64,
    pub rnic_stale_accesses: u64,
    pub rnic_bytes_written: u64,
    /// Fault-around: mean and largest pages per fault, pages resolved
    /// beyond the faulting one, and of those the ones discarded (by an
    /// invalidation, or at exit) without ever being written.
    pub pages_per_fault_mean: f64,
    pub pages_per_fault_max: u64,
    pub speculative_pages: u64,
    pub wasted_pages: u64,
}

impl LiveStats {
    pub(super) fn new(c: &Core) -> Self {
        let get = FaultStats::get;
        let m = c.mmu.stats().snapshot();
        let k = &c.mirror.stats;
        let rnic = c
            .devices
            .rnic
            .as_ref()
            .map(|d| d.rnic().stats())
            .unwrap_or_default();
        let dev =
            |f: fn(&crate::devices::rnic::RnicDeviceStats) -> &std::sync::atomic::AtomicU64| {
                c.devices
                    .rnic
                    .as_ref()
                    .map_or(0, |d| f(&d.stats).load(Ordering::Relaxed))
            };
        LiveStats {
            uptime_ms: c.started.elapsed().as_secs_f64() * 1e3,
            faults_tracked: get(&c.faults.faults),
            pages_tracked: get(&c.faults.pages),
            fault_retries: get(&c.faults.retries),
            faults_deferred: get(&c.faults.deferred),
            faults_untracked: get(&c.faults.untracked),
            fault_errors: get(&c.faults.errors),
            fault_teardown_races: get(&c.faults.teardown_races),
            remove_events: get(&c.faults.removes),
            invalidations: m.invalidations,
            teardowns: m.teardowns,
            mapped_bytes: c.mmu.mapped_bytes(),
            entries_reclaimed: m.entries_reclaimed,
            kvm_invalidations: k.invalidations.load(Ordering::Relaxed),
            kvm_bytes_discarded: k.bytes_discarded.load(Ordering::Relaxed),
            kvm_slot_moves: k.slot_moves.load(Ordering::Relaxed),
            kvm_bytes_released: k.bytes_released.load(Ordering::Relaxed),
            kvm_mappings_unmapped: k.mappings_unmapped.load(Ordering::Relaxed),
            retired_mappings: c.ram.retired_count(),
            teardown_pause_ns_max: k.pause_ns.summary().max,
            lock_hold_ns_p999: m.lock_hold_ns.p999,
            lock_hold_ns_max: m.lock_hold_ns.max,
            barrier_waiting: c.devices.testdev.barrier.waiting().0,
            paused: c.gate.paused(),
            protocol_errors: c.devices.testdev.protocol_errors(),
            rnic_device_faults: rnic.device_faults,
            rnic_invalidations: rnic.invalidations + rnic.generations,
            rnic_device_errors: dev(|d| &d.device_errors),
            rnic_wqes_rejected: dev(|d| &d.wqes_rejected),
            rnic_recvs_refused: dev(|d| &d.recvs_refused),
            rnic_stale_accesses: dev(|d| &d.stale_accesses),
            rnic_bytes_written: dev(|d| &d.bytes_written),
            pages_per_fault_mean: c.faults.pages_per_fault.summary().mean,
            pages_per_fault_max: c.faults.pages_per_fault.summary().max,
            speculative_pages: get(&c.faults.speculative),
            wasted_pages: k.wasted_pages.load(Ordering::Relaxed),
        }
    }
}

/// What `odpvm run --json` prints last.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// "pass", "fail" or "n/a" (guests that report nothing).
    pub guest_result: GuestResult,
    pub guest: String,
    /// Pages the payload says it touched (summed over vCPUs).
    pub pages_touched: u64,
    pub faults_tracked: u64,
    pub pages_tracked: u64,
    /// Faults on the payload's own pages (code, page tables, stacks).
    pub payload_pages: u64,
    /// Faults on RAM.
    pub ram_faults: u64,
    pub fault_retries: u64,
    pub invalidations: u64,
    pub teardowns: u64,
    /// Why the VM stopped.
    pub exit: Exit,
    pub vcpus: usize,
    pub memory_bytes: u64,
    pub backing: String,
    pub lock: String,
    /// Construction time (KVM, memory, threads, vCPUs).
    pub boot_ms: f64,
    pub run_ms: f64,
    /// Each vCPU's end and report arguments, by name where known.
    pub vcpu_reports: Vec<serde_json::Value>,
    /// RDMA workloads: per-vCPU perftest figures.
    pub perftest: Vec<crate::perftest::Figures>,
    /// What user programs printed (`CONSOLE`), and bytes past the bound.
    pub console: String,
    pub console_dropped_bytes: u64,
    pub stats: LiveStats,
}

impl RunReport {
    pub(super) fn new(c: &Core, boot_ms: f64) -> Self {
        let ends = c.ends.lock().clone();
        let guest = match &c.config.guest {
            GuestConfig::Builtin(g) => Some(*g),
            GuestConfig::Program { .. } | GuestConfig::Linux { .. } => None,
        };
        let program = matches!(c.config.guest, GuestConfig::Program { .. });
        let fields = guest.map(|g| g.report_fields()).unwrap_or(&[]);
        let reports: Vec<Option<&VcpuReport>> = ends
            .iter()
            .map(|e| match e {
                Some(VcpuEnd::Finished(r)) => Some(r),
                _ => None,
            })
            .collect();
        let guest_result = if !program && (guest.is_none() || fields.is_empty()) {
            GuestResult::NotApplicable
        } else if reports.iter().all(|r| r.is_some_and(|r| r.passed)) {
            GuestResult::Pass
        } else {
            GuestResult::Fail
        };
        let pages_touched = if fields.first() == Some(&"pages") {
            reports
                .iter()
                .flatten()
                .map(|r| u64::from(r.args.first().copied().unwrap_or(0)))
                .sum()
        } else {
            0
        };
        let vcpu_reports: Vec<serde_json::Value> = ends
            .iter()
            .enumerate()
            .map(|(i, e)| match e {
                _ if program => payload::user::vcpu_json(i, e.as_ref()),
                Some(VcpuEnd::Finished(r)) => {
                    let mut o = serde_json::Map::new();
                    o.insert("passed".into(), r.passed.into());
                    for (i, v) in r.args.iter().enumerate() {
                        let key = fields
                            .get(i)
                            .map(|s| s.to_string())
                            .unwrap_or(format!("arg{i}"));
                        o.insert(key, (*v).into());
                    }
                    serde_json::Value::Object(o)
                }
                Some(other) => serde_json::json!({ "end": format!("{other:?}") }),
                None => serde_json::json!({ "end": "running" }),
            })
            .collect();
        let perftest = match guest {
            Some(g) if g.is_rdma() => vcpu_reports
                .iter()
                .enumerate()
                .filter(|(_, v)| v.get("msgs").is_some())
                .map(|(i, v)| {
                    let samples = reports[i].map(|r| r.samples.as_slice()).unwrap_or(&[]);
                    crate::perftest::figures(i, v, samples)
                })
                .collect(),
            _ => Vec::new(),
        };
        let stats = LiveStats::new(c);
        let per_region = |i: usize| FaultStats::get(&c.faults.per_region[i]);
        let payload_pages = if guest.is_some() || program {
            per_region(0)
        } else {
            0
        };
        c.devices.testdev.console.flush();
        let (console, console_dropped_bytes) = c.devices.testdev.console.text();
        let exit = c.stop_reason.lock().clone().unwrap_or_else(|| {
            if guest.is_some() || program {
                Exit::GuestDone
            } else {
                Exit::Stopped
            }
        });
        RunReport {
            guest_result,
            guest: match &c.config.guest {
                GuestConfig::Builtin(g) => g.name().into(),
                GuestConfig::Linux { kernel, .. } => format!("linux:{}", kernel.display()),
                GuestConfig::Program { path, .. } => format!("payload:{}", path.display()),
            },
            pages_touched,
            faults_tracked: stats.faults_tracked,
            pages_tracked: stats.pages_tracked,
            payload_pages,
            ram_faults: stats.faults_tracked - payload_pages,
            fault_retries: stats.fault_retries,
            invalidations: stats.invalidations,
            teardowns: stats.teardowns,
            exit,
            vcpus: c.config.vcpus,
            memory_bytes: c.config.memory,
            backing: c.config.backing.as_str().into(),
            lock: c.config.lock.as_str().into(),
            boot_ms,
            run_ms: c.started.elapsed().as_secs_f64() * 1e3,
            vcpu_reports,
            perftest,
            console,
            console_dropped_bytes,
            stats,
        }
    }
}

impl RunReport {
    /// The process exit code of `odpvm run` for this report: 0 when the
    /// guest passed (or reports nothing) and the VM was not broken.
    pub fn exit_code(&self) -> i32 {
        let passed = matches!(
            self.guest_result,
            GuestResult::Pass | GuestResult::NotApplicable
        );
        if passed && !self.exit.is_failure() {
            0
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON spellings are the ones earlier versions printed.
    #[test]
    fn exits_display_as_the_old_strings() {
        let cases = [
            (Exit::GuestDone, "guest-done"),
            (Exit::Stopped, "stopped"),
            (Exit::Halted, "hlt"),
            (Exit::Reset, "reset"),
            (
                Exit::TripleFault {
                    vcpu: 1,
                    detail: "x".into(),
                },
                "vcpu1: shutdown (triple fault?): x",
            ),
            (
                Exit::VcpuError {
                    vcpu: 0,
                    detail: "y".into(),
                },
                "vcpu0: error: y",
            ),
            (
                Exit::Timeout(Duration::from_millis(2500)),
                "timeout after 2.5s",
            ),
            (Exit::Signal("SIGINT"), "signal SIGINT"),
            (
                Exit::Requested("shutdown requested".into()),
                "shutdown requested",
            ),
        ];
        for (e, s) in cases {
            assert_eq!(serde_json::to_value(&e).unwrap(), s);
            assert_eq!(e, s);
        }
        assert_eq!(
            serde_json::to_value(GuestResult::NotApplicable).unwrap(),
            "n/a"
        );
    }

    /// Only a broken VM fails the run; a stop on request or timeout does not
    /// (the rule `exit.contains("error" | "fault thread" | "shutdown (triple")`
    /// had before).
    #[test]
    fn only_broken_ends_fail() {
        let failing = [
            Exit::TripleFault {
                vcpu: 0,
                detail: String::new(),
            },
            Exit::VcpuError {
                vcpu: 0,
                detail: String::new(),
            },
            Exit::FaultThread("fault thread failed: x".into()),
        ];
        assert!(failing.iter().all(Exit::is_failure));
        let clean = [
            Exit::GuestDone,
            Exit::Stopped,
            Exit::Halted,
            Exit::Reset,
            Exit::Timeout(Duration::from_secs(1)),
            Exit::Signal("SIGTERM"),
            Exit::Requested("shutdown requested".into()),
        ];
        assert!(!clean.iter().any(Exit::is_failure));
    }
}
