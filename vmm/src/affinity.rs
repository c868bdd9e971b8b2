//! CPU pinning (`--pin-vcpus`): each vCPU on a CPU of its own, the VMM's
//! other threads (fault handling, teardown moves, release, devices) on the
//! CPUs left over, as libvirt's `vcpupin` and `emulatorpin` do.
//!
//! Why: a teardown's O(n) kernel work runs beside the guest, on threads
//! that must preempt something. Unpinned, the scheduler often stacks both
//! vCPUs of a 2-vCPU guest on one core, and a real-time teardown thread
//! wakes on its last CPU and preempts the vCPU there even while another
//! core idles (the kernel places a waking `SCHED_FIFO` thread by priority,
//! not by idleness). Traced with `perf sched` on the development host: a
//! 1-vCPU guest lost 1.4 ms that way with a core idle. With a spare CPU for
//! the VMM, vCPUs then wait only for what they truly share (the mmap lock,
//! a fault being served). Test: `tests::a_plan_keeps_vcpus_off_the_housekeeping_cpus`
//! and `vmm/tests/pinning.rs::pinned_vcpus_run_on_their_own_cpus`.
//!
//! The threads a vCPU *waits on* are the exception (`CpuPlan::waited_on`):
//! the fault thread (a vCPU sleeps in `handle_userfault` until it has
//! served the page) and a teardown's page moves (a vCPU refault queues on
//! the mmap lock each move holds for writing). While a vCPU waits for one
//! of them on another CPU, its own CPU idles, and the kernel places waking
//! host work on idle CPUs first; on a `PREEMPT_NONE` kernel that work then
//! keeps the CPU for milliseconds after the vCPU could run again (traced:
//! DAMON's `kdamond`, per-CPU kworkers). With one pinned vCPU those threads
//! run on the vCPU's own CPU (`Helpers::BesideVcpu`): while it waits, the
//! thread it waits for runs there, so the CPU seldom idles and the host's
//! work goes to the housekeeping CPU. (It still idles when the mover has
//! to sleep for the mmap lock, behind the releaser's read hold when a
//! teardown follows the last one before its memory is given back, and a
//! vCPU refault queues behind the mover meanwhile.)
//! `odpvm bench teardown` (one pinned vCPU, `generation`, `kvm+rnic`) gives
//! the A/B against `--helpers housekeeping` in README; in the runs of the
//! development session the stall p50 stayed 0.37–0.55 ms at 256 MiB and
//! 4 GiB (it had grown to 0.9–1.9 ms at 4 GiB with the helpers on the
//! housekeeping CPU). With several vCPUs a
//! helper can sit on one vCPU's CPU only, and would preempt that vCPU while
//! another one waits with its CPU idle, so they stay on the housekeeping
//! CPUs. Test: `vmm/tests/pinning.rs::pinned_vcpus_run_on_their_own_cpus`,
//! and for stale-freedom with this placement
//! `a_lone_pinned_vcpu_keeps_stamped_pages_across_teardowns`.
//!
//! Limit: plans are per VM over the process's CPUs. Two pinned VMs in one
//! process plan over the same CPUs, and the second moves the first's
//! threads (its fault thread included) to its own housekeeping CPUs.

/// Which CPUs each vCPU and the VMM's other threads run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuPlan {
    /// vCPU `i` runs on `vcpu[i]`.
    pub vcpu: Vec<usize>,
    /// Every other thread of the process (all allowed CPUs when no CPU is
    /// left over: then nothing is gained, and nothing is starved).
    pub housekeeping: Vec<usize>,
    /// The threads a vCPU waits on (the fault thread, a teardown's page
    /// moves): the vCPU's own CPU when there is one vCPU and a CPU to
    /// spare, else the housekeeping CPUs (see the module's header).
    pub waited_on: Vec<usize>,
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    cpus_of(0)
}

