//! User guest programs (`odpvm run --payload FILE`): a static x86-64 ELF
//! run in ring 3 on every vCPU, against the same RAM, mmu and devices as
//! the built-in payloads.
//!
//! ```text
//!   [0, 4K)            unmapped: a NULL dereference is a page fault
//!   PARAMS_GPA         ProgramParams (user, read-only)      rdx points here
//!   STUB_GPA           where `_start` returns to: EXIT with its eax
//!   VCPU_INFO_GPA      per-vCPU VcpuInfo (user, read-only; %gs points at
//!                      the vCPU's own)
//!   [IDT_GPA, ...)     supervisor only: IDT, page tables, exception
//!                      handlers, per-vCPU GDT+TSS, per-vCPU kernel stacks
//!   [2 MiB, prog_end)  the program's segments, then one STACK_SIZE stack
//!                      per vCPU (rsp = its top - 8, holding STUB_GPA)
//!   [prog_end, ...)    the rest of RAM, zero; [3 GiB, 4 GiB) is the MMIO
//!                      hole: only the device page at 0xd000_0000 is mapped
//! ```
//!
//! RAM is identity mapped (virtual = guest-physical), user and writable,
//! in 2 MiB pages. The boot region is served on first touch from the image
//! like a built-in payload's; so is the program region (after a teardown
//! the program's pages read as loaded again, the rest of RAM as zero).
//!
//! Exceptions: every vector 0-31 has a ring-0 handler that reports the
//! vector, error code, rip, cr2 and cs through the test device
//! (`CMD_CLEAR`, seven `ARG`s, `CMD_CRASH`), which ends that vCPU. Each
//! vCPU has its own GDT and TSS, so two vCPUs faulting at once use two
//! kernel stacks. (Measured on the PVM host: without an IDT a ring-3
//! exception is a triple fault, `KVM_EXIT_SHUTDOWN`; test
//! `guest_sdk::crashes_are_reported_with_vector_rip_and_address`.)

use super::elf::ElfProgram;
use super::BootImage;
use crate::arch::{self, PTE_P, PTE_PS, PTE_U, PTE_W};
use crate::devices::testdev::{ARG, CMD, CMD_CLEAR, CMD_CRASH, CRASH_ARGS, EXIT};
use crate::layout::*;
use crate::vstate::vcpu::BootState;
use core::mem::{offset_of, size_of};
use iced_x86::code_asm::*;

// SAFETY: `ProgramParams` is `repr(C)`, integers only, without padding
// (its size is asserted below to be the sum of its fields'): every byte
// pattern is a valid value.
unsafe impl vm_memory::ByteValued for ProgramParams {}

/// The parameter block (`rdx` at entry). Guest ABI: the SDK headers are
/// generated from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramParams {
    /// `PARAMS_MAGIC`.
    pub magic: u64,
    pub version: u32,
    pub vcpus: u32,
    /// RAM is `[ram_start, ram_low_end)` and, when it is larger than fits
    /// below the MMIO hole, `[4 GiB, ram_high_end)` (else `ram_high_end`
    /// is 0).
    pub ram_start: u64,
    pub ram_low_end: u64,
    pub ram_high_end: u64,
    /// First byte of RAM after the program and its stacks (2 MiB aligned):
    /// everything from here is free for the program.
    pub free_start: u64,
    pub stack_size: u64,
    /// `--payload-arg` values, in order.
    pub nargs: u64,
    pub args: [u64; MAX_PROGRAM_ARGS],
}

/// What `%gs:0` points at: this vCPU's identity. It is part of the boot
/// image, so unlike the program's variables it survives a teardown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuInfo {
    pub index: u64,
    pub vcpus: u64,
}

// SAFETY: `repr(C)`, two u64, no padding: every byte pattern is valid.
unsafe impl vm_memory::ByteValued for VcpuInfo {}

pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"ODPVMUSR");
pub const PARAMS_VERSION: u32 = 1;
/// Most `--payload-arg`s.
pub const MAX_PROGRAM_ARGS: usize = 16;
/// Each vCPU's stack.
pub const STACK_SIZE: u64 = 256 << 10;
/// Where programs are linked (`guest/link.ld`): the start of RAM.
pub const LOAD_BASE: u64 = PAYLOAD_RAM_GPA;

