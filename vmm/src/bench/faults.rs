//! `odpvm bench faults`.

use super::{base, emit, rss_kib};
use crate::fault::Tracking;
use crate::payload::Guest;
use crate::vm::{GuestConfig, Vm, VmConfig};
use serde_json::json;
use std::time::{Duration, Instant};

/// One `touch` run; returns (seconds the guest ran, report).
fn touch(cfg: VmConfig) -> Result<(f64, crate::vm::RunReport), String> {
    let mut vm = Vm::new(cfg).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    vm.start().map_err(|e| e.to_string())?;
    let r = vm.wait(Some(Duration::from_secs(600)));
    let secs = t0.elapsed().as_secs_f64();
    if r.guest_result != crate::vm::GuestResult::Pass {
        return Err(format!("touch failed: {} ({})", r.guest_result, r.exit));
    }
    Ok((secs, r))
}

/// First-touch fault cost with the tracker, with a raw userfaultfd handler
/// and with no userfaultfd, in one run; then start-up time and RSS.
pub fn faults(
    memory: u64,
    fa_memory: u64,
    vcpus: usize,
    reps: usize,
    json_out: bool,
) -> Result<(), String> {
    // Start-up first, in a fresh process: from Vm::new to the idle
    // guest's first device command, and the VMM's RSS then.
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
    )?;
    let mut per_page = std::collections::BTreeMap::new();
    for tracking in [Tracking::Mmu, Tracking::RawUffd, Tracking::None] {
        let mut samples = Vec::new();
        let mut last = None;
        for _ in 0..reps.max(1) {
            // Page at a time: the per-fault cost is what is compared.
            let cfg = VmConfig {
                tracking,
                fault_around: 0,
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
        )?;
    }
    emit(
        json_out,
        &json!({
            "bench": "faults",
            "summary": true,
            "mmu_over_raw_uffd": per_page["mmu"] / per_page["raw-uffd"],
            "mmu_over_no_uffd": per_page["mmu"] / per_page["none"],
        }),
    )?;

    fault_around(fa_memory, json_out)?;

    Ok(())
}

/// Fault-around: sequential first touch of `memory` page at a time, with
/// the adaptive window, and with 2 MiB pages; scattered sparse touch page
/// at a time and adaptive. One vCPU, one run each.
fn fault_around(memory: u64, json_out: bool) -> Result<(), String> {
    let row = |name: &str, guest: Guest, cfg: VmConfig| -> Result<f64, String> {
        let (secs, r) = touch(VmConfig {
            guest: GuestConfig::Builtin(guest),
            ..cfg
        })?;
        emit(
            json_out,
            &json!({
                "bench": "faults",
                "fault_around": name,
                "workload": guest.name(),
                "faults": r.faults_tracked,
                "pages": r.pages_tracked,
                "pages_touched": r.pages_touched,
                "seconds": secs,
                "pages_per_fault": r.pages_tracked as f64 / r.faults_tracked.max(1) as f64,
                "wasted_pages": r.stats.wasted_pages,
                "memory_bytes": memory,
            }),
        )?;
        Ok(secs)
    };
    let base = |fa: u64| VmConfig {
        fault_around: fa,
        ..self::base(memory, 1, Guest::Touch)
    };
    let off = row("off", Guest::Touch, base(0))?;
    let adaptive = row(
        "adaptive",
        Guest::Touch,
        base(crate::fault::MAX_FAULT_AROUND),
    )?;
    let huge = match crate::memory::reserve_huge_pages(memory / (2 << 20) + 1) {
        Ok(()) => Some(row(
            "2M",
            Guest::Touch,
            VmConfig {
                backing: crate::memory::Backing::Hugetlbfs,
                ..base(0)
            },
        )?),
        Err(why) => {
            emit(
                json_out,
                &json!({"bench": "faults", "fault_around": "2M", "skipped": why}),
            )?;
            None
        }
    };
    let sparse_pages = memory / 4096 / 16;
    let sparse = |fa| VmConfig {
        work_pages: Some(sparse_pages),
        ..base(fa)
    };
    let sparse_off = row("off", Guest::Sparse, sparse(0))?;
    let sparse_adaptive = row(
        "adaptive",
        Guest::Sparse,
        sparse(crate::fault::MAX_FAULT_AROUND),
    )?;
    emit(
        json_out,
        &json!({
            "bench": "faults",
            "fault_around_summary": true,
            "sequential_speedup_adaptive": off / adaptive,
            "sequential_speedup_2m": huge.map(|h| off / h),
            "sparse_slowdown_adaptive": sparse_adaptive / sparse_off,
        }),
    )?;
    Ok(())
}
