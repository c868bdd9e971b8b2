//! The project's premise, end to end across the three crates: one mmu
//! invalidation (or one teardown) of a running microVM reaches both of its
//! secondary MMUs — KVM's side of guest memory (`vmm`'s Backing mirror) and
//! the emulated RNIC's implicit ODP MR (`rdma-passthrough`'s Cache mirror) —
//! exactly once each, and the translations are gone from the `mmu` table
//! when the call returns.

use std::time::Duration;
use vmm::devices::serial::Sink;
use vmm::payload::Guest;
use vmm::{GuestConfig, Vm, VmConfig};

const MIB: u64 = 1 << 20;

#[test]
fn one_invalidation_and_one_teardown_reach_kvm_and_the_rnic_once_each() {
    let memory = 64 * MIB;
    let cfg = VmConfig {
        guest: GuestConfig::Builtin(Guest::Rewrite),
        memory,
        vcpus: 1,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(cfg).expect("building the VM");
    vm.start().expect("starting the VM");
    let h = vm.handle();
    assert!(
        h.barrier().wait_for(1, Duration::from_secs(60)),
        "the guest never reached its barrier"
    );

    // Pick a 1 MiB range the guest has touched (it rewrote all its RAM).
    let gpa = h
        .mmu()
        .regions()
        .iter()
        .map(|r| r.gpa + r.size - 2 * MIB)
        .max()
        .expect("guest RAM is registered with the mmu");
    assert!(h.mmu().lookup(gpa).is_some(), "the range was never faulted");

    let before = h.stats();
    h.invalidate(gpa, MIB).expect("invalidating 1 MiB");
    let after = h.stats();
    assert_eq!(after.kvm_invalidations, before.kvm_invalidations + 1);
    assert_eq!(after.rnic_invalidations, before.rnic_invalidations + 1);
    assert_eq!(after.kvm_bytes_discarded, before.kvm_bytes_discarded + MIB);
    assert!(h.mmu().lookup(gpa).is_none());
    assert!(
        h.mmu().lookup(gpa + MIB).is_some(),
        "outside the range kept"
    );

    h.teardown().expect("tearing the VM's memory down");
    let torn = h.stats();
    assert_eq!(torn.teardowns, after.teardowns + 1);
    assert_eq!(torn.rnic_invalidations, after.rnic_invalidations + 1);
    assert!(
        h.mmu().lookup(gpa + MIB).is_none(),
        "old generation visible"
    );

    h.shutdown();
    let r = vm.wait(Some(Duration::from_secs(60)));
    assert_eq!(r.stats.rnic_stale_accesses, 0, "{r:?}");
}
