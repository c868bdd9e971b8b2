//! What a benchmark should say about the host it ran on: the conditions
//! that put scheduling noise into latency figures, so a reader can tell
//! the host's share from the design's.
//!
//! A teardown's window grows with memory (KVM's zap of the moved pages is
//! O(n) inside the kernel), and the guest stall is the longest step over
//! that window: anything else that takes a vCPU's CPU for a few
//! milliseconds anywhere in the window shows in it. Two such conditions
//! are cheap to detect and were each traced as the cause of multi-ms
//! stalls on the development host (`perf record -e sched:sched_switch`):
//! no CPU left over for anything but busy vCPUs, and DAMON's `kdamond`
//! monitoring memory (its runs take a CPU for 1–4 ms, non-preemptibly on
//! a kernel without full preemption).
//!
//! Tests: `bench::host::tests` (the proc scan, the notes) and
//! `vmm/tests/bench_teardown.rs` (the fields in every row, checked against
//! an independent scan).

use std::path::Path;

/// The host conditions a latency benchmark reports beside its figures;
/// `None` where this process could not tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostContext {
    /// CPUs this process may run on.
    pub cpus: Option<usize>,
    /// Whether a DAMON worker (`kdamond.N`) runs, whichever interface
    /// started it (sysfs, a module, `damon_stat`, debugfs): read from
    /// `/proc/*/comm`, which any user may read.
    pub damon_running: Option<bool>,
}

impl HostContext {
    pub fn read() -> HostContext {
        HostContext {
            cpus: crate::affinity::process_cpus().ok().map(|c| c.len()),
            damon_running: kdamond_running(Path::new("/proc")),
        }
    }

    /// Plain-language notes on what in this host will show in the stall
    /// figures of a VM with `vcpus` busy vCPUs.
    pub fn notes(&self, vcpus: usize, pinned: bool) -> Vec<String> {
        let mut out = Vec::new();
        match self.cpus {
            Some(cpus) if vcpus >= cpus => {
                let spare = if cpus > 1 {
                    format!("; `--vcpus {} --pin-vcpus` leaves one for them", cpus - 1)
                } else {
                    String::new()
                };
                out.push(format!(
                    "{vcpus} busy vCPU(s) on {cpus} CPU(s) leave none for the VMM's other threads or the host's: \
                     whatever else runs takes a vCPU's CPU, and the longer a teardown's window the more of that \
                     its stall catches (compare stall_before_ns_p50){spare}"
                ));
            }
            _ if !pinned => out.push(
                "vCPUs are not pinned: the scheduler may put the VMM's threads or another vCPU on a vCPU's CPU \
                 (`--pin-vcpus` gives each vCPU a CPU of its own)"
                    .to_string(),
            ),
            _ => {}
        }
        if self.damon_running == Some(true) {
            out.push(
                "DAMON is monitoring this host's memory (kdamond): each of its runs takes a CPU for \
                 milliseconds, and a vCPU waiting on a fault or a lock meanwhile may wait for it too"
                    .to_string(),
            );
        }
        out
    }
}

/// Whether a `kdamond` thread runs, from the proc tree under `proc`
/// (`None` if it cannot be read).
pub fn kdamond_running(proc: &Path) -> Option<bool> {
    let entries = std::fs::read_dir(proc).ok()?;
    Some(entries.flatten().any(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            && std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with("kdamond"))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kdamond_is_found_by_its_name_in_proc() {
        let dir = std::env::temp_dir().join(format!("odpvm-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(kdamond_running(&dir), None, "no proc tree: unknown");
        let comm = |pid: &str, name: &str| {
            std::fs::create_dir_all(dir.join(pid)).unwrap();
            std::fs::write(dir.join(pid).join("comm"), format!("{name}\n")).unwrap();
        };
        comm("1", "init");
        comm("self", "kdamond.0");
        assert_eq!(
            kdamond_running(&dir),
            Some(false),
            "only numeric entries count"
        );
        comm("76", "kdamond.0");
        assert_eq!(kdamond_running(&dir), Some(true));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notes_name_an_oversubscribed_host_and_how_to_leave_a_core() {
        let host = HostContext {
            cpus: Some(2),
            damon_running: Some(false),
        };
        let notes = host.notes(2, false);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("--vcpus 1 --pin-vcpus"), "{notes:?}");
        assert!(host.notes(1, true).is_empty());
        let unpinned = host.notes(1, false);
        assert!(unpinned[0].contains("--pin-vcpus"), "{unpinned:?}");
        let one = HostContext {
            cpus: Some(1),
            damon_running: Some(true),
        };
        let notes = one.notes(1, false);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(!notes[0].contains("--vcpus 0"), "{notes:?}");
        assert!(notes[1].contains("DAMON"), "{notes:?}");
        let unknown = HostContext {
            cpus: None,
            damon_running: None,
        };
        assert_eq!(unknown.notes(4, true), Vec::<String>::new());
    }
}
