//! A fuzzing harness for the paravirtual RNIC: arbitrary guest behaviour
//! (register reads and writes of any width and offset, arbitrary bytes in
//! its rings and buffers) against a real device, emulated RNIC and host
//! peer, with guest memory between PROT_NONE guard pages so any access
//! outside it crashes. Used by the `cargo fuzz` target (`fuzz/`) and by a
//! seeded, bounded run in the test suite.

use super::*;
use crate::layout::RNIC_MMIO_SIZE;
use mmu::{Mmu, RegionSpec};
use rdma_passthrough::{AddressSpace, EmulatedRnic};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Guest RAM of the harness.
pub const FUZZ_RAM_GPA: u64 = 0x20_0000;
pub const FUZZ_RAM_SIZE: u64 = 4 << 20;

struct PlainMemory {
    hva: u64,
}

impl GuestMemory for PlainMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        if !self.contains(gpa, buf.len() as u64) {
            return Err(format!("{gpa:#x} is not guest RAM"));
        }
        // SAFETY: bounds checked just above against the live mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.hva + gpa - FUZZ_RAM_GPA) as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= FUZZ_RAM_GPA
            && gpa
                .checked_add(len)
                .is_some_and(|e| e <= FUZZ_RAM_GPA + FUZZ_RAM_SIZE)
    }
}

pub struct Harness {
    pub dev: RnicDevice,
    hva: u64,
}

impl Harness {
    fn new() -> Harness {
        let page = 4096usize;
        let total = FUZZ_RAM_SIZE as usize + 2 * page;
        // SAFETY: a fresh mapping owned by the harness for the process
        // lifetime; the first and last pages become guards.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap for the fuzz harness");
        let base = base as u64;
        // SAFETY: both pages belong to the mapping just created.
        unsafe {
            libc::mprotect(base as *mut _, page, libc::PROT_NONE);
            libc::mprotect(
                (base + page as u64 + FUZZ_RAM_SIZE) as *mut _,
                page,
                libc::PROT_NONE,
            );
        }
        let hva = base + page as u64;
        let mmu = Mmu::new(mmu::Config::default()).expect("mmu");
        mmu.add_region(RegionSpec {
            name: "fuzz-ram".into(),
            gpa: FUZZ_RAM_GPA,
            size: FUZZ_RAM_SIZE,
            hva,
        })
        .expect("region");
        let space = AddressSpace::new("fuzz", mmu.clone(), Arc::new(mmu::DirectResolver::new(mmu)));
        let rnic = EmulatedRnic::new(rdma_passthrough::RnicConfig {
            fence_timeout: Duration::from_millis(20),
            ..Default::default()
        });
        let peer = HostPeer::new(&rnic, 8 << 20).expect("host peer");
        let dev =
            RnicDevice::new(rnic, space, Arc::new(PlainMemory { hva }), peer, 4).expect("device");
        Harness { dev, hva }
    }

