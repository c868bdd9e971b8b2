//! Whole-VM teardowns against running guests (real KVM, real userfaultfd).

mod common;

use std::time::{Duration, Instant};
use vmm::devices::serial::Sink;
use vmm::payload::Guest;
use vmm::vm::{GuestConfig, RnicChoice, RunReport, Vm, VmConfig};

const GIB: u64 = 1 << 30;

fn field(r: &RunReport, vcpu: usize, name: &str) -> u64 {
    r.vcpu_reports[vcpu][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {r:?}"))
}

/// Guards issue 9: teardowns that move the old pages away while the vCPUs
/// keep running. Two vCPUs write stamped pages over 1 GiB round after round;
/// the host tears the whole VM down again and again. Every page must read
/// back zero or its previous stamp (no stale page), and a zero is only
/// allowed when a teardown started after the stamp was written (no lost
/// write: the guest checks it against the test device's epoch counters).
#[test]
fn stamped_writers_see_no_stale_page_and_lose_no_write() {
    let cfg = VmConfig {
        guest: GuestConfig::Builtin(Guest::Writer),
        memory: GIB,
        vcpus: 2,
        rounds: 0,
        rnic: RnicChoice::Emulated,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(cfg).expect("VM");
    let h = vm.handle();
    vm.start().expect("start");
    let (teardowns, _) = common::teardowns_against_writer(
        &h,
        GIB,
        8,
        Instant::now() + Duration::from_secs(45),
        Duration::from_secs(10),
    );
    let all = GIB / 4096;
    h.request_stop();
    let r = vm.wait(Some(Duration::from_secs(60)));
    assert_eq!(r.exit, "guest-done", "{r:?}");
    assert!(teardowns >= 4, "only {teardowns} teardowns in time");
    let (stale, lost) = (
        field(&r, 0, "stale") + field(&r, 1, "stale"),
        field(&r, 0, "lost") + field(&r, 1, "lost"),
    );
    assert_eq!((stale, lost), (0, 0), "stale pages / lost writes: {r:?}");
    assert_eq!(r.guest_result, "pass", "{r:?}");
    let pages = field(&r, 0, "pages") + field(&r, 1, "pages");
    assert!(pages >= 2 * all, "the guest wrote only {pages} pages");
    assert_eq!(r.teardowns, teardowns);
    assert!(r.stats.kvm_slot_moves == 0, "anonymous RAM moved memslots");
    println!(
        "teardowns {teardowns}, pages written {pages}, faults {}, deferred {}",
        r.faults_tracked, r.stats.faults_deferred
    );
}

/// Shared memory cannot move its pages out in place (the file would still
/// show them): its teardowns pause the vCPUs and move the memslots to
/// fresh mappings. Same stamped-writer checks, 64 MiB of memfd RAM.
#[test]
fn shared_memory_teardowns_move_memslots_and_lose_no_write() {
    let cfg = VmConfig {
        guest: GuestConfig::Builtin(Guest::Writer),
        memory: 64 << 20,
        vcpus: 2,
        rounds: 0,
        backing: vmm::memory::Backing::Memfd,
        rnic: RnicChoice::None,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(cfg).expect("VM");
    let h = vm.handle();
    vm.start().expect("start");
    let mut teardowns = 0;
    while teardowns < 20 {
        std::thread::sleep(Duration::from_millis(15));
        h.teardown().expect("teardown");
        teardowns += 1;
    }
    std::thread::sleep(Duration::from_millis(200));
    h.request_stop();
    let r = vm.wait(Some(Duration::from_secs(60)));
    assert_eq!(r.exit, "guest-done", "{r:?}");
    let (stale, lost) = (
        field(&r, 0, "stale") + field(&r, 1, "stale"),
        field(&r, 0, "lost") + field(&r, 1, "lost"),
    );
    assert_eq!((stale, lost), (0, 0), "stale pages / lost writes: {r:?}");
    assert!(r.stats.kvm_slot_moves >= 20, "{r:?}");
    assert!(r.stats.teardown_pause_ns_max > 0);
}