/// The CPUs the process could use before any VM pinned its threads (read
/// once): a second VM plans over the same CPUs as the first, not over the
/// housekeeping CPUs the first one left its caller on.
pub fn process_cpus() -> std::io::Result<Vec<usize>> {
    static FIRST: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    if let Some(cpus) = FIRST.get() {
        return Ok(cpus.clone());
    }
    let cpus = allowed_cpus()?;
    Ok(FIRST.get_or_init(|| cpus).clone())
}

/// The CPUs thread `tid` (0: the calling thread) may run on.
pub fn cpus_of(tid: libc::pid_t) -> std::io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid out-buffer of the size passed; any tid may
    // be asked (the kernel checks it).
    let rc = unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE, the set's capacity.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect())
}

/// Spread `vcpus` vCPUs over `allowed`, one per CPU while they last; the
/// CPUs left over are for the VMM's own threads.
pub fn plan(vcpus: usize, allowed: &[usize]) -> Option<CpuPlan> {
    if allowed.is_empty() || vcpus == 0 {
        return None;
    }
    let vcpu: Vec<usize> = (0..vcpus).map(|i| allowed[i % allowed.len()]).collect();
    let housekeeping = if allowed.len() > vcpus {
        allowed[vcpus..].to_vec()
    } else {
        allowed.to_vec()
    };
    let waited_on = if vcpus == 1 && allowed.len() > 1 {
        vcpu.clone()
    } else {
        housekeeping.clone()
    };
    Some(CpuPlan {
        vcpu,
        housekeeping,
        waited_on,
    })
}

/// Where the threads a vCPU waits on run under `--pin-vcpus`
/// (`--helpers`): beside a lone vCPU (the default), or with the VMM's
/// other threads (the placement before, kept to compare against).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Helpers {
    #[default]
    BesideVcpu,
    Housekeeping,
}

impl Helpers {
    pub fn name(self) -> &'static str {
        match self {
            Helpers::BesideVcpu => "beside-vcpu",
            Helpers::Housekeeping => "housekeeping",
        }
    }
}

impl std::str::FromStr for Helpers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "beside-vcpu" => Ok(Helpers::BesideVcpu),
            "housekeeping" => Ok(Helpers::Housekeeping),
            _ => Err(format!(
                "unknown helper placement {s:?} (beside-vcpu, housekeeping)"
            )),
        }
    }
}

impl CpuPlan {
    /// The plan with the threads a vCPU waits on placed as `helpers` says.
    pub fn with_helpers(mut self, helpers: Helpers) -> CpuPlan {
        if helpers == Helpers::Housekeeping {
            self.waited_on = self.housekeeping.clone();
        }
        self
    }

    /// Where the threads a vCPU waits on actually run under this plan.
    pub fn helpers(&self) -> Helpers {
        if self.waited_on == self.vcpu && self.housekeeping != self.vcpu {
            Helpers::BesideVcpu
        } else {
            Helpers::Housekeeping
        }
    }
}

/// The calling thread restricted to some CPUs until this is dropped; then
/// it gets back the CPUs it had.
pub struct PinnedFor {
    before: Vec<usize>,
}

impl PinnedFor {
    /// Restrict the calling thread to `cpus` (None, with a debug log, when
    /// the kernel refuses: the work then runs where the thread was).
    pub fn enter(cpus: &[usize]) -> Option<PinnedFor> {
        let before = allowed_cpus().ok()?;
        match pin(0, cpus) {
            Ok(()) => Some(PinnedFor { before }),
            Err(e) => {
                log::debug!("pinning to {cpus:?}: {e}");
                None
            }
        }
    }
}