pub const PARAMS_GPA: u64 = 0x1000;
pub const STUB_GPA: u64 = 0x2000;
const IDT_GPA: u64 = 0x3000;
const PML4: u64 = 0x4000;
const PDPT: u64 = 0x5000;
/// 4 KiB page table of the boot region.
const PT_BOOT: u64 = 0x6000;
const HANDLERS_GPA: u64 = 0x7000;
/// One page directory per GiB of the identity map.
const PDS_GPA: u64 = 0x1_0000;
const MAX_GIB: u64 = 66;
/// Per vCPU: its GDT at +0, its TSS at +0x80.
const CPU_BLOCKS_GPA: u64 = 0x6_0000;
const CPU_BLOCK: u64 = 0x100;
const KSTACKS_GPA: u64 = 0x8_0000;
const KSTACK: u64 = PAGE;
/// Per-vCPU info blocks (`VcpuInfo`, user read-only), one page for all:
/// GS points at a vCPU's own block.
pub const VCPU_INFO_GPA: u64 = 0xc_0000;
/// The exception stubs, 16 bytes each; their common tail after them.
const STUB_BYTES: u64 = 16;
const EXCEPTIONS: u64 = 32;

// The per-vCPU areas and the page directories fit the boot region.
const _: () = assert!(PDS_GPA + MAX_GIB * PAGE <= CPU_BLOCKS_GPA);
const _: () = assert!(CPU_BLOCKS_GPA + MAX_VCPUS as u64 * CPU_BLOCK <= KSTACKS_GPA);
const _: () = assert!(KSTACKS_GPA + MAX_VCPUS as u64 * KSTACK <= VCPU_INFO_GPA);
const _: () = assert!(MAX_VCPUS as u64 * size_of::<VcpuInfo>() as u64 <= PAGE);
const _: () = assert!(VCPU_INFO_GPA + PAGE <= BOOT_REGION_SIZE);
const _: () = assert!(size_of::<ProgramParams>() as u64 <= PAGE);
const _: () = assert!(offset_of!(ProgramParams, args) == 64);
const _: () = assert!(size_of::<ProgramParams>() == 64 + 8 * MAX_PROGRAM_ARGS);

/// Vectors that push an error code.
fn has_error_code(v: u64) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Exception mnemonic and name for reports.
pub fn exception_name(vector: u32) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point error"),
        21 => ("#CP", "control protection"),
        _ => ("#??", "reserved exception"),
    }
}

/// A crash as the handlers reported it (`CRASH_ARGS` arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crash {
    pub vector: u32,
    pub error_code: u32,
    pub rip: u64,
    pub address: u64,
    pub cs: u16,
}

impl Crash {
    /// The crash a vCPU's report describes, if it is one.
    pub fn of(r: &crate::devices::testdev::VcpuReport) -> Option<Crash> {
        match r.ending {
            crate::devices::testdev::Ending::Crash => Crash::from_args(&r.args),
            _ => None,
        }
    }

    pub fn from_args(a: &[u32]) -> Option<Crash> {
        (a.len() == CRASH_ARGS).then(|| Crash {
            vector: a[0],
            error_code: a[1],
            rip: u64::from(a[2]) | u64::from(a[3]) << 32,
            address: u64::from(a[4]) | u64::from(a[5]) << 32,
            cs: a[6] as u16,
        })
    }

    /// One line: "vCPU 1: #PF (page fault) at rip 0x401000, address 0x0, error 0x4".
    pub fn describe(&self, vcpu: usize) -> String {
        let (short, long) = exception_name(self.vector);
        let mut s = format!("vCPU {vcpu}: {short} ({long}) at rip {:#x}", self.rip);
        if self.vector == 3 || self.vector == 4 {
            s += " (a trap: rip is past the instruction)";
        }
        if self.vector == 14 {
            s += &format!(", address {:#x}", self.address);
        }
        if has_error_code(u64::from(self.vector)) {
            s += &format!(", error code {:#x}", self.error_code);
        }
        if self.cs & 3 != 3 {
            s += " (in the VMM's exception handler)";
        }
        s
    }
}

/// Guest RAM of a program VM: the regions to map (name, gpa, size, with
/// the image or zero) and where the program's region ends.
pub struct ProgramLayout {
    pub image: std::sync::Arc<BootImage>,
    /// `[PAYLOAD_RAM_GPA, program_end)` is served from the image.
    pub program_end: u64,
    pub boot: Vec<BootState>,
}

