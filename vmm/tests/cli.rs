//! What a user typing flags can do to `odpvm` (issue 11 items 11, 13, 14):
//! one clear line and a non-zero exit, never a panic or a hang.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmm::payload::Guest;

fn odpvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_odpvm"))
}

fn assert_clear_failure(args: &[&str], expect: &str) {
    let out = odpvm().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(expect), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(!err.contains("backtrace"), "{args:?}: {err}");
}

/// Item 13: these panicked (`Duration::from_secs_f64` overflow, the demo's
/// chaos thread adding a huge gap to an Instant).
#[test]
fn huge_durations_are_refused_not_panicked_on() {
    for (args, expect) in [
        (
            &["run", "--guest", "idle", "--timeout", "1e19"][..],
            "too long",
        ),
        (&["run", "--guest", "idle", "--timeout", "1e20"], "too long"),
        (&["run", "--guest", "idle", "--timeout", "inf"], "positive"),
        (&["run", "--guest", "idle", "--timeout", "NaN"], "positive"),
        (&["demo", "--seconds", "1e20"], "too long"),
        (&["demo", "--invalidate-ms", "1e300"], "too long"),
        (&["demo", "--teardown-ms", "1e22"], "too long"),
        (&["demo", "--teardown-ms=-1"], "positive"),
        (
            &["ctl", "--api-sock", "/x", "--timeout", "1e30", "stats"],
            "too long",
        ),
    ] {
        assert_clear_failure(args, expect);
    }
}

/// Item 14: `--initrd`/`--cmdline` without `--kernel` were silently
/// ignored.
#[test]
fn linux_only_flags_need_a_kernel() {
    // (--timeout: before the fix the idle guest simply ran.)
    for flag in [
        ["--cmdline", "console=ttyS0"],
        ["--initrd", "/etc/hostname"],
    ] {
        let mut args = vec!["run", "--guest", "idle", "--timeout", "5"];
        args.extend(flag);
        assert_clear_failure(&args, "--kernel");
    }
}

/// Item 14: `--guest`'s help listed 4 of the built-in guests.
#[test]
fn guest_help_lists_every_guest() {
    let out = odpvm().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for g in Guest::ALL {
        assert!(
            help.contains(g.name()),
            "{} missing from:\n{help}",
            g.name()
        );
    }
}

/// Item 13: `demo --invalidate-ms 1e9` slept 23 days in its chaos thread,
/// which the demo joined.
#[test]
fn a_long_invalidation_gap_does_not_keep_the_demo_from_ending() {
    let mut child = odpvm()
        .args(["demo", "--seconds", "1", "--memory", "64M", "--json"])
        .args(["--invalidate-ms", "1e9", "--teardown-ms", "1e9"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(150) {
            let _ = child.kill();
            panic!("the demo did not end");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// Run odpvm with `args`, read its first line of output, then close the
/// pipe (the reader is gone) and wait for it to end.
fn first_line_then_close(args: &[&str]) -> (String, std::process::Output) {
    let mut child = odpvm()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    (first, child.wait_with_output().unwrap())
}

/// Item 13: `odpvm demo | head -1` panicked with "Broken pipe".
#[test]
fn a_closed_stdout_stops_the_demo_cleanly() {
    let t0 = Instant::now();
    let (first, out) = first_line_then_close(&["demo", "--seconds", "20", "--memory", "64M"]);
    assert!(first.starts_with("odpvm demo"), "{first}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("standard output is closed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
}

/// The same for a benchmark's rows (`odpvm bench teardown --json | head -1`
/// panicked with "failed printing to stdout").
#[test]
fn a_closed_stdout_stops_a_bench_cleanly() {
    let (first, out) = first_line_then_close(&[
        "bench",
        "teardown",
        "--memory",
        "32M,64M",
        "--methods",
        "generation",
        "--mirrors",
        "kvm",
        "--json",
    ]);
    assert!(first.contains("\"bench\":\"teardown\""), "{first}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("standard output is closed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Item 11: without enough free huge pages a hugetlbfs VM started anyway
/// (MAP_NORESERVE hid the shortage) and its vCPU faulted forever.
#[test]
fn hugetlbfs_without_enough_huge_pages_is_a_clear_error() {
    let free = vmm::memory::free_huge_pages();
    let memory = ((free + 16) * (2 << 20)).to_string();
    let out = odpvm()
        .args([
            "run",
            "--guest",
            "touch",
            "--backing",
            "hugetlbfs",
            "--vcpus",
            "1",
        ])
        .args(["--memory", &memory, "--timeout", "20"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("huge pages"), "{err}");
    assert!(err.contains("nr_hugepages"), "{err}");
}

/// `--pin-vcpus [true|false]` and `--helpers` on `run` (and `bench
/// teardown`, whose pinning is on by default): bad values are one clear
/// line, and a lone pinned vCPU runs with either helper placement.
#[test]
fn pinning_flags_take_explicit_values_and_refuse_bad_ones() {
    assert_clear_failure(
        &["run", "--guest", "touch", "--helpers", "nowhere"],
        "unknown helper placement",
    );
    assert_clear_failure(
        &["run", "--guest", "touch", "--pin-vcpus", "maybe"],
        "possible values: true, false",
    );
    assert_clear_failure(
        &["bench", "teardown", "--pin-vcpus", "yes"],
        "possible values: true, false",
    );
    // Placing helpers among unpinned threads would be silently ignored.
    assert_clear_failure(
        &["run", "--guest", "touch", "--helpers", "housekeeping"],
        "only with --pin-vcpus",
    );
    assert_clear_failure(
        &[
            "bench",
            "teardown",
            "--pin-vcpus=false",
            "--helpers",
            "beside-vcpu",
        ],
        "only with --pin-vcpus",
    );
    // The plan the VMM logs says where the helpers went.
    let cpus = vmm::affinity::allowed_cpus().unwrap();
    for (extra, placed) in [
        (&["--pin-vcpus"][..], None),
        (
            &["--pin-vcpus", "true", "--helpers", "housekeeping"],
            Some(false),
        ),
        (&["--pin-vcpus=false"], None),
    ] {
        let out = odpvm()
            .args(["run", "--guest", "touch", "--vcpus", "1", "--memory", "16M"])
            .args(extra)
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {err}");
        if placed == Some(false) && cpus.len() >= 2 {
            // Housekeeping: the other CPUs, not the vCPU's.
            let want = format!("the fault thread and teardown moves on {:?}", &cpus[1..]);
            assert!(err.contains(&want), "{extra:?}: {err}");
        }
        if extra == ["--pin-vcpus=false"] {
            assert!(!err.contains("CPU pinning"), "{err}");
        }
    }
}
