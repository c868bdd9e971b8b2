//! odpvm: a microVM whose guest memory is tracked by a userspace secondary
//! MMU ([`mmu`]) and mirrored into RDMA on-demand-paging memory regions.
//!
//! This crate only re-exports the member crates; it owns the cross-crate
//! tests (`tests/`: one invalidation reaching both mirrors of a running
//! VM) and the criterion benchmarks (`benches/`).

pub use mmu;
pub use rdma_passthrough;
pub use vmm;
