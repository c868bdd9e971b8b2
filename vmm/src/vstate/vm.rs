//! The KVM VM: file descriptors, interrupt controllers, memslots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot use /dev/kvm: {0} (is KVM available, and may this user open /dev/kvm?)")]
    Kvm(kvm_ioctls::Error),
    #[error("creating the KVM VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("setting up {what}: {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("memslot {slot} at {gpa:#x} ({size:#x} bytes): {source}")]
    Memslot {
        slot: u32,
        gpa: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

pub struct KvmVm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub irqchip: bool,
    /// Host memory behind the throwaway memslot of `zap_all_shadow`.
    zap_page: std::sync::OnceLock<Result<u64, String>>,
}

/// The throwaway memslot of `zap_all_shadow`: far above any RAM slot
/// number, 2 MiB in the MMIO hole where no device lives.
const ZAP_SLOT: u32 = 500;
const ZAP_GPA: u64 = 0xe000_0000;
const ZAP_SIZE: u64 = 2 << 20;

impl KvmVm {
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(0xfffb_d000)
            .map_err(|source| VmError::Setup {
                what: "the TSS address",
                source,
            })?;
        let mut irqchip = false;
        if kvm.check_extension(Cap::Irqchip) {
            fd.create_irq_chip().map_err(|source| VmError::Setup {
                what: "the in-kernel irqchip",
                source,
            })?;
            irqchip = true;
            if kvm.check_extension(Cap::Pit2) {
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                fd.create_pit2(pit).map_err(|source| VmError::Setup {
                    what: "the in-kernel PIT",
                    source,
                })?;
            }
        }
        Ok(KvmVm {
            kvm,
            fd,
            irqchip,
            zap_page: std::sync::OnceLock::new(),
        })
    }

    /// Most vCPUs this host's KVM supports.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Point memslot `slot` at `[hva, hva + size)` for `[gpa, gpa + size)`.
    pub fn set_slot(&self, slot: u32, gpa: u64, size: u64, hva: u64) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        };
        // SAFETY: the host range is a live mapping owned by GuestRam for
        // at least as long as the slot points at it (a retired mapping is
        // unmapped only after the slot has moved away).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Memslot {
            slot,
            gpa,
            size,
            source,
        })
    }

    /// Move memslot `slot` to a new host mapping. KVM deletes the old slot
    /// with a fast zap (a generation bump of its own) and the vCPUs fault
    /// the new one in on demand.
    pub fn move_slot(&self, slot: u32, gpa: u64, size: u64, hva: u64) -> Result<(), VmError> {
        let delete = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting a slot has no memory-safety requirements.
        unsafe { self.fd.set_user_memory_region(delete) }.map_err(|source| VmError::Memslot {
            slot,
            gpa,
            size: 0,
            source,
        })?;
        self.set_slot(slot, gpa, size, hva)
    }

    /// Make KVM drop every shadow page of the VM, with the vCPUs free to
    /// run: deleting any memslot goes through `kvm_mmu_zap_all_fast`
    /// (generation bump, then the obsolete pages are zapped in batches
    /// that yield KVM's mmu lock, so vCPU faults interleave). So create a
    /// tiny throwaway slot and delete it. O(shadow pages) inside the
    /// kernel, but no vCPU waits for it as a whole.
    pub fn zap_all_shadow(&self) -> Result<(), String> {
        let hva = self
            .zap_page
            .get_or_init(|| crate::memory::map_anonymous(ZAP_SIZE, false))
            .clone()?;
        self.set_slot(ZAP_SLOT, ZAP_GPA, ZAP_SIZE, hva)
            .map_err(|e| e.to_string())?;
        let delete = kvm_userspace_memory_region {
            slot: ZAP_SLOT,
            guest_phys_addr: ZAP_GPA,
            ..Default::default()
        };
        // SAFETY: deleting a slot has no memory-safety requirements.
        unsafe { self.fd.set_user_memory_region(delete) }.map_err(|e| e.to_string())
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        if let Some(Ok(hva)) = self.zap_page.get() {
            // SAFETY: the throwaway slot is deleted right after each
            // creation, so KVM no longer refers to this mapping we own.
            unsafe { libc::munmap(*hva as *mut libc::c_void, ZAP_SIZE as usize) };
        }
    }
}
