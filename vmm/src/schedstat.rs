//! A thread's scheduler account (`/proc/thread-self/schedstat`): how long
//! it has run on a CPU and how long it has waited runnable for one.
//!
//! Why: a vCPU's page step that took milliseconds is either spent blocked
//! (on a fault, a lock) or working (inside KVM), or spent ready while
//! another task held its CPU: another process, a kernel thread, or kernel
//! work the VMM itself set off. The teardown bench tells the two apart by
//! reading this account at each progress mark. Tests:
//! `tests::a_thread_kept_off_its_cpu_accrues_run_delay`,
//! `devices::testdev` `marks_carry_the_writing_threads_run_delay`.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Cumulative scheduler times of one thread, in ns since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedAccount {
    /// Time on a CPU.
    pub on_cpu_ns: u64,
    /// Time runnable but waiting for a CPU (preempted or not yet picked).
    pub run_delay_ns: u64,
}

impl SchedAccount {
    /// The calling thread's account; `None` if the kernel keeps none
    /// (built without `CONFIG_SCHED_INFO`) or `/proc` is not mounted.
    pub fn of_this_thread() -> Option<SchedAccount> {
        thread_local! {
            // Opened once per thread: the open file keeps naming the thread
            // that opened it, and each `pread` renders it afresh (~2 µs,
            // against ~5 µs for open+read+close). A failed open stays
            // `None` for the thread's life: its marks then carry no account.
            static FILE: Option<File> = File::open("/proc/thread-self/schedstat").ok();
        }
        FILE.with(|f| {
            let mut buf = [0u8; 96];
            let n = f.as_ref()?.read_at(&mut buf, 0).ok()?;
            parse(std::str::from_utf8(&buf[..n]).ok()?)
        })
    }

    /// What accrued between `earlier` and `self`.
    pub fn since(&self, earlier: &SchedAccount) -> SchedAccount {
        SchedAccount {
            on_cpu_ns: self.on_cpu_ns.saturating_sub(earlier.on_cpu_ns),
            run_delay_ns: self.run_delay_ns.saturating_sub(earlier.run_delay_ns),
        }
    }
}

/// `"<on cpu ns> <run delay ns> <timeslices>\n"`.
fn parse(text: &str) -> Option<SchedAccount> {
    let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u64>().ok());
    Some(SchedAccount {
        on_cpu_ns: fields.next()??,
        run_delay_ns: fields.next()??,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format_and_refuses_garbage() {
        assert_eq!(
            parse("206558 86048 1\n"),
            Some(SchedAccount {
                on_cpu_ns: 206558,
                run_delay_ns: 86048
            })
        );
        assert_eq!(parse(""), None);
        assert_eq!(parse("12"), None);
        assert_eq!(parse("x 1 2"), None);
    }

    /// Two threads pinned to one CPU and both spinning: each waits for the
    /// other, so each accrues run delay about as long as it runs; a thread
    /// alone on its CPU would accrue almost none.
    #[test]
    fn a_thread_kept_off_its_cpu_accrues_run_delay() {
        if SchedAccount::of_this_thread().is_none() {
            eprintln!("no schedstat on this kernel; nothing to check");
            return;
        }
        let cpu = crate::affinity::allowed_cpus().unwrap()[0];
        let spin = move || {
            crate::affinity::pin(0, &[cpu]).unwrap();
            let begin = SchedAccount::of_this_thread().unwrap();
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_millis(300) {
                std::hint::spin_loop();
            }
            SchedAccount::of_this_thread().unwrap().since(&begin)
        };
        let a = std::thread::spawn(spin);
        let b = std::thread::spawn(spin);
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        for d in [a, b] {
            assert!(d.on_cpu_ns > 20_000_000, "{d:?}");
            assert!(d.run_delay_ns > 20_000_000, "{d:?}");
        }
    }
}
