//! The contract of `odpvm bench teardown --json` that scripts rely on
//! (issue 9 item 2): one JSON object per (size, mirrors, method) row with
//! the documented fields, p99 never below p50, the host context beside the
//! figures, and `--plot` writing an SVG. Real KVM, a real writer guest.

use serde_json::Value;
use std::process::Command;

fn odpvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_odpvm"))
}

/// CPUs this process may use, read here independently of the VMM.
fn host_cpus() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// Whether a DAMON worker thread exists (what `ps -e | grep kdamond`
/// shows), read here independently of the VMM.
fn kdamond_runs() -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path().join("comm"))
            .map(|c| c.starts_with("kdamond"))
            .unwrap_or(false)
    })
}

const SIZES: [u64; 2] = [32 << 20, 64 << 20];
const METHODS: [&str; 3] = ["generation", "invalidate-all", "walk"];

#[test]
fn json_rows_carry_every_documented_field() {
    let plot = std::env::temp_dir().join(format!("odpvm-bench-{}.svg", std::process::id()));
    let out = odpvm()
        .args([
            "bench",
            "teardown",
            "--memory",
            "32M,64M",
            "--methods",
            "generation,invalidate-all,walk",
            "--mirrors",
            "kvm+rnic",
            "--reps",
            "5",
            "--json",
            "--plot",
        ])
        .arg(&plot)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(rows.len(), SIZES.len() * METHODS.len(), "{rows:#?}");
    for (i, row) in rows.iter().enumerate() {
        let (size, method) = (SIZES[i / METHODS.len()], METHODS[i % METHODS.len()]);
        let num = |k: &str| {
            row[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{k} missing or not a count in {row}"))
        };
        assert_eq!(row["bench"], "teardown", "{row}");
        assert_eq!(num("memory_bytes"), size, "{row}");
        assert_eq!(row["method"], method, "{row}");
        assert_eq!(row["mirrors"], "kvm+rnic", "{row}");
        assert_eq!(num("reps"), 5, "{row}");
        for (p50, p99) in [
            ("stall_ns_p50", "stall_ns_p99"),
            ("complete_ns_p50", "complete_ns_p99"),
        ] {
            assert!(num(p50) > 0, "{p50} is zero: {row}");
            assert!(num(p99) >= num(p50), "{p99} below {p50}: {row}");
        }
        // The stall's split: the run delay is at most the stall it is part
        // of (per repetition, so at every quantile too).
        assert!(
            num("stall_run_delay_ns_p50") <= num("stall_ns_p50"),
            "run delay above the stall: {row}"
        );
        assert!(
            num("stall_less_run_delay_ns_p50") <= num("stall_ns_p50"),
            "{row}"
        );
        assert!(
            num("stall_less_run_delay_ns_p99") >= num("stall_less_run_delay_ns_p50"),
            "{row}"
        );
        assert!(num("stall_span_ns_p50") > 0, "{row}");
        for k in [
            "release_ns_p50",
            "stall_before_ns_p50",
            "kvm_ns_p50",
            "mmu_rnic_ns_p50",
            "faults_deferred_p50",
            "faults_untracked_p50",
            "rnic_mr_fenced",
        ] {
            num(k);
        }
        // The parts never add up to more than the whole.
        assert!(
            num("kvm_ns_p50") <= num("complete_ns_p99"),
            "KVM's share above completion: {row}"
        );
        assert!(row["progress_ratio_p50"].as_f64().is_some(), "{row}");
        // The host context, so rows from different machines or settings
        // are not compared blindly.
        assert_eq!(num("vcpus"), 2, "{row}");
        assert_eq!(row["pin_vcpus"], false, "{row}");
        assert_eq!(num("host_cpus"), host_cpus(), "{row}");
        assert_eq!(row["host_damon_running"], kdamond_runs(), "{row}");
    }
    // Two busy vCPUs with no CPU left over are named on stderr.
    if host_cpus() <= 2 {
        assert!(err.contains("note: 2 busy vCPU(s)"), "{err}");
    }
    if kdamond_runs() {
        assert!(err.contains("note: DAMON"), "{err}");
    }
    // Progress is on stderr, one line per repetition.
    let lines = err.lines().filter(|l| l.contains(" rep ")).count();
    assert_eq!(lines, SIZES.len() * METHODS.len() * 5, "{err}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.contains("<svg"),
        "not an SVG"
    );
    for method in METHODS {
        assert!(svg.contains(method), "the plot has no line for {method}");
    }
    std::fs::remove_file(&plot).unwrap();
}

/// With every CPU also wanted by a busy thread of another process, the
/// vCPUs wait runnable for a CPU across the teardown, and the bench says
/// so: the stall's run-delay part is non-zero. (Its wiring from the vCPU
/// threads' scheduler account to the row: a bench that read no account,
/// or the wrong thread's, reports zero here.)
#[test]
fn a_vcpu_kept_off_its_cpu_shows_as_run_delay() {
    if !std::path::Path::new("/proc/thread-self/schedstat").exists() {
        eprintln!("no schedstat on this kernel; nothing to check");
        return;
    }
    // Hogs in their own processes, so the VMM's pinning cannot move them.
    let hogs: Vec<_> = (0..host_cpus())
        .map(|_| {
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        })
        .collect();
    let out = odpvm()
        .args([
            "bench",
            "teardown",
            "--memory",
            "32M",
            "--methods",
            "generation",
            "--mirrors",
            "kvm",
            "--reps",
            "5",
            "--json",
        ])
        .output();
    for mut h in hogs {
        let _ = h.kill();
        let _ = h.wait();
    }
    let out = out.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let row: Value = serde_json::from_slice(&out.stdout).unwrap();
    let num = |k: &str| row[k].as_u64().unwrap_or_else(|| panic!("{k}: {row}"));
    assert!(
        num("stall_run_delay_ns_p50") > 0,
        "no run delay seen: {row}"
    );
    assert!(
        num("stall_run_delay_ns_p50") <= num("stall_ns_p50"),
        "{row}"
    );
}
