//! The assigned RNIC: a real device through libibverbs (`sideway`, which
//! loads `libibverbs.so.1` at run time, so odpvm builds and runs without
//! rdma-core).
//!
//! Guest RAM is registered as one ODP memory region (`IBV_ACCESS_ON_DEMAND`):
//! implicit ODP over the whole address space where the device supports it,
//! else an explicit ODP MR over the guest RAM host range. The kernel keeps
//! that MR coherent through its own MMU notifiers (munmap, MADV_DONTNEED
//! and swapped memslots all reach it); [`AssignedMirror`] subscribes to the
//! mmu only to count what the kernel is being asked to do.
//!
//! On a host with an RNIC (mlx5 has ODP; rxe has it since Linux 6.15):
//!
//! ```text
//!   ls /sys/class/infiniband            # e.g. mlx5_0, rxe0
//!   odpvm run --guest touch --rnic assigned:mlx5_0
//! ```
//!
//! Without libibverbs, or without a device, [`AssignedRnic::open`] fails
//! with one line saying which is missing.

use crate::verbs::{Advice, VerbsError};
use mmu::{Invalidation, InvalidationKind, Mirror};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::AccessFlags;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum AssignedError {
    #[error("assigned RNIC: libibverbs.so.1 is not installed (rdma-core; on Debian: apt install libibverbs1 ibverbs-providers)")]
    NoLibibverbs,
    #[error("assigned RNIC: libibverbs found no RDMA devices ({0}); is an RNIC driver loaded? (ls /sys/class/infiniband)")]
    NoDevices(String),
    #[error("assigned RNIC: no RDMA device named {name:?} (available: {available})")]
    NoSuchDevice { name: String, available: String },
    #[error("assigned RNIC {name}: {what}: {detail}")]
    Device {
        name: String,
        what: &'static str,
        detail: String,
    },
}

/// Whether the dynamic loader can find libibverbs (what `sideway` loads).
pub fn libibverbs_present() -> bool {
    let name = c"libibverbs.so.1";
    // SAFETY: dlopen with a valid C string; the handle is closed at once.
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if h.is_null() {
            false
        } else {
            libc::dlclose(h);
            true
        }
    }
}

/// Names of the RDMA devices libibverbs sees.
pub fn list_devices() -> Result<Vec<String>, AssignedError> {
    if !libibverbs_present() {
        return Err(AssignedError::NoLibibverbs);
    }
    let list =
        DeviceList::new().map_err(|e| AssignedError::NoDevices(format!("{e}: {:?}", e.0)))?;
    Ok(list.iter().map(|d| d.name()).collect())
}

/// An opened RNIC with one protection domain.
pub struct AssignedRnic {
    name: String,
    _ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    pub stats: Arc<AssignedStats>,
}

#[derive(Default, Debug)]
pub struct AssignedStats {
    pub prefetches: AtomicU64,
    pub invalidations_seen: AtomicU64,
    pub generations_seen: AtomicU64,
}

/// An ODP MR on the assigned RNIC.
pub struct AssignedMr {
    pub mr: Arc<MemoryRegion>,
    pub implicit: bool,
}