/// Read, check and lay out the program at `path` for a VM of `memory`
/// bytes and `vcpus` vCPUs. Errors are one line naming the file.
pub fn load(
    path: &std::path::Path,
    args: &[u64],
    memory: u64,
    vcpus: usize,
) -> Result<ProgramLayout, String> {
    let what = |e: String| format!("--payload {}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| what(e.to_string()))?;
    if !meta.is_file() {
        return Err(what("not a regular file".into()));
    }
    if meta.len() > memory {
        return Err(what(format!(
            "the file ({} bytes) is larger than the VM's RAM ({} bytes)",
            meta.len(),
            memory
        )));
    }
    let file = std::fs::read(path).map_err(|e| what(e.to_string()))?;
    let prog = super::elf::parse(&file).map_err(what)?;
    build(&prog, args, memory, vcpus).map_err(what)
}

impl ProgramLayout {
    /// Guest RAM regions: the boot region and the program's (both served
    /// from the image), then zero RAM around the MMIO hole.
    pub fn regions(&self, memory: u64) -> Vec<(String, u64, u64, crate::memory::Content)> {
        use crate::memory::Content;
        let image = self.image.clone();
        let span = self.program_end - PAYLOAD_RAM_GPA;
        let mut v = vec![
            (
                "boot".to_string(),
                0,
                BOOT_REGION_SIZE,
                Content::Image(image.clone()),
            ),
            (
                "program".to_string(),
                PAYLOAD_RAM_GPA,
                span,
                Content::Image(image),
            ),
        ];
        if memory > span {
            for (i, (gpa, size)) in ram_ranges(self.program_end, memory - span)
                .into_iter()
                .enumerate()
            {
                v.push((format!("ram{i}"), gpa, size, Content::Zero));
            }
        }
        v
    }
}

/// A vCPU's line in the run report: its exit status, or its crash.
pub fn vcpu_json(index: usize, end: Option<&crate::vstate::vcpu::VcpuEnd>) -> serde_json::Value {
    use crate::devices::testdev::Ending;
    use crate::vstate::vcpu::VcpuEnd;
    match end {
        Some(VcpuEnd::Finished(r)) => match r.ending {
            Ending::Exit(code) => serde_json::json!({
                "passed": r.passed,
                "exit_code": code as i32,
            }),
            Ending::Crash => {
                let c = Crash::from_args(&r.args).expect("the device checks crash reports");
                let (short, long) = exception_name(c.vector);
                serde_json::json!({
                    "passed": false,
                    "crash": c.describe(index),
                    "exception": short,
                    "exception_name": long,
                    "vector": c.vector,
                    "rip": format!("{:#x}", c.rip),
                    "address": format!("{:#x}", c.address),
                    "error_code": c.error_code,
                })
            }
            Ending::Verdict => serde_json::json!({ "passed": r.passed }),
        },
        Some(other) => serde_json::json!({ "passed": false, "end": format!("{other:?}") }),
        None => serde_json::json!({ "passed": false, "end": "running" }),
    }
}

/// Where a program goes in a VM's RAM.
struct Placement {
    ram: Vec<(u64, u64)>,
    /// End of RAM below the MMIO hole.
    low_end: u64,
    /// vCPU 0's stack; the others follow.
    stacks: u64,
    program_end: u64,
}

/// Check that `prog`'s segments and `vcpus` stacks fit a VM of `memory`
/// bytes, above the VMM's boot region and below the MMIO hole.
fn place(prog: &ElfProgram, memory: u64, vcpus: usize) -> Result<Placement, String> {
    let ram = ram_ranges(PAYLOAD_RAM_GPA, memory);
    let low_end = ram[0].0 + ram[0].1;
    let ram_end = ram.last().map_or(0, |r| r.0 + r.1);
    if memory > MAX_PAYLOAD_RAM - GIB || ram_end > MAX_GIB * GIB {
        return Err(format!(
            "guest programs support at most {} GiB of memory",
            (MAX_PAYLOAD_RAM - GIB) >> 30
        ));
    }
    for s in &prog.segments {
        let end = s.vaddr + s.memsz;
        if s.vaddr < LOAD_BASE {
            return Err(format!(
                "segment [{:#x}, {end:#x}) overlaps the VMM's reserved area [0, {LOAD_BASE:#x}) (link with guest/link.ld)",
                s.vaddr
            ));
        }
        if end > low_end {
            return Err(format!(
                "segment [{:#x}, {end:#x}) lies past the end of RAM below the MMIO hole ({low_end:#x} with --memory {} MiB)",
                s.vaddr,
                memory >> 20
            ));
        }
    }
    let segs_end = prog
        .segments
        .iter()
        .map(|s| s.vaddr + s.memsz)
        .max()
        .unwrap_or(LOAD_BASE);
    let stacks = segs_end.next_multiple_of(PAGE);
    let program_end = (stacks + vcpus as u64 * STACK_SIZE).next_multiple_of(HUGE);
    if program_end > low_end {
        return Err(format!(
            "the program ({} KiB) and {vcpus} stacks of {} KiB do not fit in {} MiB of RAM",
            (segs_end - LOAD_BASE) >> 10,
            STACK_SIZE >> 10,
            memory >> 20
        ));
    }
    Ok(Placement {
        ram,
        low_end,
        stacks,
        program_end,
    })
}

/// Check `prog` against a VM of `memory` bytes and `vcpus` vCPUs and build
/// its image. Errors are one line.
pub fn build(
    prog: &ElfProgram,
    args: &[u64],
    memory: u64,
    vcpus: usize,
) -> Result<ProgramLayout, String> {
    if args.len() > MAX_PROGRAM_ARGS {
        return Err(format!(
            "at most {MAX_PROGRAM_ARGS} --payload-arg values ({} given)",
            args.len()
        ));
    }
    let at = place(prog, memory, vcpus)?;
    let mut img = BootImage::default();
    for s in &prog.segments {
        img.write(s.vaddr, &s.data);
    }
    boot_region(&mut img, &at.ram, vcpus)?;
    let params = ProgramParams {
        magic: PARAMS_MAGIC,
        version: PARAMS_VERSION,
        vcpus: vcpus as u32,
        ram_start: PAYLOAD_RAM_GPA,
        ram_low_end: at.low_end,
        ram_high_end: at.ram.get(1).map_or(0, |r| r.0 + r.1),
        free_start: at.program_end,
        stack_size: STACK_SIZE,
        nargs: args.len() as u64,
        args: std::array::from_fn(|i| args.get(i).copied().unwrap_or(0)),
    };
    img.write(PARAMS_GPA, vm_memory::ByteValued::as_slice(&params));
    let boot = (0..vcpus)
        .map(|i| vcpu_start(&mut img, prog.entry, at.stacks, i, vcpus))
        .collect();
    img.entry = prog.entry;
    Ok(ProgramLayout {
        image: std::sync::Arc::new(img),
        program_end: at.program_end,
        boot,
    })
}

/// vCPU `i`'s registers, stack and info block.
fn vcpu_start(img: &mut BootImage, entry: u64, stacks: u64, i: usize, vcpus: usize) -> BootState {
    let top = stacks + (i as u64 + 1) * STACK_SIZE;
    // As if `_start` had been called from the stub: the ABI's stack
    // alignment, and a return address that ends the program.
    img.write_u64(top - 8, STUB_GPA);
    let block = CPU_BLOCKS_GPA + i as u64 * CPU_BLOCK;
    let info = VCPU_INFO_GPA + i as u64 * size_of::<VcpuInfo>() as u64;
    let me = VcpuInfo {
        index: i as u64,
        vcpus: vcpus as u64,
    };
    img.write(info, vm_memory::ByteValued::as_slice(&me));
    BootState {
        rip: entry,
        rsp: top - 8,
        rdi: i as u64,
        rsi: vcpus as u64,
        rdx: PARAMS_GPA,
        rflags: arch::RFLAGS_PAYLOAD,
        cr3: PML4,
        gdt: block,
        tss: block + 0x80,
        idt: Some((IDT_GPA, (EXCEPTIONS * 16 - 1) as u16)),
        gs_base: info,
        user: true,
        runnable: true,
    }
}

/// Page tables, IDT, handlers, per-vCPU GDTs/TSSs and the exit stub.
fn boot_region(img: &mut BootImage, ram: &[(u64, u64)], vcpus: usize) -> Result<(), String> {
    let user = PTE_P | PTE_W | PTE_U;
    let sup = PTE_P | PTE_W;
    // Tables are reached from ring 3 too (U on the upper levels); the leaf
    // decides.
    img.write_u64(PML4, PDPT | user);
    let pd_of = |img: &mut BootImage, gib: u64| {
        let pd = PDS_GPA + gib * PAGE;
        img.write_u64(PDPT + gib * 8, pd | user);
        pd
    };
    // The boot region in 4 KiB pages: the params page and the stub are
    // readable from ring 3, the rest is the VMM's, page 0 is unmapped.
    let pd0 = pd_of(img, 0);
    img.write_u64(pd0, PT_BOOT | user);
    for page in 1..(BOOT_REGION_SIZE / PAGE) {
        let gpa = page * PAGE;
        let flags = match gpa {
            PARAMS_GPA | STUB_GPA | VCPU_INFO_GPA => PTE_P | PTE_U,
            _ => sup,
        };
        img.write_u64(PT_BOOT + page * 8, gpa | flags);
    }
    // RAM, identity, 2 MiB pages.
    for &(gpa, size) in ram {
        for chunk in (gpa..gpa + size).step_by(HUGE as usize) {
            let gib = chunk / GIB;
            let pd = pd_of(img, gib);
            img.write_u64(pd + (chunk % GIB) / HUGE * 8, chunk | user | PTE_PS);
        }
    }
    // The device page (test device and RNIC window) in the hole.
    const _: () = assert!(TESTDEV_MMIO_GPA / HUGE == (RNIC_MMIO_GPA + RNIC_MMIO_SIZE - 1) / HUGE);
    let dev = TESTDEV_MMIO_GPA & !(HUGE - 1);
    let pd = pd_of(img, dev / GIB);
    img.write_u64(pd + (dev % GIB) / HUGE * 8, dev | user | PTE_PS);

    let code = handlers().map_err(|e| format!("assembling the exception handlers: {e}"))?;
    img.write(HANDLERS_GPA, &code);
    for v in 0..EXCEPTIONS {
        // #BP and #OF come from int3/into in ring 3: their gates need DPL 3
        // (else the CPU raises #GP instead).
        let dpl = if v == 3 || v == 4 { 3 } else { 0 };
        img.write(IDT_GPA + v * 16, &gate(HANDLERS_GPA + v * STUB_BYTES, dpl));
    }
    let stub = exit_stub().map_err(|e| format!("assembling the exit stub: {e}"))?;
    img.write(STUB_GPA, &stub);
    for i in 0..vcpus as u64 {
        let block = CPU_BLOCKS_GPA + i * CPU_BLOCK;
        let tss = block + 0x80;
        for (j, d) in arch::gdt(tss).iter().enumerate() {
            img.write_u64(block + j as u64 * 8, *d);
        }
        // RSP0: this vCPU's kernel stack; no I/O bitmap.
        img.write_u64(tss + 4, KSTACKS_GPA + (i + 1) * KSTACK);
        img.write(tss + 0x66, &0x68u16.to_le_bytes());
    }
    Ok(())
}

/// A 64-bit interrupt gate to `target` in the kernel code segment.
fn gate(target: u64, dpl: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(target as u16).to_le_bytes());
    g[2..4].copy_from_slice(&arch::SEL_KCODE.to_le_bytes());
    g[5] = 0x8e | (dpl << 5);
    g[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    g
}

/// Stubs (push a zero error code where the CPU pushes none, push the
/// vector) and the common tail that reports through the test device.
fn handlers() -> Result<Vec<u8>, IcedError> {
    let common = HANDLERS_GPA + EXCEPTIONS * STUB_BYTES;
    let mut code = Vec::new();
    for v in 0..EXCEPTIONS {
        let mut a = CodeAssembler::new(64)?;
        if !has_error_code(v) {
            a.push(0)?;
        }
        a.push(v as i32)?;
        a.jmp(common)?;
        let mut stub = a.assemble(HANDLERS_GPA + v * STUB_BYTES)?;
        assert!(stub.len() as u64 <= STUB_BYTES, "exception stub too long");
        stub.resize(STUB_BYTES as usize, 0xcc);
        code.extend_from_slice(&stub);
    }
    // Frame: [rsp] vector, +8 error code, +16 rip, +24 cs.
    let mut a = CodeAssembler::new(64)?;
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(dword_ptr(rdx + CMD), CMD_CLEAR)?;
    for off in [0u64, 8] {
        a.mov(rax, qword_ptr(rsp + off))?;
        a.mov(dword_ptr(rdx + ARG), eax)?;
    }
    let push64 = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(dword_ptr(rdx + ARG), eax)?;
        a.shr(rax, 32)?;
        a.mov(dword_ptr(rdx + ARG), eax)
    };
    a.mov(rax, qword_ptr(rsp + 16u64))?;
    push64(&mut a)?;
    a.mov(rax, cr2)?;
    push64(&mut a)?;
    a.mov(rax, qword_ptr(rsp + 24u64))?;
    a.mov(dword_ptr(rdx + ARG), eax)?;
    a.mov(dword_ptr(rdx + CMD), CMD_CRASH)?;
    // The device ended this vCPU; never reached.
    let mut hang = a.create_label();
    a.set_label(&mut hang)?;
    a.pause()?;
    a.jmp(hang)?;
    code.extend_from_slice(&a.assemble(common)?);
    Ok(code)
}

