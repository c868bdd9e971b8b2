//! RNICs for odpvm.
//!
//! * [`emulated`] — the emulated RNIC, the default everywhere: a device
//!   thread executing RC work requests against ODP memory regions whose
//!   device page tables are filled on demand through the mmu and kept
//!   coherent as mmu mirrors.
//! * [`assigned`] — a real RNIC over ibverbs (`sideway`, which loads
//!   libibverbs at run time): ODP memory regions over guest RAM, prefetch;
//!   the kernel drives its invalidations.
//!
//! Both speak the vocabulary in [`verbs`].

pub mod assigned;
pub mod emulated;
pub mod roce;
pub mod space;
pub mod stats;
pub mod verbs;

pub use emulated::{CompChannel, Cq, EmulatedRnic, Mr, Pd, Qp, RnicConfig};
pub use roce::{RemoteEnd, RoceConfig, RocePort, RoceStatsSnapshot};
pub use space::AddressSpace;
pub use stats::RnicStatsSnapshot;
pub use verbs::*;
