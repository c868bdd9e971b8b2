//! Built-in guests: real x86-64 code, assembled here with iced-x86, run by
//! KVM in ring 3 (this host emulates ring 0 and runs ring 3 natively).
//!
//! A payload's boot image (GDT, TSS, parameters, page tables, code) is not
//! written into guest memory up front: the fault handler serves each page
//! from the image on first touch, like a snapshot restore. Payloads report
//! results through the test device's MMIO registers — never by the VMM reading
//! guest memory.

pub mod elf;
mod pingpong;
mod programs;
pub mod rdma;
pub mod sdk;
pub mod user;
mod writer;

use crate::arch::{self, PTE_P, PTE_PS, PTE_U, PTE_W};
use crate::layout::*;
use std::collections::BTreeMap;

pub use programs::Guest;

/// Parameter block at `PARAMS_GPA`, read by the payload (byte offsets).
pub mod params {
    pub const MAGIC: u64 = 0x00;
    pub const RAM_VA: u64 = 0x08;
    pub const RAM_PAGES: u64 = 0x10;
    pub const VCPUS: u64 = 0x18;
    pub const SEED: u64 = 0x20;
    pub const ROUNDS: u64 = 0x28;
    pub const WORK_PAGES: u64 = 0x30;
    pub const RNIC_VA: u64 = 0x38;
    /// RDMA workloads: message size, messages, guest-physical RAM base,
    /// messages per signaled completion.
    pub const MSG: u64 = 0x40;
    pub const ITERS: u64 = 0x48;
    pub const RAM_GPA: u64 = 0x50;
    pub const CQ_MOD: u64 = 0x58;
    /// TSC ticks per millisecond (the host's calibration; payloads that
    /// time out on silence).
    pub const TICKS_PER_MS: u64 = 0x60;
    pub const MAGIC_VALUE: u64 = u64::from_le_bytes(*b"ODPVMPRM");
}

/// What the payload is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadParams {
    pub vcpus: u64,
    pub seed: u64,
    /// Passes over the work set (payloads that loop).
    pub rounds: u64,
    /// Pages the payload works on, split evenly between vCPUs.
    pub work_pages: u64,
    /// RDMA workloads: message size and count (0: until told to stop).
    pub msg: u64,
    pub iters: u64,
}

/// Page contents of a boot region, sparse.
#[derive(Clone, Debug, Default)]
pub struct BootImage {
    pages: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
    /// Entry point and per-vCPU stack tops.
    pub entry: u64,
}

impl BootImage {
    pub fn write(&mut self, gpa: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let a = gpa + i as u64;
            let page = self
                .pages
                .entry(a & !(PAGE - 1))
                .or_insert_with(|| Box::new([0; PAGE as usize]));
            page[(a & (PAGE - 1)) as usize] = *b;
        }
    }

    pub(crate) fn write_u64(&mut self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }

    /// The image's content for the page at `gpa` (None: zero).
    pub fn page(&self, gpa: u64) -> Option<&[u8; PAGE as usize]> {
        self.pages.get(&gpa).map(|b| &**b)
    }

    /// Every page with content, in address order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8; PAGE as usize])> {
        self.pages.iter().map(|(k, v)| (*k, &**v))
    }

    /// Pages with non-zero content.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

/// Stack top for vCPU `i`.
pub fn stack_top(i: usize) -> u64 {
    STACKS_GPA + (i as u64 + 1) * STACK_SIZE
}

