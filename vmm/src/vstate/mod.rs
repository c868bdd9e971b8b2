//! KVM state: the VM (`vm.rs`), vCPUs and their thread loop (`vcpu.rs`),
//! and the gate that pauses them.

pub mod gate;
pub mod vcpu;
pub mod vm;
