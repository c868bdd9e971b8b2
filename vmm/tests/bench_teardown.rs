//! The contract of `odpvm bench teardown --json` that scripts rely on
//! (issue 9 item 2): one JSON object per (size, mirrors, method) row with
//! the documented fields, p99 never below p50, the host context beside the
//! figures, and `--plot` writing an SVG; and the stall's split by the vCPU
//! threads' scheduler account, both ways: a vCPU kept off its CPU shows
//! as run delay, a blocked one as the rest. Real KVM, a real writer guest.

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

/// Whether this process may use `SCHED_FIFO`, tried on a throwaway thread.
fn realtime_permitted() -> bool {
    std::thread::spawn(|| {
        let fifo = libc::sched_param { sched_priority: 1 };
        // SAFETY: pid 0 is this throwaway thread; valid sched_param.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) == 0 }
    })
    .join()
    .unwrap()
}

const SIZES: [u64; 2] = [32 << 20, 64 << 20];
const METHODS: [&str; 3] = ["generation", "invalidate-all", "walk"];

#[test]
fn json_rows_carry_every_documented_field() {
    let _one = one_at_a_time();
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
        assert!(
            num("stall_span_run_delay_ns_p50") >= num("stall_run_delay_ns_p50"),
            "the capped run delay above the span's: {row}"
        );
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
        // The defaults: one vCPU on a CPU of its own, the VMM on the rest.
        assert_eq!(num("vcpus"), 1, "{row}");
        assert_eq!(row["pin_vcpus"], true, "{row}");
        // Where the fault thread and mover ran: beside the lone vCPU
        // wherever there is a CPU to spare and a real-time class.
        let beside = host_cpus() >= 2 && realtime_permitted();
        let want = if beside {
            "beside-vcpu"
        } else {
            "housekeeping"
        };
        assert_eq!(row["helpers"], want, "{row}");
        assert_eq!(num("host_cpus"), host_cpus(), "{row}");
        assert_eq!(row["host_damon_running"], kdamond_runs(), "{row}");
    }
    // The default leaves a CPU to spare wherever there is one, so no note
    // on busy vCPUs or unpinned ones.
    if host_cpus() >= 2 {
        assert!(!err.contains("busy vCPU"), "{err}");
        assert!(!err.contains("not pinned"), "{err}");
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

/// Busy shell loops, one per CPU, killed when dropped (also when the test
/// fails half-way).
struct Hogs(Vec<std::process::Child>);

impl Hogs {
    fn one_per_cpu() -> Hogs {
        let mut hogs = Hogs(Vec::new());
        for _ in 0..host_cpus() {
            // It ends on its own once this process is gone (killed before
            // the drop), checking with a builtin, so it stays CPU-bound.
            let spin = format!(
                "while kill -0 {} 2>/dev/null; do :; done",
                std::process::id()
            );
            let child = Command::new("sh").args(["-c", &spin]).spawn().unwrap();
            hogs.0.push(child);
        }
        hogs
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for h in &mut self.0 {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

/// The tests here run benches that must not overlap: one loads every CPU
/// on purpose, the others measure how vCPUs wait.
static ONE_BENCH_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_BENCH_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn bench_row(args: &[&str]) -> Value {
    let out = odpvm()
        .args(["bench", "teardown", "--reps", "5", "--json"])
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn has_schedstat() -> bool {
    let yes = std::path::Path::new("/proc/thread-self/schedstat").exists();
    if !yes {
        eprintln!("no schedstat on this kernel; nothing to check");
    }
    yes
}

/// With every CPU also wanted by a busy process, the vCPUs wait runnable
/// for a CPU across the teardown, and the bench says so: the stall's
/// run-delay part is non-zero. A bench that read no scheduler account at
/// the marks reports zero here.
#[test]
fn a_vcpu_kept_off_its_cpu_shows_as_run_delay() {
    if !has_schedstat() {
        return;
    }
    let _one = one_at_a_time();
    let row = {
        let _hogs = Hogs::one_per_cpu();
        bench_row(&[
            "--memory",
            "32M",
            "--methods",
            "generation",
            "--mirrors",
            "kvm",
            "--vcpus",
            "2",
            "--pin-vcpus",
            "false",
        ])
    };
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

/// The other direction: a teardown that blocks the guest for its whole
/// O(n) run (`invalidate-all`), one vCPU on a CPU of its own, no hogs: the
/// vCPU is blocked, not waiting for a CPU, so `stall_less_run_delay` is
/// at least half the invalidation's length (a bench counting every stall
/// as run delay fails here).
#[test]
fn a_blocked_vcpu_shows_as_the_rest_not_run_delay() {
    if !has_schedstat() {
        return;
    }
    let _one = one_at_a_time();
    let row = bench_row(&[
        "--memory",
        "64M",
        "--methods",
        "invalidate-all",
        "--mirrors",
        "kvm",
        "--vcpus",
        "1",
        "--pin-vcpus",
    ]);
    let num = |k: &str| row[k].as_u64().unwrap_or_else(|| panic!("{k}: {row}"));
    // The block lasts about as long as the invalidation; preemption by
    // other work on a busy host only adds to the stall, not to this.
    assert!(
        2 * num("stall_less_run_delay_ns_p50") >= num("complete_ns_p50"),
        "a blocking teardown's stall counted as run delay: {row}"
    );
}
