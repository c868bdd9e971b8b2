//! `--pin-vcpus` (`vmm/src/affinity.rs`): each vCPU thread runs on a CPU of
//! its own and every other thread of the VMM on the CPUs left over, except
//! those a lone vCPU waits on (the fault thread, a teardown's page moves),
//! which run on its CPU. A binary
//! of its own: pinning moves every thread of the process.

mod common;

use std::time::{Duration, Instant};
use vmm::devices::serial::Sink;
use vmm::payload::Guest;
use vmm::vm::{GuestConfig, RnicChoice, RunReport, Vm, VmConfig};

fn affinity_of(tid: libc::pid_t) -> Vec<usize> {
    vmm::affinity::cpus_of(tid).expect("sched_getaffinity")
}

/// (name, tid) of every thread of this process.
fn threads() -> Vec<(String, libc::pid_t)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let tid: libc::pid_t = e.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            Some((comm.trim().to_string(), tid))
        })
        .collect()
}

/// The tests here look at every thread of the process: one VM at a time.
static ONE_VM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Twice in one process: the second VM plans over the CPUs the process
/// had, not over the housekeeping CPUs the first left its caller on.
#[test]
fn pinned_vcpus_run_on_their_own_cpus() {
    let _one = one_at_a_time();
    // The CPUs the process had before any VM pinned it (another test here
    // may have run a pinned VM already).
    let allowed = vmm::affinity::process_cpus().unwrap();
    let plan = vmm::affinity::plan(1, &allowed).unwrap();
    for _ in 0..2 {
        one_pinned_vm(&allowed, &plan);
    }
}

fn one_pinned_vm(allowed: &[usize], plan: &vmm::affinity::CpuPlan) {
    let cfg = VmConfig {
        guest: GuestConfig::Builtin(Guest::Writer),
        memory: 64 << 20,
        vcpus: 1,
        rounds: 0,
        rnic: RnicChoice::None,
        pin_vcpus: true,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(cfg).expect("building the VM (is /dev/kvm usable?)");
    let h = vm.handle();
    vm.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let vcpu = loop {
        if let Some((_, tid)) = threads().into_iter().find(|(n, _)| n == "odpvm-vcpu0") {
            break tid;
        }
        assert!(Instant::now() < deadline, "no vCPU thread");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Let it run past its own pinning.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(affinity_of(vcpu), vec![plan.vcpu[0]], "the vCPU on its CPU");
    // KVM's own workers (`kvm-nx-lpage-recovery`) are threads of the
    // process too, started by the vCPU thread: they follow it.
    let others: Vec<_> = threads()
        .into_iter()
        .filter(|(n, t)| *t != vcpu && !n.starts_with("kvm-"))
        .collect();
    assert!(
        others.iter().any(|(n, _)| n == "odpvm-fault"),
        "the fault thread is among them: {others:?}"
    );
    for (name, tid) in others {
        // The thread every vCPU fault waits on goes where the plan puts
        // the threads a vCPU waits on: its CPU, with one vCPU.
        let want = if name == "odpvm-fault" {
            &plan.waited_on
        } else {
            &plan.housekeeping
        };
        assert_eq!(affinity_of(tid), *want, "thread {name} ({tid})");
    }
    // A teardown's page moves run there too, and the thread that asked
    // gets its CPUs back.
    let mine = affinity_of(0);
    h.teardown().expect("teardown");
    let parts = h.take_teardown_parts();
    assert!(parts.retire_ns > 0, "moved in place: {parts:?}");
    assert!(
        parts.mover_cpu.is_some_and(|c| plan.waited_on.contains(&c)),
        "moves on {:?}, plan {:?}",
        parts.mover_cpu,
        plan.waited_on
    );
    assert_eq!(affinity_of(0), mine, "the caller's CPUs given back");
    if allowed.len() > 1 {
        assert!(
            !plan.housekeeping.contains(&plan.vcpu[0]),
            "with a CPU to spare, the VMM's threads stay off the vCPU's"
        );
        assert_eq!(plan.waited_on, plan.vcpu, "one vCPU: helpers on its CPU");
    }
    h.request_stop();
    let r = vm.wait(Some(Duration::from_secs(60)));
    assert_eq!(r.guest_result, "pass", "{r:?}");
}

fn field(r: &RunReport, name: &str) -> u64 {
    r.vcpu_reports[0][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {r:?}"))
}

/// The placement `--pin-vcpus` gives a lone vCPU (its fault thread and the
/// teardown's mover on its own CPU, both real-time when permitted) keeps
/// teardowns correct: one pinned vCPU writes stamped pages over 1 GiB with
/// an emulated RNIC attached while the host tears the VM down again and
/// again, and every page reads back zero or its last stamp (no stale
/// page), a zero only after a teardown (no lost write). Also what a
/// starved fault thread would show: the guest stops making progress.
#[test]
fn a_lone_pinned_vcpu_keeps_stamped_pages_across_teardowns() {
    let _one = one_at_a_time();
    const GIB: u64 = 1 << 30;
    let cfg = VmConfig {
        guest: GuestConfig::Builtin(Guest::Writer),
        memory: GIB,
        vcpus: 1,
        rounds: 0,
        rnic: RnicChoice::Emulated,
        pin_vcpus: true,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(cfg).expect("VM");
    let h = vm.handle();
    vm.start().expect("start");
    let (teardowns, after_last) = common::teardowns_against_writer(
        &h,
        GIB,
        6,
        Instant::now() + Duration::from_secs(60),
        Duration::from_secs(20),
    );
    h.request_stop();
    let r = vm.wait(Some(Duration::from_secs(60)));
    assert!(
        after_last >= GIB / 4096,
        "no full pass after the last teardown (its zeros unchecked): {r:?}"
    );
    assert_eq!(r.exit, "guest-done", "{r:?}");
    assert!(teardowns >= 4, "only {teardowns} teardowns in time");
    assert_eq!(
        (field(&r, "stale"), field(&r, "lost")),
        (0, 0),
        "stale pages / lost writes: {r:?}"
    );
    assert_eq!(r.guest_result, "pass", "{r:?}");
    assert!(
        field(&r, "pages") >= 2 * GIB / 4096,
        "the guest wrote too little: {r:?}"
    );
    assert_eq!(r.teardowns, teardowns);
}
