//! Assembling and running a microVM: configuration, construction (KVM,
//! guest RAM, mmu, fault thread, KVM mirror, devices, vCPUs), the vCPU
//! threads, control (invalidate, teardown, pause, resume, shutdown) and the
//! final report.

use crate::devices::rnic::{HostPeer, RnicDevice};
use crate::devices::serial::{SerialPort, Sink, COM1_IRQ};
use crate::devices::testdev::{Barrier, Epochs, TestDevice};
use crate::devices::Devices;
use crate::fault::{FaultStats, FaultThread, Tracking};
use crate::kvm_mirror::{KvmMirror, Slot};
use crate::layout::*;
use crate::memory::{Backing, Content, GuestRam, MemoryError};
use crate::payload::{self, Guest, PayloadParams};
use crate::uffd::{UffdError, Userfault};
use crate::vstate::gate::{install_kick_handler, RunGate};
use crate::vstate::vcpu::{BootState, Vcpu, VcpuEnd, VcpuError};
use crate::vstate::vm::{KvmVm, VmError};
use crate::{arch, linux};
use mmu::{LockPolicy, MirrorId, Mmu};
use parking_lot::{Condvar, Mutex};

mod report;
pub use report::{Exit, GuestResult, LiveStats, RunReport};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

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

/// Which RNIC the VM gets.
#[derive(Clone, Default)]
pub enum RnicChoice {
    None,
    /// A new emulated RNIC with its own host peer.
    #[default]
    Emulated,
    /// An emulated RNIC (and host peer) shared with other VMs.
    Shared(Arc<rdma_passthrough::EmulatedRnic>, Arc<HostPeer>),
    /// A real device by ibverbs name: guest RAM becomes one ODP MR on it.
    Assigned(String),
}

impl std::fmt::Debug for RnicChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RnicChoice::None => f.write_str("none"),
            RnicChoice::Emulated => f.write_str("emulated"),
            RnicChoice::Shared(nic, _) => write!(f, "shared:{}", nic.name()),
            RnicChoice::Assigned(d) => write!(f, "assigned:{d}"),
        }
    }
}

impl std::str::FromStr for RnicChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(RnicChoice::None),
            "emulated" => Ok(RnicChoice::Emulated),
            _ => match s.strip_prefix("assigned:") {
                Some(dev) if !dev.is_empty() => Ok(RnicChoice::Assigned(dev.into())),
                _ => Err(format!(
                    "unknown --rnic {s:?} (emulated, none, or assigned:<ibdev> such as assigned:mlx5_0)"
                )),
            },
        }
    }
}

/// Default largest fault-around window (pages): 256 KiB, grown to only by
/// sequential access.
pub const DEFAULT_FAULT_AROUND: u64 = 64;

/// Host peer buffer for a VM's own emulated RNIC.
pub const PEER_BUFFER: u64 = 64 << 20;

/// What runs in the VM.
#[derive(Clone, Debug)]
pub enum GuestConfig {
    Builtin(Guest),
    /// A user's static x86-64 ELF (`--payload`), run in ring 3 on every
    /// vCPU with these `--payload-arg`s (`payload::user`).
    Program {
        path: PathBuf,
        args: Vec<u64>,
    },
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

#[derive(Clone)]
pub struct VmConfig {
    pub memory: u64,
    pub vcpus: usize,
    pub guest: GuestConfig,
    pub backing: Backing,
    pub lock: LockPolicy,
    /// Payload pattern seed.
    pub seed: u64,
    /// Passes for looping payloads.
    pub rounds: u64,
    /// Pages payloads work on (default: all of RAM).
    pub work_pages: Option<u64>,
    /// Guest console output.
    pub console: Sink,
    /// How faults are resolved (anything but `Mmu` is a benchmark baseline).
    pub tracking: Tracking,
    pub rnic: RnicChoice,
    /// RDMA workloads: message size and messages (0: until stopped).
    pub msg: u64,
    pub iters: u64,
    /// Largest fault-around window in 4 KiB pages (0: off).
    pub fault_around: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory: 256 << 20,
            vcpus: 2,
            guest: GuestConfig::Builtin(Guest::Touch),
            backing: Backing::Anonymous,
            lock: LockPolicy::Spin,
            seed: 0x5eed,
            rounds: 1,
            work_pages: None,
            console: Sink::Stdout,
            tracking: Tracking::Mmu,
            rnic: RnicChoice::Emulated,
            msg: 64 << 10,
            iters: 5000,
            fault_around: DEFAULT_FAULT_AROUND,
        }
    }
}

