//! odpvm's VMM: KVM microVMs whose every guest page fault is resolved
//! through the [`mmu`] protocol (userfaultfd → `read_begin` → populate →
//! `install`), with KVM's side of guest memory as an mmu mirror.
//!
//! ## How a request flows
//!
//! ```text
//!   odpvm run … (cli) ──► vm: build KVM VM, guest RAM (memory), mmu,
//!                          fault thread (fault), KVM mirror (kvm_mirror),
//!                          devices (devices/*), vCPU threads (vstate)
//!   vCPU thread: KVM_RUN ─► exit: MMIO/port ─► devices (test device,
//!                          serial, paravirtual RNIC → rdma-passthrough)
//!   guest touches a page ─► userfaultfd ─► fault thread: read_begin →
//!                          populate (UFFDIO_COPY/ZEROPAGE) → install
//!   control socket (api) ─► vm: invalidate / teardown ─► mmu ─► mirrors:
//!                          RNIC MRs first (Cache), then KVM (Backing)
//! ```
//!
//! ## Reading order
//!
//! 1. `cli` and `vm` — what a run is made of and how it is assembled;
//! 2. `memory`, `uffd`, `fault` — guest RAM and its faults through the mmu;
//! 3. `kvm_mirror` — how an invalidation or teardown reaches KVM;
//! 4. `vstate` — the KVM VM, vCPU threads and the pause gate;
//! 5. `devices` — test device, serial, paravirtual RNIC (its `mod.rs`
//!    documents the guest-visible registers and rings);
//! 6. `payload`, `arch`, `layout`, `linux` — what runs in the guest
//!    (`payload::user`: users' own ELF programs, `payload::sdk`: the
//!    guest SDK's generated ABI files in `guest/`);
//! 7. `api` (control socket), `demo`, `bench`, `perftest` — the commands.

pub mod affinity;
pub mod api;
pub mod arch;
pub mod bench;
pub mod cli;
pub mod contention;
pub mod demo;
pub mod devices;
pub mod fault;
pub mod kvm_mirror;
pub mod layout;
pub mod linux;
pub mod memory;
pub mod payload;
pub mod perftest;
pub mod roce_bench;
pub mod roce_run;
pub mod schedstat;
pub mod uffd;
pub mod vm;
pub mod vstate;

pub use vm::{GuestConfig, RunReport, Vm, VmConfig, VmHandle};
