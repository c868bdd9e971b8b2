//! `odpvm bench`: measured figures, one JSON object per line with --json.

use crate::devices::serial::Sink;
use crate::fault::Tracking;
use crate::payload::Guest;
use crate::vm::{GuestConfig, Vm, VmConfig};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Resident set of this process, KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn emit(json_out: bool, v: &Value) {
    if json_out {
        println!("{v}");
    } else {
        let o = v.as_object().expect("rows are objects");
        let parts: Vec<String> = o.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}", parts.join(" "));
    }
}

fn base(memory: u64, vcpus: usize, guest: Guest) -> VmConfig {
    VmConfig {
        guest: GuestConfig::Builtin(guest),
        memory,
        vcpus,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    }
}

/// One `touch` run; returns (seconds the guest ran, report).
fn touch(cfg: VmConfig) -> Result<(f64, crate::vm::RunReport), String> {
    let mut vm = Vm::new(cfg).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    vm.start().map_err(|e| e.to_string())?;
    let r = vm.wait(Some(Duration::from_secs(600)));
    let secs = t0.elapsed().as_secs_f64();
    if r.guest_result != "pass" {
        return Err(format!("touch failed: {} ({})", r.guest_result, r.exit));
    }
    Ok((secs, r))
}

/// First-touch fault cost with the tracker, with a raw userfaultfd handler
/// and with no userfaultfd, in one run; then start-up time and RSS.
pub fn faults(memory: u64, vcpus: usize, reps: usize, json_out: bool) -> Result<(), String> {
    let mut per_page = std::collections::BTreeMap::new();
    for tracking in [Tracking::Mmu, Tracking::RawUffd, Tracking::None] {
        let mut samples = Vec::new();
        let mut last = None;
        for _ in 0..reps.max(1) {
            let cfg = VmConfig {
                tracking,
                ..base(memory, vcpus, Guest::Touch)
            };
            let (secs, r) = touch(cfg)?;
            samples.push(secs);
            last = Some(r);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let secs = samples[samples.len() / 2];
        let r = last.expect("at least one repetition");
        let pages = r.pages_touched;
        let ns = secs * 1e9 / pages as f64;
        per_page.insert(tracking.as_str(), ns);
        emit(
            json_out,
            &json!({
                "bench": "faults",
                "mode": tracking.as_str(),
                "pages": pages,
                "vcpus": vcpus,
                "seconds": secs,
                "ns_per_page": ns,
                "faults": r.faults_tracked,
                "fault_retries": r.fault_retries,
                "reps": reps.max(1),
            }),
        );
    }
    emit(
        json_out,
        &json!({
            "bench": "faults",
            "summary": true,
            "mmu_over_raw_uffd": per_page["mmu"] / per_page["raw-uffd"],
            "mmu_over_no_uffd": per_page["mmu"] / per_page["none"],
        }),
    );

    // Start-up: from Vm::new to the idle guest's first device command.
    let mut vm = Vm::new(base(memory, 1, Guest::Idle)).map_err(|e| e.to_string())?;
    let h = vm.handle();
    vm.start().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        if let Some(t) = h.ready_after() {
            break t;
        }
        if Instant::now() > deadline {
            return Err("the idle guest never became ready".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let rss = rss_kib();
    h.shutdown();
    let r = vm.wait(Some(Duration::from_secs(30)));
    emit(
        json_out,
        &json!({
            "bench": "startup",
            "ready_ms": ready.as_secs_f64() * 1e3,
            "build_ms": r.boot_ms,
            "vmm_rss_kib": rss,
            "guest_pages_faulted": r.faults_tracked,
        }),
    );
    Ok(())
}
