//! Building a VM, one step per part in the order `Vm::new` takes them: the
//! guest's memory layout (the payload image, a user program, or plain RAM
//! for Linux), guest RAM with its mmu regions and KVM slots, the fault
//! thread, the KVM mirror, the serial port, the RNIC (none, emulated or
//! assigned), the devices, the Linux load, the vCPUs.

use super::{Core, Error, GuestConfig, RnicChoice, Vm, VmConfig, PEER_BUFFER};
use crate::devices::rnic::{HostPeer, RnicDevice};
use crate::devices::serial::{SerialPort, COM1_IRQ};
use crate::devices::testdev::{Epochs, TestDevice};
use crate::devices::Devices;
use crate::fault::{FaultStats, FaultThread, Tracking};
use crate::kvm_mirror::{KvmMirror, Slot};
use crate::layout::*;
use crate::memory::{Content, GuestRam};
use crate::payload::{self, Guest, PayloadParams};
use crate::uffd::Userfault;
use crate::vstate::gate::{install_kick_handler, RunGate};
use crate::vstate::vcpu::{BootState, Vcpu};
use crate::vstate::vm::{KvmVm, VmError};
use crate::{arch, linux};
use mmu::Mmu;
use parking_lot::{Condvar, Mutex};
use rdma_passthrough::assigned::{AssignedMr, AssignedRnic};
use std::sync::Arc;
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical regions: name, address, size, initial content.
type Layout = Vec<(String, u64, u64, Content)>;

/// The RNIC a VM ends up with: the emulated device the guest drives, or a
/// real device with guest RAM registered as one ODP MR.
type Rnic = (Option<Arc<RnicDevice>>, Option<(AssignedRnic, AssignedMr)>);