/// Build the boot image for `guest`, whose RAM is `ram` (gpa, size ranges
/// in order).
pub fn build_image(
    guest: Guest,
    p: &PayloadParams,
    ram: &[(u64, u64)],
) -> Result<BootImage, String> {
    let ram_bytes: u64 = ram.iter().map(|r| r.1).sum();
    if ram_bytes > MAX_PAYLOAD_RAM - GIB {
        return Err(format!(
            "built-in payloads support at most {} GiB of RAM",
            MAX_PAYLOAD_RAM / GIB - 1
        ));
    }
    let mut img = BootImage::default();
    for (i, d) in arch::gdt(TSS_GPA).iter().enumerate() {
        img.write_u64(GDT_GPA + i as u64 * 8, *d);
    }
    // TSS: all zero but the I/O map base, placed past the limit (no bitmap).
    img.write(TSS_GPA + 0x66, &0x68u16.to_le_bytes());

    let flags = PTE_P | PTE_W | PTE_U;
    img.write_u64(PML4_GPA, PDPT_LOW_GPA | flags);
    img.write_u64(PML4_GPA + 8, PDPT_RAM_GPA | flags);
    // Identity: GiB 0 (the boot region) and GiB 3 (the MMIO hole).
    img.write_u64(PDPT_LOW_GPA, PD_LOW0_GPA | flags);
    img.write_u64(PDPT_LOW_GPA + 3 * 8, PD_LOW3_GPA | flags);
    img.write_u64(PD_LOW0_GPA, flags | PTE_PS);
    for i in 0..512u64 {
        img.write_u64(PD_LOW3_GPA + i * 8, (3 * GIB + i * HUGE) | flags | PTE_PS);
    }
    // RAM, contiguous at PAYLOAD_RAM_VA.
    let mut chunk = 0u64;
    for &(gpa, size) in ram {
        for off in (0..size).step_by(HUGE as usize) {
            let pd = PD_RAM_GPA + (chunk / 512) * PAGE;
            if chunk.is_multiple_of(512) {
                img.write_u64(PDPT_RAM_GPA + (chunk / 512) * 8, pd | flags);
            }
            img.write_u64(pd + (chunk % 512) * 8, (gpa + off) | flags | PTE_PS);
            chunk += 1;
        }
    }

    img.write_u64(PARAMS_GPA + params::MAGIC, params::MAGIC_VALUE);
    img.write_u64(PARAMS_GPA + params::RAM_VA, PAYLOAD_RAM_VA);
    img.write_u64(PARAMS_GPA + params::RAM_PAGES, ram_bytes / PAGE);
    img.write_u64(PARAMS_GPA + params::VCPUS, p.vcpus);
    img.write_u64(PARAMS_GPA + params::SEED, p.seed);
    img.write_u64(PARAMS_GPA + params::ROUNDS, p.rounds);
    img.write_u64(PARAMS_GPA + params::WORK_PAGES, p.work_pages);
    img.write_u64(PARAMS_GPA + params::RNIC_VA, RNIC_MMIO_GPA);
    img.write_u64(PARAMS_GPA + params::MSG, p.msg);
    img.write_u64(PARAMS_GPA + params::ITERS, p.iters);
    img.write_u64(PARAMS_GPA + params::RAM_GPA, ram.first().map_or(0, |r| r.0));
    img.write_u64(PARAMS_GPA + params::CQ_MOD, 16);
    let ns = mmu::ticks_to_ns(1 << 32).max(1);
    let per_ms = (1u128 << 32) * 1_000_000 / u128::from(ns);
    img.write_u64(
        PARAMS_GPA + params::TICKS_PER_MS,
        u64::try_from(per_ms).unwrap_or(u64::MAX),
    );

    let code = programs::assemble(guest, CODE_GPA)?;
    if code.len() as u64 > CODE_MAX {
        return Err(format!(
            "payload {guest} is {} bytes, more than fits",
            code.len()
        ));
    }
    img.write(CODE_GPA, &code);
    img.entry = CODE_GPA;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_maps_ram_contiguously_and_carries_code() {
        let ram = ram_ranges(PAYLOAD_RAM_GPA, 4 * GIB);
        let p = PayloadParams {
            vcpus: 2,
            seed: 7,
            rounds: 1,
            work_pages: 10,
            msg: 0,
            iters: 0,
        };
        let img = build_image(Guest::Touch, &p, &ram).unwrap();
        let pd = img.page(PD_RAM_GPA).unwrap();
        let e0 = u64::from_le_bytes(pd[0..8].try_into().unwrap());
        assert_eq!(e0 & !0xfff, PAYLOAD_RAM_GPA);
        // RAM below the hole is [2 MiB, 3 GiB): chunks 0..1535; chunk 1535
        // (PD page 2, entry 511) is the first above the hole.
        let pd2 = img.page(PD_RAM_GPA + 2 * PAGE).unwrap();
        let e = u64::from_le_bytes(pd2[511 * 8..512 * 8].try_into().unwrap());
        assert_eq!(e & !0xfff, MMIO_HOLE_END);
        assert!(img.page(CODE_GPA).is_some());
        assert!(img.page(PARAMS_GPA).is_some());
        assert!(build_image(Guest::Touch, &p, &[(PAYLOAD_RAM_GPA, 64 * GIB)]).is_err());
    }
}
