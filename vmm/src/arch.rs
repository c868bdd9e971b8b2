//! x86-64 CPU state for the guests: segments, control registers, page
//! tables, CPUID.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
/// Reserved bit 1 only: interrupts off, IOPL 0 (some hosts, like PVM,
/// never grant ring 3 I/O privilege; payloads use MMIO instead).
pub const RFLAGS_PAYLOAD: u64 = 0x2;

pub const PTE_P: u64 = 1 << 0;
pub const PTE_W: u64 = 1 << 1;
pub const PTE_U: u64 = 1 << 2;
pub const PTE_PS: u64 = 1 << 7;

/// GDT selectors (index << 3 | RPL).
pub const SEL_KCODE: u16 = 0x08;
pub const SEL_KDATA: u16 = 0x10;
pub const SEL_UCODE: u16 = 0x18 | 3;
pub const SEL_UDATA: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;

/// The GDT both guest kinds use: null, kernel code/data, user code/data
/// (DPL 3), then a 16-byte TSS descriptor.
pub fn gdt(tss_base: u64) -> [u64; 7] {
    let tss_limit = 0x67u64;
    let tss_lo = (tss_limit & 0xffff)
        | ((tss_base & 0xff_ffff) << 16)
        | (0x89u64 << 40) // present, type 9 (available 64-bit TSS)
        | (((tss_base >> 24) & 0xff) << 56);
    [
        0,
        0x00af_9b00_0000_ffff, // kernel code: L, P, DPL0, exec/read
        0x00cf_9300_0000_ffff, // kernel data
        0x00af_fb00_0000_ffff, // user code: L, P, DPL3
        0x00cf_f300_0000_ffff, // user data: DPL3
        tss_lo,
        tss_base >> 32,
    ]
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    let dpl = (selector & 3) as u8;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode with paging at `cr3`; `user` puts the vCPU in ring 3.
pub fn long_mode_sregs(sregs: &mut kvm_sregs, cr3: u64, gdt_base: u64, tss_base: u64, user: bool) {
    let (cs, ds) = if user {
        (SEL_UCODE, SEL_UDATA)
    } else {
        (SEL_KCODE, SEL_KDATA)
    };
    sregs.cs = segment(cs, true);
    let data = segment(ds, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: tss_base,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 11, // busy 64-bit TSS, as VM entry requires
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = gdt_base;
    sregs.gdt.limit = (7 * 8 - 1) as u16;
    // No IDT: a payload exception is a triple fault, reported as an error.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Give the vCPU the host-supported CPUID, with its own APIC ID.
pub fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, index: u8) -> Result<(), kvm_ioctls::Error> {
    let mut cpuid: CpuId = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(index) << 24),
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
}

/// One line of registers for error reports.
pub fn describe(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector
    )
}