/// `_start` returned: its eax is the exit status.
fn exit_stub() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(dword_ptr(rdx + EXIT), eax)?;
    let mut hang = a.create_label();
    a.set_label(&mut hang)?;
    a.pause()?;
    a.jmp(hang)?;
    a.assemble(STUB_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::elf::{ElfProgram, Segment};

    fn prog(vaddr: u64, memsz: u64) -> ElfProgram {
        ElfProgram {
            entry: vaddr,
            segments: vec![Segment {
                vaddr,
                memsz,
                data: vec![0xc3],
                executable: true,
            }],
        }
    }

    #[test]
    fn image_maps_ram_identity_and_gives_each_vcpu_its_stack_and_tss() {
        let l = build(&prog(LOAD_BASE, 0x1000), &[7, 9], 64 << 20, 2).unwrap();
        assert_eq!(l.program_end, LOAD_BASE + HUGE);
        let (b0, b1) = (&l.boot[0], &l.boot[1]);
        assert_eq!(b1.rsp - b0.rsp, STACK_SIZE);
        assert_ne!(b0.tss, b1.tss);
        let ret = l.image.page(b0.rsp & !(PAGE - 1)).unwrap();
        let off = (b0.rsp % PAGE) as usize;
        assert_eq!(
            u64::from_le_bytes(ret[off..off + 8].try_into().unwrap()),
            STUB_GPA
        );
        // RAM at 2 MiB is a user, writable, 2 MiB identity page.
        let pd0 = l.image.page(PDS_GPA).unwrap();
        let e = u64::from_le_bytes(pd0[8..16].try_into().unwrap());
        assert_eq!(e, LOAD_BASE | PTE_P | PTE_W | PTE_U | PTE_PS);
        let p = l.image.page(PARAMS_GPA).unwrap();
        assert_eq!(&p[..8], b"ODPVMUSR");
        assert_eq!(u64::from_le_bytes(p[64..72].try_into().unwrap()), 7);
    }

    #[test]
    fn programs_outside_ram_or_too_big_are_refused() {
        let e = |p: ElfProgram, mem: u64| build(&p, &[], mem, 2).err().expect("refused");
        assert!(e(prog(0x1000, 0x1000), 64 << 20).contains("reserved area"));
        assert!(e(prog(LOAD_BASE, (64 << 20) + 4096), 64 << 20).contains("past the end of RAM"));
        assert!(e(prog(LOAD_BASE, (63 << 20) + (768 << 10)), 64 << 20).contains("do not fit"));
        assert!(build(&prog(LOAD_BASE, 1), &[0; 17], 64 << 20, 1)
            .err()
            .expect("refused")
            .contains("--payload-arg"));
    }

    #[test]
    fn crash_reports_name_vector_rip_and_address() {
        let c = Crash::from_args(&[14, 4, 0x1000, 0, 0xdead, 0, 0x1b]).unwrap();
        assert_eq!(
            c.describe(1),
            "vCPU 1: #PF (page fault) at rip 0x1000, address 0xdead, error code 0x4"
        );
        let c = Crash::from_args(&[6, 0, 0x40_0010, 0, 0, 0, 0x1b]).unwrap();
        assert_eq!(
            c.describe(0),
            "vCPU 0: #UD (invalid opcode) at rip 0x400010"
        );
        assert!(handlers().unwrap().len() as u64 > EXCEPTIONS * STUB_BYTES);
    }
}