impl AssignedRnic {
    /// Open device `name` (e.g. `mlx5_0`).
    pub fn open(name: &str) -> Result<AssignedRnic, AssignedError> {
        let names = list_devices()?;
        if names.is_empty() {
            return Err(AssignedError::NoDevices("the device list is empty".into()));
        }
        let list = DeviceList::new().map_err(|e| AssignedError::NoDevices(e.to_string()))?;
        let dev =
            list.iter()
                .find(|d| d.name() == name)
                .ok_or_else(|| AssignedError::NoSuchDevice {
                    name: name.into(),
                    available: names.join(", "),
                })?;
        let err = |what: &'static str| {
            move |e: &dyn std::fmt::Display| AssignedError::Device {
                name: name.into(),
                what,
                detail: e.to_string(),
            }
        };
        let ctx = dev.open().map_err(|e| err("opening")(&e))?;
        let pd = ctx.alloc_pd().map_err(|e| err("allocating a PD")(&e))?;
        Ok(AssignedRnic {
            name: name.into(),
            _ctx: ctx,
            pd,
            stats: Arc::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Register `[hva, hva + len)` for on-demand paging: implicit ODP if
    /// the device takes it, else explicit.
    pub fn reg_odp(&self, hva: u64, len: u64) -> Result<AssignedMr, AssignedError> {
        let access = AccessFlags::LocalWrite
            | AccessFlags::RemoteWrite
            | AccessFlags::RemoteRead
            | AccessFlags::OnDemand;
        // SAFETY: implicit ODP (addr 0, SIZE_MAX) maps nothing up front; the
        // kernel faults pages in and invalidates them through its MMU
        // notifiers, so no range has to outlive the registration.
        if let Ok(mr) = unsafe { self.pd.reg_mr(0, usize::MAX, access) } {
            return Ok(AssignedMr { mr, implicit: true });
        }
        // SAFETY: as above, ODP keeps the device coherent with the host
        // mapping; guest RAM stays mapped while the VM (and this MR) lives.
        let mr = unsafe { self.pd.reg_mr(hva as usize, len as usize, access) }.map_err(|e| {
            AssignedError::Device {
                name: self.name.clone(),
                what: "registering an ODP MR (does the device support ODP?)",
                detail: e.to_string(),
            }
        })?;
        Ok(AssignedMr {
            mr,
            implicit: false,
        })
    }

    /// `ibv_advise_mr` over host ranges of `mr`.
    pub fn advise(
        &self,
        mr: &AssignedMr,
        advice: Advice,
        flush: bool,
        ranges: &[(u64, u32)],
    ) -> Result<(), VerbsError> {
        use rdma_mummy_sys::ib_uverbs_advise_mr_advice as a;
        let adv = match advice {
            Advice::Prefetch => a::IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH,
            Advice::PrefetchWrite => a::IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE,
            Advice::PrefetchNoFault => a::IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT,
        };
        let mut sges: Vec<rdma_mummy_sys::ibv_sge> = ranges
            .iter()
            .map(|&(addr, length)| rdma_mummy_sys::ibv_sge {
                addr,
                length,
                lkey: mr.mr.lkey(),
            })
            .collect();
        // SAFETY: the PD pointer is live for `self`; `sges` is a valid array
        // of `len` elements for the duration of the call.
        let rc = unsafe {
            rdma_mummy_sys::ibv_advise_mr(
                self.pd.pd().as_ptr(),
                adv,
                u32::from(flush),
                sges.as_mut_ptr(),
                sges.len() as u32,
            )
        };
        self.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        if rc != 0 {
            return Err(VerbsError::Unsupported(format!(
                "ibv_advise_mr: {}",
                std::io::Error::from_raw_os_error(rc.abs())
            )));
        }
        Ok(())
    }
}

/// Counts the invalidations the kernel carries out for the assigned RNIC.
pub struct AssignedMirror {
    pub stats: Arc<AssignedStats>,
}

impl Mirror for AssignedMirror {
    fn name(&self) -> &str {
        "assigned-rnic"
    }

    fn invalidate_start(&self, inv: &Invalidation) {
        match inv.kind {
            InvalidationKind::Range { .. } => &self.stats.invalidations_seen,
            InvalidationKind::Generation { .. } => &self.stats.generations_seen,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    fn invalidate_wait(&self, _: &Invalidation) {
        // The kernel's MMU notifier waits for the device (mlx5 UMR).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host has no RDMA stack: opening must fail with one clear line.
    #[test]
    fn opening_without_rdma_fails_with_one_clear_line() {
        match AssignedRnic::open("mlx5_0") {
            Ok(_) => {
                // A host with real hardware named mlx5_0: nothing to check.
                eprintln!("mlx5_0 present; error path not exercised");
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "{msg}");
                assert!(msg.starts_with("assigned RNIC"), "{msg}");
                if !libibverbs_present() {
                    assert!(matches!(e, AssignedError::NoLibibverbs), "{msg}");
                    assert!(msg.contains("libibverbs"), "{msg}");
                }
            }
        }
    }
}
