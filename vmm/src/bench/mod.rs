//! `odpvm bench`: measured figures, one JSON object per line with --json.
//! One file per benchmark: `faults` (first-touch fault cost, fault-around,
//! start-up), `rnic` (the emulated RNIC), `teardown` (whole-VM teardown
//! latency against memory size).

mod faults;
pub mod host;
mod plot;
mod rnic;
pub mod teardown;

pub use faults::faults;
pub use rnic::{rnic, RnicBench};
pub use teardown::{teardown, TeardownBench};

use crate::devices::serial::Sink;
use crate::payload::Guest;
use crate::vm::{GuestConfig, VmConfig};
use serde_json::Value;

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

/// Print one row; Err once stdout is closed (`odpvm bench … | head -1`),
/// which ends the benchmark with one clear line instead of a panic.
fn emit(json_out: bool, v: &Value) -> Result<(), String> {
    let text = if json_out {
        v.to_string()
    } else {
        let o = v.as_object().expect("rows are objects");
        let parts: Vec<String> = o.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.join(" ")
    };
    crate::cli::output::line(text).map_err(|e| e.to_string())
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
