//! Assembling and running a microVM: configuration, construction (KVM,
//! guest RAM, mmu, fault thread, KVM mirror, devices, vCPUs), the vCPU
//! threads, control (invalidate, teardown, pause, resume, shutdown) and the
//! final report.
//!
//! Reading order: `config.rs` (what a VM is made of, validated first),
//! `builder.rs` (`Vm::new`, one `attach_*` per part), this file (the vCPU
//! threads, `VmHandle`'s control, waiting for the end), `report.rs` (what a
//! run reports and the exit code it decides). Not to be confused with
//! `vstate/vm.rs`, the KVM VM file descriptor these build on.

use crate::devices::testdev::Barrier;
use crate::devices::Devices;
use crate::fault::{FaultStats, FaultThread};
use crate::kvm_mirror::KvmMirror;
use crate::linux;
use crate::memory::{GuestRam, MemoryError};
use crate::payload;
use crate::uffd::{UffdError, Userfault};
use crate::vstate::gate::RunGate;
use crate::vstate::vcpu::{Vcpu, VcpuEnd, VcpuError};
use crate::vstate::vm::{KvmVm, VmError};
use mmu::{MirrorId, Mmu};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod builder;
mod config;
mod report;
pub use config::{GuestConfig, RnicChoice, VmConfig, DEFAULT_FAULT_AROUND, PEER_BUFFER};
pub use report::{Exit, GuestResult, LiveStats, RunReport};