impl VmConfig {
    fn validate(&self, max_vcpus: usize) -> Result<(), Error> {
        let max = max_vcpus.min(MAX_VCPUS);
        if self.vcpus == 0 || self.vcpus > max {
            return Err(Error::Config(format!(
                "--vcpus {} is out of range: this host allows 1 to {max}",
                self.vcpus
            )));
        }
        if self.memory < HUGE || !self.memory.is_multiple_of(HUGE) {
            return Err(Error::Config(format!(
                "--memory {} must be a positive multiple of 2 MiB",
                self.memory
            )));
        }
        if let GuestConfig::Builtin(_) = self.guest {
            if self.memory > MAX_PAYLOAD_RAM - GIB {
                return Err(Error::Config(format!(
                    "built-in payloads support at most {} GiB of memory",
                    MAX_PAYLOAD_RAM / GIB - 1
                )));
            }
            if let GuestConfig::Builtin(g) = self.guest {
                if g.is_rdma() {
                    let msg = self.msg;
                    if !(PAGE..=(512 << 10)).contains(&msg) || !msg.is_multiple_of(PAGE) {
                        return Err(Error::Config(format!(
                            "--msg {msg}: RDMA workloads take 4K to 512K in whole pages"
                        )));
                    }
                    if self.vcpus > 8
                        || self.memory < self.vcpus as u64 * crate::payload::rdma::REGION
                    {
                        return Err(Error::Config(format!(
                            "RDMA workloads need at most 8 vCPUs and 16 MiB of RAM per vCPU ({} MiB here)",
                            self.memory >> 20
                        )));
                    }
                    if matches!(self.rnic, RnicChoice::None | RnicChoice::Assigned(_)) {
                        return Err(Error::Config(
                            "RDMA workloads drive the emulated RNIC's paravirtual device: use --rnic emulated"
                                .into(),
                        ));
                    }
                }
            }
            if let Some(w) = self.work_pages {
                if w > self.memory / PAGE {
                    return Err(Error::Config(format!(
                        "--pages {w} is more than the {} pages of RAM",
                        self.memory / PAGE
                    )));
                }
            }
        }
        Ok(())
    }
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
    pub fn new(config: VmConfig) -> Result<Vm, Error> {
        let t0 = Instant::now();
        install_kick_handler().map_err(|e| Error::Io {
            what: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let kvm = Arc::new(KvmVm::new()?);
        config.validate(kvm.max_vcpus())?;

        // Guest-physical layout and what each region reads as initially.
        let mut layout = Vec::new();
        let mut boot = Vec::new();
        match &config.guest {
            GuestConfig::Builtin(guest) => {
                let ram = ram_ranges(PAYLOAD_RAM_GPA, config.memory);
                let params = PayloadParams {
                    vcpus: config.vcpus as u64,
                    seed: config.seed,
                    // 0: `writer` runs until asked to stop.
                    rounds: if *guest == Guest::Writer {
                        config.rounds
                    } else {
                        config.rounds.max(1)
                    },
                    work_pages: config.work_pages.unwrap_or(config.memory / PAGE),
                    msg: config.msg,
                    // Bandwidth payloads settle whole signaled batches.
                    iters: if matches!(
                        guest,
                        Guest::RdmaWriteBw | Guest::RdmaReadBw | Guest::RnicGarbage
                    ) {
                        config.iters.next_multiple_of(crate::payload::rdma::BATCH)
                    } else {
                        config.iters
                    },
                };
                let image =
                    Arc::new(payload::build_image(*guest, &params, &ram).map_err(Error::Config)?);
                layout.push((
                    "boot".to_string(),
                    0,
                    BOOT_REGION_SIZE,
                    Content::Image(image.clone()),
                ));
                for (i, (gpa, size)) in ram.iter().enumerate() {
                    layout.push((format!("ram{i}"), *gpa, *size, Content::Zero));
                }
                for i in 0..config.vcpus {
                    boot.push(BootState {
                        rip: image.entry,
                        rsp: payload::stack_top(i),
                        rdi: i as u64,
                        rsi: config.vcpus as u64,
                        rdx: PARAMS_GPA,
                        rflags: arch::RFLAGS_PAYLOAD,
                        cr3: PML4_GPA,
                        gdt: GDT_GPA,
                        tss: TSS_GPA,
                        idt: None,
                        gs_base: 0,
                        user: true,
                        runnable: true,
                    });
                }
            }
            GuestConfig::Program { path, args } => {
                let prog = payload::user::load(path, args, config.memory, config.vcpus)
                    .map_err(Error::Config)?;
                layout = prog.regions(config.memory);
                boot = prog.boot;
            }
            GuestConfig::Linux { .. } => {
                for (i, (gpa, size)) in ram_ranges(0, config.memory).iter().enumerate() {
                    layout.push((format!("ram{i}"), *gpa, *size, Content::Zero));
                }
            }
        }

        let uffd = match config.tracking {
            Tracking::None => None,
            _ => Some(Arc::new(Userfault::new()?)),
        };
        let ram = Arc::new(GuestRam::new(config.backing, uffd.clone(), layout)?);
        let mmu = Mmu::new(mmu::Config {
            lock: config.lock,
            ..mmu::Config::default()
        })?;
        let mut slots = Vec::new();
        for (i, r) in ram.regions().iter().enumerate() {
            let id = mmu.add_region(mmu::RegionSpec {
                name: r.name.clone(),
                gpa: r.gpa,
                size: r.size,
                hva: r.hva,
            })?;
            kvm.set_slot(i as u32, r.gpa, r.size, r.hva)?;
            slots.push(Slot {
                slot: i as u32,
                region: id,
                ram_index: i,
            });
        }
        let fault_thread = match uffd.clone() {
            Some(uffd) => Some(
                FaultThread::spawn(
                    config.tracking,
                    config.fault_around,
                    uffd,
                    ram.clone(),
                    mmu.clone(),
                )
                .map_err(|source| Error::Io {
                    what: "starting the fault thread",
                    source,
                })?,
            ),
            None => None,
        };
        let gate = Arc::new(RunGate::default());
        let epochs = Arc::new(Epochs::default());
        let slots_len = slots.len();
        let mirror = Arc::new(KvmMirror::new(
            ram.clone(),
            kvm.clone(),
            gate.clone(),
            slots,
            Arc::downgrade(&mmu),
            epochs.clone(),
        ));
        let mirror_id = mmu.register_mirror(mirror.clone());

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Io {
            what: "creating the serial interrupt eventfd",
            source,
        })?;
        if kvm.irqchip {
            kvm.fd
                .register_irqfd(&serial_irq, COM1_IRQ)
                .map_err(|source| VmError::Setup {
                    what: "the serial irqfd",
                    source,
                })?;
        }
        let fault_stats = fault_thread
            .as_ref()
            .map(|f| f.stats.clone())
            .unwrap_or_else(|| FaultThread::idle_stats(slots_len));
        let (rnic, assigned) = match &config.rnic {
            RnicChoice::None => (None, None),
            RnicChoice::Assigned(name) => {
                let dev = rdma_passthrough::assigned::AssignedRnic::open(name)
                    .map_err(|e| Error::Config(e.to_string()))?;
                let regions = ram.regions();
                let (lo, hi) = (&regions[0], &regions[regions.len() - 1]);
                let mr = dev
                    .reg_odp(lo.hva, hi.hva + hi.size - lo.hva)
                    .map_err(|e| Error::Config(e.to_string()))?;
                mmu.register_mirror(Arc::new(rdma_passthrough::assigned::AssignedMirror {
                    stats: dev.stats.clone(),
                }));
                (None, Some((dev, mr)))
            }
            choice => {
                let (nic, peer) = match choice {
                    RnicChoice::Shared(nic, peer) => (nic.clone(), peer.clone()),
                    _ => {
                        let nic = rdma_passthrough::EmulatedRnic::new(Default::default());
                        let peer = HostPeer::new(&nic, PEER_BUFFER)
                            .map_err(|e| Error::Config(e.to_string()))?;
                        (nic, peer)
                    }
                };
                let resolver = crate::fault::GuestResolver::new(
                    uffd.clone(),
                    ram.clone(),
                    &mmu,
                    fault_stats.clone(),
                );
                let space =
                    rdma_passthrough::AddressSpace::new("guest", mmu.clone(), Arc::new(resolver));
                // A Linux guest owns all its RAM; built-in and user programs
                // run in ring 3 above the VMM's boot region, which their
                // DMA must not reach either.
                let floor = match config.guest {
                    GuestConfig::Linux { .. } => 0,
                    _ => PAYLOAD_RAM_GPA,
                };
                let dev = RnicDevice::new(nic, space, ram.clone(), peer, config.vcpus, floor)
                    .map_err(|e| Error::Config(e.to_string()))?;
                (Some(Arc::new(dev)), None)
            }
        };
        let devices = Arc::new(Devices {
            testdev: Arc::new(TestDevice::with_console(
                config.vcpus,
                config.console.clone(),
                epochs,
            )),
            serial: Some(Arc::new(SerialPort::new(
                serial_irq,
                config.console.clone(),
            ))),
            rnic,
        });

        if let GuestConfig::Linux {
            kernel,
            initrd,
            cmdline,
        } = &config.guest
        {
            let entry = linux::load(
                &ram.memory(),
                kernel,
                initrd.as_deref(),
                cmdline,
                config.memory,
            )?;
            for i in 0..config.vcpus {
                boot.push(BootState {
                    runnable: i == 0,
                    ..entry.clone()
                });
            }
        }
        let vcpus = boot
            .iter()
            .enumerate()
            .map(|(i, b)| Vcpu::new(&kvm.kvm, &kvm.fd, i, b))
            .collect::<Result<Vec<_>, _>>()?;

        let core = Arc::new(Core {
            uffd,
            _assigned: assigned,
            faults: fault_stats,
            mmu,
            ram,
            _kvm: kvm,
            gate,
            devices,
            mirror,
            kvm_mirror_id: Mutex::new(Some(mirror_id)),
            ends: Mutex::new(vec![None; config.vcpus]),
            done: Condvar::new(),
            stop_reason: Mutex::new(None),
            config,
            created: t0,
            started: Instant::now(),
        });
        Ok(Vm {
            core,
            vcpus,
            threads: Vec::new(),
            fault_thread,
            boot_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    pub fn handle(&self) -> VmHandle {
        VmHandle(self.core.clone())
    }

    /// Start every vCPU on its own thread.
    pub fn start(&mut self) -> Result<(), Error> {
        for vcpu in self.vcpus.drain(..) {
            let core = self.core.clone();
            let index = vcpu.index;
            let t = std::thread::Builder::new()
                .name(format!("odpvm-vcpu{index}"))
                .spawn(move || {
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