impl Vm {
    pub fn new(config: VmConfig) -> Result<Vm, Error> {
        let t0 = Instant::now();
        crate::contention::tune_allocator();
        install_kick_handler().map_err(|e| Error::Io {
            what: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let kvm = Arc::new(KvmVm::new()?);
        config.validate(kvm.max_vcpus())?;

        let (layout, mut boot) = guest_layout(&config)?;
        let uffd = match config.tracking {
            Tracking::None => None,
            _ => Some(Arc::new(Userfault::new()?)),
        };
        let ram = Arc::new(GuestRam::new(config.backing, uffd.clone(), layout)?);
        let mmu = Mmu::new(mmu::Config {
            lock: config.lock,
            ..mmu::Config::default()
        })?;
        let slots = attach_memory(&kvm, &ram, &mmu)?;
        let fault_thread = attach_fault_thread(&config, uffd.clone(), &ram, &mmu)?;
        let gate = Arc::new(RunGate::default());
        let epochs = Arc::new(Epochs::default());
        let fault_stats = fault_thread
            .as_ref()
            .map(|f| f.stats.clone())
            .unwrap_or_else(|| FaultThread::idle_stats(slots.len()));
        let mirror = Arc::new(KvmMirror::new(
            ram.clone(),
            kvm.clone(),
            gate.clone(),
            slots,
            Arc::downgrade(&mmu),
            epochs.clone(),
        ));
        let mirror_id = mmu.register_mirror(mirror.clone());

        let serial = attach_serial(&kvm, &config)?;
        let (rnic, assigned) = attach_rnic(&config, &uffd, &ram, &mmu, &fault_stats)?;
        let devices = Arc::new(Devices {
            testdev: Arc::new(TestDevice::with_console(
                config.vcpus,
                config.console.clone(),
                epochs,
            )),
            serial: Some(serial),
            rnic,
        });
        if let GuestConfig::Linux { .. } = &config.guest {
            boot = load_linux(&config, &ram)?;
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
            helpers_placed: Mutex::new(None),
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
}

/// Guest-physical layout, and each vCPU's boot state where it is known
/// before RAM exists (a Linux guest's comes from `load_linux`).
fn guest_layout(config: &VmConfig) -> Result<(Layout, Vec<BootState>), Error> {
    match &config.guest {
        GuestConfig::Builtin(guest) => payload_image(*guest, config),
        GuestConfig::Program { path, args } => {
            let prog = payload::user::load(path, args, config.memory, config.vcpus)
                .map_err(Error::Config)?;
            Ok((prog.regions(config.memory), prog.boot))
        }
        GuestConfig::Linux { .. } => {
            let layout = ram_ranges(0, config.memory)
                .iter()
                .enumerate()
                .map(|(i, (gpa, size))| (format!("ram{i}"), *gpa, *size, Content::Zero))
                .collect();
            Ok((layout, Vec::new()))
        }
    }
}

/// A built-in payload: its image in the boot region, RAM above, and every
/// vCPU entering the image in ring 3 with its index and the parameters.
fn payload_image(guest: Guest, config: &VmConfig) -> Result<(Layout, Vec<BootState>), Error> {
    let ram = ram_ranges(PAYLOAD_RAM_GPA, config.memory);
    let params = PayloadParams {
        vcpus: config.vcpus as u64,
        seed: config.seed,
        // 0: `writer` runs until asked to stop.
        rounds: if guest == Guest::Writer {
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
    let image = Arc::new(payload::build_image(guest, &params, &ram).map_err(Error::Config)?);
    let mut layout = vec![(
        "boot".to_string(),
        0,
        BOOT_REGION_SIZE,
        Content::Image(image.clone()),
    )];
    for (i, (gpa, size)) in ram.iter().enumerate() {
        layout.push((format!("ram{i}"), *gpa, *size, Content::Zero));
    }
    let boot = (0..config.vcpus)
        .map(|i| BootState {
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
        })
        .collect();
    Ok((layout, boot))
}

/// Each RAM region becomes an mmu region and a KVM memory slot.
fn attach_memory(kvm: &KvmVm, ram: &GuestRam, mmu: &Arc<Mmu>) -> Result<Vec<Slot>, Error> {
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
    Ok(slots)
}

/// The thread answering guest page faults (none without userfaultfd).
fn attach_fault_thread(
    config: &VmConfig,
    uffd: Option<Arc<Userfault>>,
    ram: &Arc<GuestRam>,
    mmu: &Arc<Mmu>,
) -> Result<Option<FaultThread>, Error> {
    let Some(uffd) = uffd else {
        return Ok(None);
    };
    FaultThread::spawn(
        config.tracking,
        config.fault_around,
        uffd,
        ram.clone(),
        mmu.clone(),
    )
    .map(Some)
    .map_err(|source| Error::Io {
        what: "starting the fault thread",
        source,
    })
}

/// The COM1 serial port, its interrupt wired through an irqfd when KVM has
/// an in-kernel irqchip.
fn attach_serial(kvm: &KvmVm, config: &VmConfig) -> Result<Arc<SerialPort>, Error> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Io {
        what: "creating the serial interrupt eventfd",
        source,
    })?;
    if kvm.irqchip {
        kvm.fd
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(|source| VmError::Setup {
                what: "the serial irqfd",
                source,
            })?;
    }
    Ok(Arc::new(SerialPort::new(irq, config.console.clone())))
}

/// The VM's RNIC, as `config.rnic` chooses.
fn attach_rnic(
    config: &VmConfig,
    uffd: &Option<Arc<Userfault>>,
    ram: &Arc<GuestRam>,
    mmu: &Arc<Mmu>,
    fault_stats: &Arc<FaultStats>,
) -> Result<Rnic, Error> {
    match &config.rnic {
        RnicChoice::None => Ok((None, None)),
        RnicChoice::Assigned(name) => attach_assigned_rnic(name, ram, mmu),
        RnicChoice::Shared(nic, peer) => attach_emulated_rnic(
            config,
            nic.clone(),
            peer.clone(),
            uffd,
            ram,
            mmu,
            fault_stats,
        ),
        RnicChoice::Emulated => {
            let nic = rdma_passthrough::EmulatedRnic::new(Default::default());
            let peer =
                HostPeer::new(&nic, PEER_BUFFER).map_err(|e| Error::Config(e.to_string()))?;
            attach_emulated_rnic(config, nic, peer, uffd, ram, mmu, fault_stats)
        }
    }
}

/// A real device: guest RAM (one span from the first region to the last)
/// registered as one ODP MR, kept coherent by a mirror of the mmu.
fn attach_assigned_rnic(name: &str, ram: &GuestRam, mmu: &Arc<Mmu>) -> Result<Rnic, Error> {
    let dev = AssignedRnic::open(name).map_err(|e| Error::Config(e.to_string()))?;
    let regions = ram.regions();
    let (lo, hi) = (&regions[0], &regions[regions.len() - 1]);
    let mr = dev
        .reg_odp(lo.hva, hi.hva + hi.size - lo.hva)
        .map_err(|e| Error::Config(e.to_string()))?;
    mmu.register_mirror(Arc::new(rdma_passthrough::assigned::AssignedMirror {
        stats: dev.stats.clone(),
    }));
    Ok((None, Some((dev, mr))))
}

/// The paravirtual RNIC device on an emulated RNIC: guest memory is its
/// address space, made present through the same protocol as vCPU faults.
fn attach_emulated_rnic(
    config: &VmConfig,
    nic: Arc<rdma_passthrough::EmulatedRnic>,
    peer: Arc<HostPeer>,
    uffd: &Option<Arc<Userfault>>,
    ram: &Arc<GuestRam>,
    mmu: &Arc<Mmu>,
    fault_stats: &Arc<FaultStats>,
) -> Result<Rnic, Error> {
    let resolver =
        crate::fault::GuestResolver::new(uffd.clone(), ram.clone(), mmu, fault_stats.clone());
    let space = rdma_passthrough::AddressSpace::new("guest", mmu.clone(), Arc::new(resolver));
    // A Linux guest owns all its RAM; built-in and user programs run in
    // ring 3 above the VMM's boot region, which their DMA must not reach
    // either.
    let floor = match config.guest {
        GuestConfig::Linux { .. } => 0,
        _ => PAYLOAD_RAM_GPA,
    };
    let dev = RnicDevice::new(nic, space, ram.clone(), peer, config.vcpus, floor)
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok((Some(Arc::new(dev)), None))
}

/// Load a Linux kernel (and initrd) into guest RAM: vCPU 0 starts at its
/// entry, the others wait for the guest to start them.
fn load_linux(config: &VmConfig, ram: &GuestRam) -> Result<Vec<BootState>, Error> {
    let GuestConfig::Linux {
        kernel,
        initrd,
        cmdline,
    } = &config.guest
    else {
        return Ok(Vec::new());
    };
    let entry = linux::load(
        &ram.memory(),
        kernel,
        initrd.as_deref(),
        cmdline,
        config.memory,
    )?;
    Ok((0..config.vcpus)
        .map(|i| BootState {
            runnable: i == 0,
            ..entry.clone()
        })
        .collect())
}
