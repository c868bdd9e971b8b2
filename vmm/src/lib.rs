//! odpvm's VMM: KVM microVMs whose every guest page fault is resolved
//! through the [`mmu`] protocol (userfaultfd → `read_begin` → populate →
//! `install`), with KVM's side of guest memory as an mmu mirror.

pub mod api;
pub mod arch;
pub mod bench;
pub mod cli;
pub mod demo;
pub mod devices;
pub mod fault;
pub mod kvm_mirror;
pub mod layout;
pub mod linux;
pub mod memory;
pub mod payload;
pub mod perftest;
pub mod uffd;
pub mod vm;
pub mod vstate;

pub use vm::{GuestConfig, RunReport, Vm, VmConfig, VmHandle};