impl Drop for PinnedFor {
    fn drop(&mut self) {
        if let Err(e) = pin(0, &self.before) {
            log::warn!("giving a thread back its CPUs {:?}: {e}", self.before);
        }
    }
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no arguments.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

/// Restrict thread `tid` (0: the calling thread) to `cpus`.
pub fn pin(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
    let set = cpu_set(cpus);
    // SAFETY: `set` is a valid, initialised cpu_set_t of the size passed;
    // a thread of this process (or 0) is named.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Restrict the thread `handle` runs to `cpus`. Through its pthread
/// handle, which names that thread until it is joined (a kernel thread id
/// may name another thread once it has ended); an ended thread is `ESRCH`.
pub fn pin_thread<T>(handle: &std::thread::JoinHandle<T>, cpus: &[usize]) -> std::io::Result<()> {
    use std::os::unix::thread::JoinHandleExt;
    let set = cpu_set(cpus);
    // SAFETY: the pthread_t comes from a JoinHandle we hold (not joined,
    // not detached), so it is valid; `set` is an initialised cpu_set_t of
    // the size passed.
    let rc = unsafe {
        libc::pthread_setaffinity_np(handle.as_pthread_t(), std::mem::size_of_val(&set), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `c` is below CPU_SETSIZE, the set's capacity.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// Move every thread of the process to `cpus`. Threads they start later
/// inherit it; a vCPU thread then pins itself to its own CPU. A thread
/// that ended meanwhile is skipped, and one the kernel will not move
/// (another cpuset, `SCHED_DEADLINE`) is left where it is, with a warning.
pub fn pin_process(cpus: &[usize]) -> std::io::Result<()> {
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        match pin(tid, cpus) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => log::warn!("thread {tid} keeps its CPUs: {e}"),
            Ok(()) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_keeps_vcpus_off_the_housekeeping_cpus() {
        let p = plan(2, &[0, 1, 2, 3]).unwrap();
        assert_eq!(p.vcpu, vec![0, 1]);
        assert_eq!(p.housekeeping, vec![2, 3]);
        assert_eq!(p.waited_on, vec![2, 3], "several vCPUs: helpers stay off");
        let p = plan(1, &[4, 7]).unwrap();
        assert_eq!((p.vcpu, p.housekeeping), (vec![4], vec![7]));
        assert_eq!(p.waited_on, vec![4], "one vCPU: its helpers on its CPU");
        // No CPU left over: vCPUs share round-robin, the VMM floats.
        let p = plan(3, &[0, 1]).unwrap();
        assert_eq!((p.vcpu, p.housekeeping), (vec![0, 1, 0], vec![0, 1]));
        assert_eq!(p.waited_on, vec![0, 1]);
        let p = plan(1, &[5]).unwrap();
        assert_eq!((p.vcpu, p.waited_on), (vec![5], vec![5]));
        assert_eq!(plan(1, &[4, 7]).unwrap().helpers(), Helpers::BesideVcpu);
        let p = plan(1, &[4, 7])
            .unwrap()
            .with_helpers(Helpers::Housekeeping);
        assert_eq!(p.waited_on, vec![7], "the placement to compare against");
        assert_eq!(p.helpers(), Helpers::Housekeeping);
        // Asked for, but nowhere to put them apart: said as it is.
        assert_eq!(plan(1, &[5]).unwrap().helpers(), Helpers::Housekeeping);
        assert_eq!(plan(2, &[0, 1]).unwrap().helpers(), Helpers::Housekeeping);
        for h in [Helpers::BesideVcpu, Helpers::Housekeeping] {
            assert_eq!(h.name().parse::<Helpers>(), Ok(h));
        }
        assert!("vcpu".parse::<Helpers>().is_err());
        assert_eq!(plan(0, &[0]), None);
        assert_eq!(plan(1, &[]), None);
    }

    #[test]
    fn pinning_takes_effect_and_is_undone() {
        std::thread::spawn(|| {
            let all = allowed_cpus().unwrap();
            pin(0, &all[..1]).unwrap();
            assert_eq!(allowed_cpus().unwrap(), all[..1]);
            pin(0, &all).unwrap();
            assert_eq!(allowed_cpus().unwrap(), all);
            {
                let _on = PinnedFor::enter(&all[all.len() - 1..]).unwrap();
                assert_eq!(allowed_cpus().unwrap(), all[all.len() - 1..]);
                assert_eq!(current_cpu(), Some(all[all.len() - 1]));
            }
            assert_eq!(allowed_cpus().unwrap(), all, "given back on drop");
        })
        .join()
        .unwrap();
    }
}
