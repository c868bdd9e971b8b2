//! One vCPU: its KVM fd, initial registers, and the thread loop that runs
//! it until the payload finishes, the guest stops, or the VMM stops it.

use super::gate::{bind_immediate_exit, RunGate};
use crate::arch;
use crate::devices::testdev::VcpuReport;
use crate::devices::{Devices, IoAction};
use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::sync::atomic::AtomicU8;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {index}: {source}")]
    Create {
        index: usize,
        source: kvm_ioctls::Error,
    },
    #[error("configuring vCPU {index} ({what}): {source}")]
    Configure {
        index: usize,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Where a vCPU starts.
#[derive(Clone, Debug)]
pub struct BootState {
    pub rip: u64,
    pub rsp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rdx: u64,
    pub rflags: u64,
    pub cr3: u64,
    pub gdt: u64,
    pub tss: u64,
    /// Interrupt descriptor table (base, limit); none: an exception is a
    /// triple fault.
    pub idt: Option<(u64, u16)>,
    /// GS base (user programs: this vCPU's read-only info block).
    pub gs_base: u64,
    /// Ring 3 (built-in payloads) or ring 0 (Linux).
    pub user: bool,
    /// Start running at once. With an in-kernel LAPIC, KVM otherwise holds
    /// every vCPU but the first in wait-for-SIPI, as real APs are.
    pub runnable: bool,
}

/// Why a vCPU thread ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The payload reported its result.
    Finished(VcpuReport),
    /// The VMM stopped it.
    Stopped,
    /// HLT with nothing to wake it (no in-kernel irqchip).
    Halted,
    /// The guest asked for a reset (i8042) or KVM reported a reset event.
    Reset,
    /// Triple fault or a shutdown event.
    Shutdown(String),
    /// KVM could not run the vCPU; registers attached.
    Error(String),
}

pub struct Vcpu {
    pub index: usize,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(kvm: &Kvm, vm: &VmFd, index: usize, boot: &BootState) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(index as u64)
            .map_err(|source| VcpuError::Create { index, source })?;
        let cfg = |what| {
            move |source| VcpuError::Configure {
                index,
                what,
                source,
            }
        };
        arch::setup_cpuid(kvm, &fd, index as u8).map_err(cfg("CPUID"))?;
        let mut sregs = fd.get_sregs().map_err(cfg("reading sregs"))?;
        arch::long_mode_sregs(&mut sregs, boot.cr3, boot.gdt, boot.tss, boot.user);
        if let Some((base, limit)) = boot.idt {
            sregs.idt.base = base;
            sregs.idt.limit = limit;
        }
        sregs.gs.base = boot.gs_base;
        fd.set_sregs(&sregs).map_err(cfg("sregs"))?;
        let regs = kvm_regs {
            rip: boot.rip,
            rsp: boot.rsp,
            rsi: boot.rsi,
            rdi: boot.rdi,
            rdx: boot.rdx,
            rflags: boot.rflags,
            ..Default::default()
        };
        fd.set_regs(&regs).map_err(cfg("registers"))?;
        if boot.runnable {
            fd.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(cfg("MP state"))?;
        }
        Ok(Vcpu { index, fd })
    }

    fn describe(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => arch::describe(&r, &s),
            (Err(e), _) | (_, Err(e)) => format!("(registers unavailable: {e})"),
        }
    }

    /// The vCPU thread's loop.
    pub fn run(mut self, gate: &RunGate, devices: &Arc<Devices>) -> VcpuEnd {
        gate.register_thread();
        let exit_byte = &mut self.fd.get_kvm_run().immediate_exit as *mut u8 as *const AtomicU8;
        // SAFETY: the kvm_run mapping lives as long as `self.fd`, which
        // outlives this loop; we unbind before returning.
        unsafe { bind_immediate_exit(exit_byte) };
        let end = self.run_loop(gate, devices);
        // SAFETY: unbinding (null) is always valid.
        unsafe { bind_immediate_exit(std::ptr::null()) };
        gate.unregister_thread();
        end
    }

    fn run_loop(&mut self, gate: &RunGate, devices: &Arc<Devices>) -> VcpuEnd {
        let index = self.index;
        loop {
            if !gate.enter() {
                return VcpuEnd::Stopped;
            }
            let result = self.fd.run();
            gate.leave();
            let action = match result {
                Ok(VcpuExit::IoOut(port, data)) => devices.io_out(index, port, data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    devices.io_in(port, data);
                    IoAction::Continue
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    devices.mmio_read(addr, data);
                    IoAction::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => devices.mmio_write(index, addr, data),
                Ok(VcpuExit::Hlt) => return VcpuEnd::Halted,
                Ok(VcpuExit::Shutdown) => return VcpuEnd::Shutdown(self.describe()),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuEnd::Reset,
                        _ => VcpuEnd::Shutdown(format!("system event {kind}")),
                    }
                }
                Ok(VcpuExit::Intr) => IoAction::Continue,
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return VcpuEnd::Error(format!(
                        "VM entry failed (reason {reason:#x} on cpu {cpu}): {}",
                        self.describe()
                    ))
                }
                Ok(VcpuExit::InternalError) => {
                    return VcpuEnd::Error(format!("KVM internal error: {}", self.describe()))
                }
                Ok(other) => {
                    let what = format!("{other:?}");
                    return VcpuEnd::Error(format!("unexpected exit {what}: {}", self.describe()));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    IoAction::Continue
                }
                Err(e) => return VcpuEnd::Error(format!("KVM_RUN: {e}: {}", self.describe())),
            };
            match action {
                IoAction::Continue => {}
                IoAction::Finished(report) => return VcpuEnd::Finished(report),
                IoAction::Reset => return VcpuEnd::Reset,
            }
        }
    }
}
