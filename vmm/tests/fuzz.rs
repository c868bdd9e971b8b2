//! The bounded, deterministic fuzzing run of the paravirtual RNIC (issue
//! 11, "fuzzing that reaches the state space"): the checked-in corpus
//! (`fuzz/seeds/rnic_device`) and a fixed set of seeded structure-aware
//! inputs through `vmm::devices::rnic::fuzz`, with overflow checks on.
//! Longer, coverage-guided runs: `cargo +nightly fuzz run rnic_device` in
//! `fuzz/`.

mod common;

use common::{rss_kib, thread_cpu};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmm::devices::rnic::fuzz::{harness, seeded_input, RunStats};

/// Seeded inputs per run (a second or two on the development host).
const SEEDED: u64 = 1000;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/rnic_device");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

/// Every input: no crash (guard pages, overflow checks), every WQE the
/// device took finishes within the bound, per-QP state stays bounded;
/// over the run most WQEs reach the data path, invalidations and
/// teardowns are interleaved, memory stays flat, and the device thread
/// sleeps once the guest stops.
#[test]
fn fuzzing_the_device_keeps_liveness_bounds_and_cpu() {
    let h = harness();
    let mut total = RunStats::default();
    let mut add = |s: RunStats| {
        total.wqes_rung += s.wqes_rung;
        total.wqes_ok += s.wqes_ok;
        total.invalidations += s.invalidations;
        total.teardowns += s.teardowns;
    };
    let t0 = Instant::now();
    let files = corpus();
    assert!(!files.is_empty(), "the corpus is empty");
    for (name, data) in &files {
        add(h.run(data).unwrap_or_else(|v| panic!("{name}: {v}")));
    }
    let rss_warm = rss_kib();
    for seed in 0..SEEDED {
        let len = 64 + (seed as usize * 37) % 1500;
        let data = seeded_input(seed, len);
        add(h.run(&data).unwrap_or_else(|v| panic!("seed {seed}: {v}")));
    }
    let wall = t0.elapsed();
    let rss_end = rss_kib();
    let inputs = files.len() as u64 + SEEDED;
    println!(
        "fuzzed {inputs} inputs in {:.1}s: {} WQEs rung, {} completed OK, {} invalidations, {} teardowns; RSS {} → {} KiB",
        wall.as_secs_f64(),
        total.wqes_rung,
        total.wqes_ok,
        total.invalidations,
        total.teardowns,
        rss_warm,
        rss_end
    );
    // Structure-aware: a good share of the WQEs moves data.
    assert!(
        total.wqes_ok * 5 >= total.wqes_rung,
        "only {} of {} WQEs completed OK",
        total.wqes_ok,
        total.wqes_rung
    );
    assert!(total.invalidations > 0 && total.teardowns > 0);
    // (No stale-stamp check: the fuzzer WRITEs arbitrary guest bytes into
    // the host window, which the stamp check cannot tell from stale data.)
    assert!(
        rss_end < rss_warm + 64 * 1024,
        "RSS grew from {rss_warm} to {rss_end} KiB"
    );
    // Idle afterwards (whatever the last input left waiting): the device
    // thread sleeps.
    let cpu0 = thread_cpu("fuzz-rnic-dev");
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let cpu = thread_cpu("fuzz-rnic-dev") - cpu0;
    let idle = t1.elapsed().as_secs_f64();
    println!("idle {idle:.2}s: device thread {cpu:.3} CPU s");
    assert!(
        cpu < 0.1 * idle,
        "device thread used {cpu:.3} s of {idle:.2} s idle"
    );
}
