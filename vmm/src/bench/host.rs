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

use std::path::Path;

/// The host conditions a latency benchmark reports beside its figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostContext {
    /// CPUs this process may run on.
    pub cpus: usize,
    /// Whether a DAMON monitor is running (sysfs admin interface, or the
    /// `damon_reclaim` / `damon_lru_sort` modules).
    pub damon_running: bool,
}

impl HostContext {
    pub fn read() -> HostContext {
        HostContext {
            cpus: crate::affinity::process_cpus().map_or(0, |c| c.len()),
            damon_running: damon_running(Path::new("/sys")),
        }
    }

    /// Plain-language notes on what in this host will show in the stall
    /// figures of a VM with `vcpus` busy vCPUs.
    pub fn notes(&self, vcpus: usize, pinned: bool) -> Vec<String> {
        let mut out = Vec::new();
        if self.cpus > 0 && vcpus >= self.cpus {
            let spare = if self.cpus > 1 {
                format!(
                    "; `--vcpus {} --pin-vcpus` leaves one for them",
                    self.cpus - 1
                )
            } else {
                String::new()
            };
            out.push(format!(
                "{vcpus} busy vCPU(s) on {} CPU(s) leave none for the VMM's other threads or the host's: \
                 whatever else runs takes a vCPU's CPU, and the longer a teardown's window the more of that \
                 its stall catches (compare stall_before_ns_p50){spare}",
                self.cpus
            ));
        } else if !pinned {
            out.push(
                "vCPUs are not pinned: the scheduler may put the VMM's threads or another vCPU on a vCPU's CPU \
                 (`--pin-vcpus` gives each vCPU a CPU of its own)"
                    .to_string(),
            );
        }
        if self.damon_running {
            out.push(
                "DAMON is monitoring this host's memory (kdamond): each of its runs takes a CPU for \
                 milliseconds, and a vCPU waiting on a fault or a lock meanwhile may wait for it too"
                    .to_string(),
            );
        }
        out
    }
}

/// Whether any DAMON monitor runs, from the sysfs tree under `sys`.
fn damon_running(sys: &Path) -> bool {
    let kdamonds = sys.join("kernel/mm/damon/admin/kdamonds");
    let admin = std::fs::read_dir(kdamonds)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read_to_string(e.path().join("state")).is_ok_and(|s| s.trim() == "on"));
    let module = ["damon_reclaim", "damon_lru_sort"].iter().any(|m| {
        std::fs::read_to_string(sys.join("module").join(m).join("parameters/enabled"))
            .is_ok_and(|s| s.trim() == "Y")
    });
    admin || module
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn damon_is_seen_through_the_admin_tree_or_a_module() {
        let dir = std::env::temp_dir().join(format!("odpvm-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!damon_running(&dir), "no sysfs tree: not running");
        write(&dir, "kernel/mm/damon/admin/kdamonds/0/state", "off\n");
        write(&dir, "kernel/mm/damon/admin/kdamonds/nr_kdamonds", "1\n");
        assert!(!damon_running(&dir), "a stopped kdamond");
        write(&dir, "kernel/mm/damon/admin/kdamonds/0/state", "on\n");
        assert!(damon_running(&dir));
        write(&dir, "kernel/mm/damon/admin/kdamonds/0/state", "off\n");
        write(&dir, "module/damon_reclaim/parameters/enabled", "N\n");
        assert!(!damon_running(&dir));
        write(&dir, "module/damon_reclaim/parameters/enabled", "Y\n");
        assert!(damon_running(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notes_name_an_oversubscribed_host_and_how_to_leave_a_core() {
        let host = HostContext {
            cpus: 2,
            damon_running: false,
        };
        let notes = host.notes(2, false);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("--vcpus 1 --pin-vcpus"), "{notes:?}");
        assert!(host.notes(1, true).is_empty());
        let unpinned = host.notes(1, false);
        assert!(unpinned[0].contains("--pin-vcpus"), "{unpinned:?}");
        let one = HostContext {
            cpus: 1,
            damon_running: true,
        };
        let notes = one.notes(1, false);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(!notes[0].contains("--vcpus 0"), "{notes:?}");
        assert!(notes[1].contains("DAMON"), "{notes:?}");
    }
}
