//! Linux direct boot (bzImage, 64-bit boot protocol): kernel, initrd,
//! command line, zero page with an e820 map, identity page tables, GDT.
//!
//! Every write below goes through userfaultfd like any other access, so
//! the pages the loader touches are tracked from the start.
//!
//! On a host whose KVM emulates ring 0 (like the nested one this project
//! is developed on) a stock kernel is far too slow to reach user space;
//! boot is tested by hand or on hosts with VMX/SVM (see the README).

use crate::arch;
use crate::layout::{ram_ranges, HUGE, MMIO_HOLE_END, MMIO_HOLE_START};
use crate::vstate::vcpu::BootState;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, Cmdline, KernelLoader};
use std::fs::File;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("loading the kernel {path}: {source}")]
    Kernel {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("the initrd {path} ({size} bytes) does not fit in low memory")]
    InitrdTooBig { path: String, size: u64 },
    #[error("writing boot structures into guest memory: {0}")]
    Write(String),
    #[error("command line: {0}")]
    Cmdline(String),
}

const GDT: u64 = 0x500;
const TSS: u64 = 0x600;
const BOOT_STACK: u64 = 0x8ff0;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const ZERO_PAGE: u64 = 0x7000;
const CMDLINE: u64 = 0x20000;
const CMDLINE_MAX: usize = 4096;
const HIMEM_START: u64 = 0x10_0000;
const EBDA_START: u64 = 0x9_fc00;
const E820_RAM: u32 = 1;
/// Options a guest needs under KVMs that emulate ring 0 (see README).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 noxsave nokaslr";

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, v: T, at: u64) -> Result<(), LinuxError> {
    mem.write_obj(v, GuestAddress(at))
        .map_err(|e| LinuxError::Write(format!("at {at:#x}: {e}")))
}

/// Load the kernel (and initrd) and return where vCPUs start.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    memory: u64,
) -> Result<BootState, LinuxError> {
    let open = |p: &Path| {
        File::open(p).map_err(|source| LinuxError::Open {
            path: p.display().to_string(),
            source,
        })
    };
    let mut image = open(kernel)?;
    let loaded = BzImage::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START))).map_err(
        |source| LinuxError::Kernel {
            path: kernel.display().to_string(),
            source,
        },
    )?;

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cl)
        .map_err(|e| LinuxError::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;

    let ram = ram_ranges(0, memory);
    let low_end = ram[0].1;
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(|source| LinuxError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let size = data.len() as u64;
        let top = low_end.min(MMIO_HOLE_START);
        let addr = top
            .checked_sub(size)
            .map(|a| a & !(HUGE - 1))
            .filter(|a| *a > loaded.kernel_end)
            .ok_or(LinuxError::InitrdTooBig {
                path: path.display().to_string(),
                size,
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| LinuxError::Write(e.to_string()))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![(0, EBDA_START), (HIMEM_START, low_end - HIMEM_START)];
    if let Some(&(gpa, size)) = ram.get(1) {
        debug_assert_eq!(gpa, MMIO_HOLE_END);
        e820.push((gpa, size));
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| LinuxError::Write(e.to_string()))?;

    // Identity-map the first GiB with 2 MiB pages; the kernel builds its own.
    write(mem, PDPT | arch::PTE_P | arch::PTE_W, PML4)?;
    write(mem, PD | arch::PTE_P | arch::PTE_W, PDPT)?;
    for i in 0..512u64 {
        write(
            mem,
            (i * HUGE) | arch::PTE_P | arch::PTE_W | arch::PTE_PS,
            PD + i * 8,
        )?;
    }
    for (i, d) in arch::gdt(TSS).iter().enumerate() {
        write(mem, *d, GDT + i as u64 * 8)?;
    }

    Ok(BootState {
        rip: loaded.kernel_load.0 + 0x200,
        rsp: BOOT_STACK,
        rsi: ZERO_PAGE,
        rdi: 0,
        rdx: 0,
        rflags: 2,
        cr3: PML4,
        gdt: GDT,
        tss: TSS,
        idt: None,
        gs_base: 0,
        user: false,
        runnable: true,
    })
}