/// Everything that can go wrong building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("mmu: {0}")]
    Mmu(#[from] mmu::Error),
    #[error(transparent)]
    Linux(#[from] linux::LinuxError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Shared by the VM's threads and its controllers.
pub(crate) struct Core {
    pub(crate) mmu: Arc<Mmu>,
    pub(crate) uffd: Option<Arc<Userfault>>,
    /// The assigned RNIC and guest RAM's ODP MR on it, if any; held only
    /// so they live (and deregister) with the VM.
    _assigned: Option<(
        rdma_passthrough::assigned::AssignedRnic,
        rdma_passthrough::assigned::AssignedMr,
    )>,
    pub(crate) ram: Arc<GuestRam>,
    /// Held so the KVM VM outlives every thread that shares this core.
    _kvm: Arc<KvmVm>,
    pub(crate) gate: Arc<RunGate>,
    pub(crate) devices: Arc<Devices>,
    pub(crate) mirror: Arc<KvmMirror>,
    /// The KVM mirror's registration (None once a benchmark detached it).
    kvm_mirror_id: Mutex<Option<MirrorId>>,
    pub(crate) faults: Arc<FaultStats>,
    pub(crate) config: VmConfig,
    ends: Mutex<Vec<Option<VcpuEnd>>>,
    done: Condvar,
    stop_reason: Mutex<Option<Exit>>,
    /// Where the threads a vCPU waits on were put (None: not pinned).
    helpers_placed: Mutex<Option<crate::affinity::Helpers>>,
    /// When `Vm::new` was called.
    created: Instant,
    started: Instant,
}

/// A cheap handle to control a running VM (tests, the API, the demo).
/// Its state is private: callers go through the methods below.
#[derive(Clone)]
pub struct VmHandle(Arc<Core>);

pub struct Vm {
    core: Arc<Core>,
    vcpus: Vec<Vcpu>,
    threads: Vec<JoinHandle<()>>,
    fault_thread: Option<FaultThread>,
    boot_ms: f64,
}

impl Vm {
    pub fn handle(&self) -> VmHandle {
        VmHandle(self.core.clone())
    }

    /// Where vCPU threads go (`pin_vcpus`); the process's other threads
    /// are moved to the housekeeping CPUs here.
    fn cpu_plan(&self) -> Result<Option<crate::affinity::CpuPlan>, Error> {
        if !self.core.config.pin_vcpus {
            return Ok(None);
        }
        let io = |what| move |source| Error::Io { what, source };
        let allowed = crate::affinity::process_cpus().map_err(io("reading the CPU affinity"))?;
        let Some(plan) = crate::affinity::plan(self.core.config.vcpus, &allowed) else {
            return Ok(None);
        };
        let mut plan = plan.with_helpers(self.core.config.helpers);
        // Measured only with both real-time: a fair-class mover on the
        // vCPU's CPU could be time-sliced against it holding the mmap lock.
        if plan.helpers() == crate::affinity::Helpers::BesideVcpu
            && !crate::contention::realtime_permitted()
        {
            log::info!(
                "no SCHED_FIFO for this process: the fault thread and teardown moves stay on the housekeeping CPUs"
            );
            plan = plan.with_helpers(crate::affinity::Helpers::Housekeeping);
        }
        *self.core.helpers_placed.lock() = Some(plan.helpers());
        crate::affinity::pin_process(&plan.housekeeping)
            .map_err(io("moving the VMM's threads to the housekeeping CPUs"))?;
        // The threads a vCPU waits on (see `affinity`): with one vCPU, on
        // its CPU, so it never idles while the vCPU waits.
        if let Some(f) = &self.fault_thread {
            // A fault thread that already ended is the watchdog's to report.
            if let Err(e) = f.pin(&plan.waited_on) {
                log::warn!("the fault thread keeps its CPUs: {e}");
            }
        }
        self.core
            .mirror
            .set_mover_cpus(Some(plan.waited_on.clone()));
        log::info!(
            "CPU pinning: vCPUs on {:?}, the VMM's threads on {:?}, the fault thread and teardown moves on {:?}",
            plan.vcpu,
            plan.housekeeping,
            plan.waited_on
        );
        Ok(Some(plan))
    }

    /// Start every vCPU on its own thread.
    pub fn start(&mut self) -> Result<(), Error> {
        let plan = self.cpu_plan()?;
        for vcpu in self.vcpus.drain(..) {
            let core = self.core.clone();
            let index = vcpu.index;
            let cpu = plan.as_ref().map(|p| p.vcpu[index]);
            let t = std::thread::Builder::new()
                .name(format!("odpvm-vcpu{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if let Err(e) = crate::affinity::pin(0, &[cpu]) {
                            log::warn!("pinning vCPU {index} to CPU {cpu}: {e}");
                        }
                    }
                    let end = vcpu.run(&core.gate, &core.devices);
                    core.vcpu_ended(index, end);
                })
                .map_err(|source| Error::Io {
                    what: "starting a vCPU thread",
                    source,
                })?;
            self.threads.push(t);
        }
        Ok(())
    }

    /// Wait until every vCPU has ended (or `timeout`, then stop the VM),
    /// tear the VM down and report.
    pub fn wait(mut self, timeout: Option<Duration>) -> RunReport {
        let deadline = timeout.map(|t| Instant::now() + t);
        {
            let mut ends = self.core.ends.lock();
            while ends.iter().any(|e| e.is_none()) {
                match deadline {
                    Some(d) => {
                        if self.core.done.wait_until(&mut ends, d).timed_out() {
                            drop(ends);
                            self.core.stop(Exit::Timeout(timeout.unwrap_or_default()));
                            ends = self.core.ends.lock();
                            while ends.iter().any(|e| e.is_none()) {
                                self.core.done.wait(&mut ends);
                            }
                            break;
                        }
                    }
                    None => self.core.done.wait(&mut ends),
                }
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.core.gate.stop();
        self.core.devices.testdev.stop();
        let unwritten = self.core.ram.take_wasted();
        self.core
            .mirror
            .stats
            .wasted_pages
            .fetch_add(unwritten, Ordering::Relaxed);
        let report = RunReport::new(&self.core, self.boot_ms);
        if let Some(id) = self.core.kvm_mirror_id.lock().take() {
            let _ = self.core.mmu.unregister_mirror(id);
        }
        self.fault_thread.take();
        report
    }
}

impl Core {
    fn vcpu_ended(&self, index: usize, end: VcpuEnd) {
        if let VcpuEnd::Finished(r) = &end {
            if let Some(c) = payload::user::Crash::of(r) {
                log::warn!("{}", c.describe(index));
            }
        }
        let reason = match &end {
            VcpuEnd::Finished(_) | VcpuEnd::Stopped => None,
            VcpuEnd::Halted => Some(Exit::Halted),
            VcpuEnd::Reset => Some(Exit::Reset),
            VcpuEnd::Shutdown(s) => Some(Exit::TripleFault {
                vcpu: index,
                detail: s.to_string(),
            }),
            VcpuEnd::Error(s) => Some(Exit::VcpuError {
                vcpu: index,
                detail: s.to_string(),
            }),
        };
        if let Some(r) = reason {
            log::warn!("{r}");
            self.stop(r);
        }
        let mut ends = self.ends.lock();
        ends[index] = Some(end);
        self.done.notify_all();
    }

    /// Whether every vCPU thread has ended.
    pub fn all_ended(&self) -> bool {
        self.ends.lock().iter().all(|e| e.is_some())
    }

    /// Stop the VM: no vCPU runs again; blocked ones are woken.
    pub fn stop(&self, reason: Exit) {
        self.stop_reason.lock().get_or_insert(reason);
        self.gate.stop();
        self.devices.testdev.stop();
    }
}

impl VmHandle {
    pub fn mmu(&self) -> &Arc<Mmu> {
        &self.0.mmu
    }

    /// Guest RAM (peering a guest's memory with an RNIC, checking pages).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.0.ram
    }

    /// The emulated RNIC device, if the VM has one.
    pub fn rnic(&self) -> Option<Arc<crate::devices::rnic::RnicDevice>> {
        self.0.devices.rnic.clone()
    }

    /// The guest-fault counters (and the fault-injection switch).
    pub fn faults(&self) -> &Arc<FaultStats> {
        &self.0.faults
    }

    /// The KVM mirror's counters.
    pub fn kvm_mirror_stats(&self) -> &crate::kvm_mirror::KvmMirrorStats {
        &self.0.mirror.stats
    }

    /// The userfaultfd guest RAM is registered with, if tracked that way.
    pub(crate) fn uffd(&self) -> Option<&Arc<Userfault>> {
        self.0.uffd.as_ref()
    }

    pub fn barrier(&self) -> &Barrier {
        &self.0.devices.testdev.barrier
    }

    /// Invalidate guest-physical `[gpa, gpa + len)`: the mmu, then every
    /// mirror (KVM discards the pages). Returns translations zapped.
    pub fn invalidate(&self, gpa: u64, len: u64) -> Result<u64, mmu::Error> {
        self.0.mmu.invalidate(gpa, len)
    }

    /// Teardown of every translation: KVM's shadow pages are emptied with
    /// the vCPUs running (`KvmMirror::prezap`), then the mmu's O(1)
    /// generation teardown reaches every mirror. Returns the mmu
    /// teardown's latency in ns.
    pub fn teardown(&self) -> Result<u64, mmu::Error> {
        if self.0.uffd.is_some() && self.0.kvm_mirror_id.lock().is_some() {
            self.0.mirror.prezap();
        }
        // Retiring from before the mmu starts the teardown until it has
        // ended, not only while KVM's side moves the pages out: the devices
        // are told first, and a vCPU fault meanwhile would otherwise wait
        // (deferred) for the device's confirmation and the whole move.
        // Served untracked, its fresh page is moved out with the rest.
        let ram = &self.0.ram;
        let all: Vec<usize> = if ram.can_retire_in_place() {
            (0..ram.regions().len()).collect()
        } else {
            Vec::new()
        };
        // Ended by a guard: a panic inside must not leave RAM retiring.
        struct Retiring<'a>(&'a GuestRam, Vec<usize>);
        impl Drop for Retiring<'_> {
            fn drop(&mut self) {
                self.0.set_retiring(&self.1, false);
            }
        }
        ram.set_retiring(&all, true);
        let _mark = Retiring(ram, all);
        self.0.mmu.teardown_all().map(|r| r.ns)
    }

    pub fn pause(&self) {
        self.0.gate.pause();
    }

    /// Benchmarks only: stop telling KVM's side about invalidations, so
    /// they reach the devices alone (guest memory is then not made fresh).
    pub fn detach_kvm_mirror(&self) -> Result<(), mmu::Error> {
        match self.0.kvm_mirror_id.lock().take() {
            Some(id) => self.0.mmu.unregister_mirror(id),
            None => Ok(()),
        }
    }

    /// Whether teardowns first empty KVM's shadow tables with the vCPUs
    /// running (`KvmMirror::prezap`, the default).
    pub fn set_prezap(&self, on: bool) {
        self.0.mirror.set_prezap(on);
    }

    /// Ask looping payloads (`writer`, RDMA workloads) to finish.
    pub fn request_stop(&self) {
        self.0.devices.testdev.request_stop();
    }

    /// The guest's progress marks since the last call (`writer`).
    pub fn take_progress(&self) -> Vec<crate::devices::testdev::ProgressMark> {
        self.0.devices.testdev.take_marks()
    }

    /// Where the KVM mirror's time went since the last call (teardowns and
    /// range invalidations), then reset.
    pub fn take_teardown_parts(&self) -> crate::kvm_mirror::TeardownParts {
        std::mem::take(&mut *self.0.mirror.stats.last.lock())
    }

    /// Where the threads a vCPU waits on run (the fault thread, a
    /// teardown's moves): None when the vCPUs are not pinned.
    pub fn helpers_placed(&self) -> Option<crate::affinity::Helpers> {
        *self.0.helpers_placed.lock()
    }

    /// Retired guest-memory mappings not yet given back.
    pub fn retired_mappings(&self) -> usize {
        self.0.ram.retired_count()
    }

    /// vCPU threads the run gate can still kick (0 once they have ended).
    pub fn kickable_vcpus(&self) -> usize {
        self.0.gate.registered()
    }

    /// Undo a `pause`, and let vCPUs waiting at a payload barrier go on.
    pub fn resume(&self) {
        if self.0.gate.paused() {
            self.0.gate.resume();
        }
        self.0.devices.testdev.barrier.release();
    }

    pub fn shutdown(&self) {
        self.0.stop(Exit::Requested("shutdown requested".into()));
    }

    /// Stop with a reason of the caller's (reported as the run's `exit`).
    pub fn stop(&self, reason: &str) {
        self.0.stop(Exit::Requested(reason.into()));
    }

    /// Stop for a typed reason (signal, timeout, a failed fault thread);
    /// the reason decides the run's exit code (`Exit::is_failure`).
    pub fn stop_for(&self, exit: Exit) {
        self.0.stop(exit);
    }

    /// Whether every vCPU has ended.
    pub fn finished(&self) -> bool {
        self.0.all_ended()
    }

    /// Guest memory as an RNIC address space: iova = guest-physical, pages
    /// made present through the same protocol as vCPU faults.
    pub fn address_space(&self, name: &str) -> Arc<rdma_passthrough::AddressSpace> {
        let resolver = crate::fault::GuestResolver::new(
            self.0.uffd.clone(),
            self.0.ram.clone(),
            &self.0.mmu,
            self.0.faults.clone(),
        );
        rdma_passthrough::AddressSpace::new(name, self.0.mmu.clone(), Arc::new(resolver))
    }

    /// Time from `Vm::new` to the guest's first device command.
    pub fn ready_after(&self) -> Option<Duration> {
        self.0
            .devices
            .testdev
            .first_command()
            .map(|t| t.duration_since(self.0.created))
    }

    pub fn running(&self) -> bool {
        !self.0.gate.stopped()
    }

    pub fn stats(&self) -> LiveStats {
        LiveStats::new(&self.0)
    }
}