    /// Apply one input: a sequence of operations decoded from bytes.
    pub fn run(&self, data: &[u8]) {
        self.dev.reset_all();
        let mut i = 0;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = data.get(i..i + n)?;
            i += n;
            Some(s)
        };
        let mut reads = [0u8; 8];
        while let Some(op) = take(1) {
            let op = op[0];
            let Some(off) = take(2).map(|b| u64::from(u16::from_le_bytes([b[0], b[1]]))) else {
                break;
            };
            let Some(v) = take(8) else { break };
            let value = u64::from_le_bytes(v.try_into().expect("8 bytes"));
            match op % 6 {
                // Register write of width 1, 2, 4 or 8, anywhere in the window.
                0 | 1 => {
                    let width = 1 << (op / 6 % 4);
                    let off = off % RNIC_MMIO_SIZE;
                    self.dev.mmio_write(off, &value.to_le_bytes()[..width]);
                }
                2 => {
                    let width = 1 << (op / 6 % 4);
                    self.dev
                        .mmio_read(off % RNIC_MMIO_SIZE, &mut reads[..width]);
                }
                // Guest stores into its RAM (rings, buffers).
                3 => {
                    let at = (value >> 16) % (FUZZ_RAM_SIZE - 8);
                    // SAFETY: `at + 8` stays inside the harness RAM.
                    unsafe { std::ptr::write_unaligned((self.hva + at) as *mut u64, value ^ off) };
                }
                // A well-formed set-up, so the fuzzer reaches the WQE paths.
                4 => {
                    let bank = QP_BANK * (1 + u64::from(op >> 6) % 4);
                    let ring = FUZZ_RAM_GPA + (off % 16) * 0x1000;
                    self.dev.mmio_write(bank + QP_SQ_BASE, &ring.to_le_bytes());
                    self.dev.mmio_write(bank + QP_SQ_SIZE, &64u32.to_le_bytes());
                    self.dev
                        .mmio_write(bank + QP_RQ_BASE, &(ring + 0x1000).to_le_bytes());
                    self.dev.mmio_write(bank + QP_RQ_SIZE, &64u32.to_le_bytes());
                    self.dev
                        .mmio_write(bank + QP_CTRL, &CTRL_ENABLE.to_le_bytes());
                    self.plausible_wqe(bank, ring, value);
                }
                // Doorbells with whatever is in the rings.
                _ => {
                    let bank = QP_BANK * (1 + u64::from(op >> 6) % 4);
                    let reg = if value & 1 == 0 { QP_SQ_PI } else { QP_RQ_PI };
                    self.dev
                        .mmio_write(bank + reg, &((value >> 8) as u32 % 80).to_le_bytes());
                    let mut n = [0u8; 4];
                    self.dev.mmio_read(bank + QP_CQ_COUNT, &mut n);
                    self.dev.mmio_write(bank + QP_CQ_POP, &1u32.to_le_bytes());
                }
            }
        }
        // Let the device finish what was posted, then drain completions.
        std::thread::sleep(Duration::from_micros(200));
        for q in 0..4u64 {
            let bank = QP_BANK * (1 + q);
            let mut n = [0u8; 4];
            for _ in 0..4096 {
                self.dev.mmio_read(bank + QP_CQ_COUNT, &mut n);
                if u32::from_le_bytes(n) == 0 {
                    break;
                }
                self.dev.mmio_write(bank + QP_CQ_POP, &1u32.to_le_bytes());
            }
        }
    }
}

impl Harness {
    /// Write a plausible WQE at the send ring's next slot: valid opcodes
    /// and keys most of the time, addresses near (and past) RAM; ring it
    /// half of the time.
    fn plausible_wqe(&self, bank: u64, ring: u64, value: u64) {
        let mut ci = [0u8; 4];
        self.dev.mmio_read(bank + QP_SQ_CI, &mut ci);
        let ci = u32::from_le_bytes(ci);
        let addr = FUZZ_RAM_GPA + (value >> 8) % (FUZZ_RAM_SIZE + 0x2000);
        let lkey = if value & 0x10 == 0 {
            self.dev.lkey()
        } else {
            value as u32
        };
        let peer = self.dev.peer();
        let remote_addr = peer.base + (value >> 12) % (peer.len + 0x2000);
        let rkey = if value & 0x20 == 0 {
            peer.rkey()
        } else {
            (value >> 32) as u32
        };
        let wqe = SendWqe {
            wr_id: value,
            opcode: 1 + (value as u32 % 3),
            flags: WQE_SIGNALED,
            addr,
            length: (value >> 24) as u32 % 0x20000,
            lkey,
            remote_addr,
            rkey,
            reserved: [0; 5],
        };
        let w = vm_memory::ByteValued::as_slice(&wqe);
        let at = ring - FUZZ_RAM_GPA + u64::from(ci % 64) * WQE_SIZE;
        // SAFETY: the ring lies inside the harness RAM (ring offsets are
        // below 64 KiB of a 4 MiB region).
        unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), (self.hva + at) as *mut u8, w.len()) };
        if value & 0x40 == 0 {
            self.dev
                .mmio_write(bank + QP_SQ_PI, &ci.wrapping_add(1).to_le_bytes());
        }
    }
}

/// The process-wide harness (threads and memory are set up once).
pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(Harness::new)
}
