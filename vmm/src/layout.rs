//! Guest-physical layout.
//!
//! Built-in payloads:
//!
//! ```text
//!   [0, 2 MiB)           boot region: GDT, TSS, parameters, page tables,
//!                        payload code, vCPU stacks — served on first touch
//!                        from the payload image (UFFDIO_COPY)
//!   [2 MiB, 3 GiB)       RAM, zero-filled on first touch
//!   [3 GiB, 4 GiB)       hole: MMIO (the RNIC window at 0xd000_0000)
//!   [4 GiB, ...)         the rest of RAM
//! ```
//!
//! Payload code sees RAM as one contiguous array at [`PAYLOAD_RAM_VA`]
//! (its page tables map the RAM chunks in order, skipping the hole).
//!
//! Linux guests: RAM starts at 0 (same hole); boot structures live in low RAM.

/// 4 KiB.
pub const PAGE: u64 = 4096;
/// 2 MiB.
pub const HUGE: u64 = 2 << 20;
pub const GIB: u64 = 1 << 30;

/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 * GIB;
pub const MMIO_HOLE_END: u64 = 4 * GIB;

/// Payload mode: the boot region.
pub const BOOT_REGION_SIZE: u64 = HUGE;
pub const GDT_GPA: u64 = 0x1000;
pub const TSS_GPA: u64 = 0x2000;
pub const PARAMS_GPA: u64 = 0x3000;
pub const PML4_GPA: u64 = 0x4000;
/// Identity map of the low 4 GiB (boot region and MMIO hole).
pub const PDPT_LOW_GPA: u64 = 0x5000;
pub const PD_LOW0_GPA: u64 = 0x6000;
pub const PD_LOW3_GPA: u64 = 0x7000;
/// Map of RAM at `PAYLOAD_RAM_VA`.
pub const PDPT_RAM_GPA: u64 = 0x8000;
pub const PD_RAM_GPA: u64 = 0x9000;
/// One PD page per GiB of RAM fits below the code.
pub const MAX_PAYLOAD_RAM: u64 = 64 * GIB;
pub const CODE_GPA: u64 = 0x10_0000;
pub const CODE_MAX: u64 = 0x8_0000;
pub const STACKS_GPA: u64 = 0x18_0000;
pub const STACK_SIZE: u64 = PAGE;
/// Where RAM starts in payload mode.
pub const PAYLOAD_RAM_GPA: u64 = BOOT_REGION_SIZE;
/// Where payload code sees RAM (PML4 slot 1).
pub const PAYLOAD_RAM_VA: u64 = 512 * GIB;

/// The test device's MMIO page (payloads report through it: ring-3 port
/// I/O is not available on every host, MMIO is).
pub const TESTDEV_MMIO_GPA: u64 = 0xd000_0000;
pub const TESTDEV_MMIO_SIZE: u64 = 0x1000;

/// The emulated RNIC's MMIO window.
pub const RNIC_MMIO_GPA: u64 = 0xd010_0000;
/// Global registers plus one 0x100 bank per queue pair (one per vCPU).
pub const RNIC_MMIO_SIZE: u64 = 0x100 * (1 + MAX_VCPUS as u64);

/// Most vCPUs a VM may have (stacks in the boot region bound it too).
pub const MAX_VCPUS: usize = 64;

/// Split `[start, start + size)` of RAM around the MMIO hole.
pub fn ram_ranges(start: u64, size: u64) -> Vec<(u64, u64)> {
    let end = start + size;
    if end <= MMIO_HOLE_START || start >= MMIO_HOLE_END {
        return vec![(start, size)];
    }
    let low = MMIO_HOLE_START - start;
    vec![(start, low), (MMIO_HOLE_END, size - low)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_hole() {
        assert_eq!(ram_ranges(HUGE, 256 << 20), vec![(HUGE, 256 << 20)]);
        assert_eq!(
            ram_ranges(HUGE, 4 * GIB),
            vec![(HUGE, 3 * GIB - HUGE), (4 * GIB, GIB + HUGE)]
        );
        // The code and stacks fit in the boot region.
        const { assert!(STACKS_GPA + MAX_VCPUS as u64 * STACK_SIZE <= BOOT_REGION_SIZE) };
        const { assert!(PD_RAM_GPA + (MAX_PAYLOAD_RAM / GIB) * PAGE <= CODE_GPA) };
        const { assert!(CODE_GPA + CODE_MAX <= STACKS_GPA) };
    }
}
