//! A structure-aware fuzzing harness for the paravirtual RNIC.
//!
//! Inputs decode into guest behaviour that mostly makes sense — enabled
//! queue pairs, WQEs and receive entries in their rings, doorbells,
//! completion pops — with hostile fields: opcodes, lengths, keys, and
//! addresses drawn from every part of the u64 range (inside RAM, at its
//! edges, at the top of the space, anywhere). Interleaved with them: mmu
//! invalidations (with the host pages really discarded), whole-space
//! teardowns, queue-pair resets, raw register accesses of any width and
//! stores into guest RAM. Guest RAM sits between PROT_NONE guard pages, so
//! a device access outside it crashes; `vmm` and `rdma-passthrough` keep
//! overflow checks in release, so an unchecked guest-controlled overflow
//! panics.
//!
//! After each input the harness checks what a hostile guest must not be
//! able to break ([`Violation`]): every WQE the device took finishes
//! (completed, failed or flushed) within [`LIVENESS_BOUND`], and the state
//! the device keeps per queue pair stays within what its rings bound. The
//! bounded run in the test suite (`vmm/tests/fuzz.rs`) also checks the
//! device thread sleeps afterwards and memory stays flat; `cargo fuzz run
//! rnic_device` (in `fuzz/`) runs the same harness coverage-guided.

use super::*;
use crate::layout::RNIC_MMIO_SIZE;
use mmu::{Mmu, RegionSpec, PAGE_SIZE};
use rdma_passthrough::{AddressSpace, EmulatedRnic};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Guest RAM of the harness.
pub const FUZZ_RAM_GPA: u64 = 0x20_0000;
pub const FUZZ_RAM_SIZE: u64 = 4 << 20;
/// Queue pairs the harness device has.
pub const FUZZ_QPS: usize = 4;
/// Ring entries the harness sets up (both rings).
const RING: u32 = 64;
/// Each queue pair's rings: send ring at +0, receive ring at +4 KiB.
const RINGS_SPAN: u64 = 0x2000;
/// Where message buffers start (past the rings).
const BUFFERS: u64 = FUZZ_RAM_GPA + 0x10_0000;
/// How long a WQE the device took may stay unfinished once the guest
/// stops posting.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(5);

/// Something a guest must not be able to cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("queue pair {qp}: {retired} of {posted} WQEs finished within {LIVENESS_BOUND:?}")]
    Liveness {
        qp: usize,
        posted: u64,
        retired: u64,
    },
    #[error("queue pair {qp}: the device holds {writes} unchecked WRITEs and {cqes} completions")]
    Unbounded {
        qp: usize,
        writes: usize,
        cqes: usize,
    },
}

/// What one input did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// WQEs the harness wrote and rang.
    pub wqes_rung: u64,
    /// WQEs the RNIC finished successfully.
    pub wqes_ok: u64,
    pub invalidations: u64,
    pub teardowns: u64,
}

struct PlainMemory {
    hva: u64,
}

impl GuestMemory for PlainMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotGuestRam> {
        if !self.contains(gpa, buf.len() as u64) {
            return Err(NotGuestRam {
                gpa,
                len: buf.len() as u64,
            });
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

/// The input, read front to back; zeros once it is used up.
struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
}

pub struct Harness {
    pub dev: RnicDevice,
    hva: u64,
    mmu: Arc<Mmu>,
    /// Producer indices the guest side has rung, per queue pair.
    pis: parking_lot::Mutex<[(u32, u32); FUZZ_QPS]>,
}

impl Harness {
    fn new() -> Harness {
        let page = PAGE_SIZE as usize;
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
        let space = AddressSpace::new(
            "fuzz",
            mmu.clone(),
            Arc::new(mmu::DirectResolver::new(mmu.clone())),
        );
        let rnic = EmulatedRnic::new(rdma_passthrough::RnicConfig {
            name: "fuzz-rnic".into(),
            fence_timeout: Duration::from_millis(200),
            ..Default::default()
        });
        let peer = HostPeer::new(&rnic, WINDOW_UNIT * FUZZ_QPS as u64).expect("host peer");
        let mem = Arc::new(PlainMemory { hva });
        let dev = RnicDevice::new(rnic, space, mem, peer, FUZZ_QPS, FUZZ_RAM_GPA).expect("device");
        Harness {
            dev,
            hva,
            mmu,
            pis: parking_lot::Mutex::new([(0, 0); FUZZ_QPS]),
        }
    }

    fn write_ram(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa >= FUZZ_RAM_GPA && gpa + bytes.len() as u64 <= FUZZ_RAM_GPA + FUZZ_RAM_SIZE);
        // SAFETY: inside the harness RAM (asserted above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.hva + gpa - FUZZ_RAM_GPA) as *mut u8,
                bytes.len(),
            )
        };
    }

    fn reg_write(&self, q: usize, reg: u64, v: u64, wide: bool) {
        let off = QP_BANK * (q as u64 + 1) + reg;
        if wide {
            self.dev.mmio_write(off, &v.to_le_bytes());
        } else {
            self.dev.mmio_write(off, &(v as u32).to_le_bytes());
        }
    }

    fn reg_read(&self, q: usize, reg: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev
            .mmio_read(QP_BANK * (q as u64 + 1) + reg, &mut b[..4]);
        u64::from_le_bytes(b)
    }

    fn rings(q: usize) -> (u64, u64) {
        let sq = FUZZ_RAM_GPA + q as u64 * RINGS_SPAN;
        (sq, sq + 0x1000)
    }

    /// Reset and enable queue pair `q` with well-formed rings (usually),
    /// or with a hostile field.
    fn setup(&self, q: usize, hostile: u8, value: u64) {
        let (sq, rq) = Self::rings(q);
        self.reg_write(q, QP_CTRL, u64::from(CTRL_RESET), false);
        let (mut sq_base, mut size) = (sq, RING);
        match hostile {
            1 => sq_base = value,
            2 => size = value as u32,
            3 => sq_base = FUZZ_RAM_GPA + FUZZ_RAM_SIZE - 0x800,
            _ => {}
        }
        self.reg_write(q, QP_SQ_BASE, sq_base, true);
        self.reg_write(q, QP_SQ_SIZE, u64::from(size), false);
        self.reg_write(q, QP_RQ_BASE, rq, true);
        self.reg_write(q, QP_RQ_SIZE, u64::from(RING), false);
        self.reg_write(q, QP_CTRL, u64::from(CTRL_ENABLE), false);
        self.pis.lock()[q] = (0, 0);
    }

    /// A guest-physical (or peer) address from every part of the range.
    fn address(&self, inp: &mut Input, peer: bool) -> u64 {
        let kind = inp.u8();
        let small = u64::from(inp.u32() % 0x3000);
        let (base, len) = if peer {
            let w = self.dev.peer_window();
            (w.base, w.len)
        } else {
            (BUFFERS, FUZZ_RAM_GPA + FUZZ_RAM_SIZE - BUFFERS)
        };
        if kind < 232 {
            // Mostly a plausible place, leaving room for the message.
            return base + (inp.u64() % (len - (256 << 10)));
        }
        match kind % 6 {
            0 => (base + len).wrapping_sub(small),
            1 => (base + len).wrapping_add(small),
            2 => base.wrapping_sub(small),
            3 => u64::MAX - small,
            4 => inp.u64(),
            // Inside the rings (the guest may point buffers at them).
            _ => FUZZ_RAM_GPA + small,
        }
    }

    fn length(inp: &mut Input) -> u32 {
        let kind = inp.u8();
        if kind < 232 {
            return match kind % 4 {
                0 => inp.u32() % 512,
                1 => 4096 + (inp.u32() % 64) - 32,
                2 => inp.u32() % (64 << 10),
                _ => 0,
            };
        }
        match kind % 3 {
            0 => inp.u32() % (256 << 10),
            1 => MAX_MSG + (inp.u32() % 3),
            _ => inp.u32(),
        }
    }

    fn key(&self, inp: &mut Input, remote: bool) -> u32 {
        match inp.u8() {
            0..=229 if remote => self.dev.peer_window().rkey(),
            0..=229 => self.dev.lkey(),
            230..=239 => self.dev.lkey(),
            240..=249 => self.dev.peer_window().rkey(),
            _ => inp.u32(),
        }
    }

    /// Write one WQE (or `count` of them) to `q`'s send ring and ring.
    /// Like a real guest, it usually resets a queue pair it finds stopped
    /// or in error first.
    fn post(&self, inp: &mut Input, q: usize) -> u64 {
        let status = self.reg_read(q, QP_STATUS) as u32;
        if status & (STATUS_DEVICE_ERROR | STATUS_QP_ERROR) != 0 && inp.u8() < 230 {
            self.setup(q, 0, 0);
        }
        let count = 1 + u32::from(inp.u8() % 4);
        let (sq, _) = Self::rings(q);
        let mut pi = self.pis.lock()[q].0;
        for _ in 0..count {
            let op = inp.u8();
            let opcode = if op < 245 {
                1 + u32::from(op % 3)
            } else {
                inp.u32()
            };
            let wqe = SendWqe {
                wr_id: u64::from(pi),
                opcode,
                flags: u32::from(inp.u8().is_multiple_of(4)),
                addr: self.address(inp, false),
                length: Self::length(inp),
                lkey: self.key(inp, false),
                remote_addr: self.address(inp, true),
                rkey: self.key(inp, true),
                reserved: [0; 5],
            };
            let slot = u64::from(pi % RING);
            self.write_ram(sq + slot * WQE_SIZE, vm_memory::ByteValued::as_slice(&wqe));
            pi = pi.wrapping_add(1);
        }
        // Usually the next index; sometimes anything.
        let rung = if inp.u8() < 250 { pi } else { inp.u32() };
        self.pis.lock()[q].0 = pi;
        self.reg_write(q, QP_SQ_PI, u64::from(rung), false);
        u64::from(count)
    }

    fn post_recv(&self, inp: &mut Input, q: usize) {
        let (_, rq) = Self::rings(q);
        let mut pi = self.pis.lock()[q].1;
        let e = RecvEntry {
            wr_id: u64::from(pi),
            addr: self.address(inp, false),
            length: Self::length(inp),
            lkey: self.key(inp, false),
            reserved: 0,
        };
        self.write_ram(
            rq + u64::from(pi % RING) * RQE_SIZE,
            vm_memory::ByteValued::as_slice(&e),
        );
        pi = pi.wrapping_add(1);
        self.pis.lock()[q].1 = pi;
        self.reg_write(q, QP_RQ_PI, u64::from(pi), false);
    }

    /// Invalidate a range of guest RAM and really discard its pages, as a
    /// balloon or a teardown would.
    fn invalidate(&self, inp: &mut Input) {
        let pages = FUZZ_RAM_SIZE / PAGE_SIZE;
        let len = 1 + u64::from(inp.u8()) % 64;
        let first = u64::from(inp.u32()) % (pages - len);
        let gpa = FUZZ_RAM_GPA + first * PAGE_SIZE;
        if self.mmu.invalidate(gpa, len * PAGE_SIZE).is_ok() {
            // SAFETY: inside the harness RAM; the mmu (and so the RNIC)
            // stopped using these pages before `invalidate` returned.
            unsafe {
                libc::madvise(
                    (self.hva + gpa - FUZZ_RAM_GPA) as *mut libc::c_void,
                    (len * PAGE_SIZE) as usize,
                    libc::MADV_DONTNEED,
                )
            };
        }
    }

    /// Apply one input, then check liveness and bounds.
    pub fn run(&self, data: &[u8]) -> Result<RunStats, Violation> {
        let mut stats = RunStats::default();
        let ok0 = self.dev.rnic().stats().wqes;
        self.dev.reset_all();
        for q in 0..FUZZ_QPS {
            self.setup(q, 0, 0);
        }
        let mut inp = Input { data, at: 0 };
        while !inp.done() {
            let op = inp.u8();
            let q = usize::from(inp.u8()) % FUZZ_QPS;
            match op % 32 {
                0..=17 => stats.wqes_rung += self.post(&mut inp, q),
                18..=21 => self.post_recv(&mut inp, q),
                22 | 23 => {
                    let n = self.reg_read(q, QP_CQ_COUNT).min(u64::from(inp.u8()));
                    for _ in 0..n {
                        self.reg_read(q, QP_CQE_STATUS);
                        self.reg_write(q, QP_CQ_POP, 1, false);
                    }
                }
                24 | 25 => {
                    self.invalidate(&mut inp);
                    stats.invalidations += 1;
                }
                26 => {
                    if self.mmu.teardown_all().is_ok() {
                        stats.teardowns += 1;
                    }
                }
                27 => {
                    let hostile = inp.u8() % 8;
                    self.setup(q, hostile, inp.u64());
                }
                28 => {
                    let off = u64::from(inp.u32()) % RNIC_MMIO_SIZE;
                    let width = 1 << (inp.u8() % 4);
                    let v = inp.u64().to_le_bytes();
                    self.dev.mmio_write(off, &v[..width]);
                }
                29 => {
                    let off = u64::from(inp.u32()) % RNIC_MMIO_SIZE;
                    let mut b = [0u8; 8];
                    let width = 1 << (inp.u8() % 4);
                    self.dev.mmio_read(off, &mut b[..width]);
                }
                30 => {
                    let at = u64::from(inp.u32()) % (FUZZ_RAM_SIZE - 8);
                    self.write_ram(FUZZ_RAM_GPA + at, &inp.u64().to_le_bytes());
                }
                _ => self.dev.reset_all(),
            }
        }
        self.check()?;
        stats.wqes_ok = self.dev.rnic().stats().wqes - ok0;
        Ok(stats)
    }

    /// Every WQE taken finishes within the bound; per-QP state is bounded.
    fn check(&self) -> Result<(), Violation> {
        let deadline = Instant::now() + LIVENESS_BOUND;
        for qp in 0..FUZZ_QPS {
            loop {
                let (posted, retired) = self.dev.progress(qp).expect("queue pair");
                if posted == retired {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Violation::Liveness {
                        qp,
                        posted,
                        retired,
                    });
                }
                std::thread::yield_now();
            }
            // A completion read retires what finished.
            self.reg_read(qp, QP_CQ_COUNT);
            let (writes, cqes) = self.dev.pending(qp).expect("queue pair");
            if writes > 2 * MAX_RING as usize + 1 || cqes > 4096 {
                return Err(Violation::Unbounded { qp, writes, cqes });
            }
        }
        Ok(())
    }
}

/// The process-wide harness (threads and memory are set up once).
pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(Harness::new)
}

/// A deterministic structure-aware input from `seed` (for the bounded run
/// and the checked-in corpus): mostly WQEs, with receives, pops,
/// invalidations, teardowns and resets mixed in.
pub fn seeded_input(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdma_passthrough::WcStatus;
    use std::sync::atomic::Ordering;

    /// A receive entry the guest's MR cannot hold — zeroed (a teardown
    /// between the guest's stores and its doorbell), another key, a buffer
    /// outside RAM — completes at once with LOC_PROT_ERR and is counted;
    /// the queue pair stays usable and a good entry is posted as before.
    #[test]
    fn receive_entries_the_mr_cannot_hold_complete_at_once() {
        let h = Harness::new();
        let q = 1;
        h.setup(q, 0, 0);
        assert_eq!(
            h.reg_read(q, QP_STATUS) as u32 & STATUS_ENABLED,
            STATUS_ENABLED
        );
        let (_, rq) = Harness::rings(q);
        let lkey = h.dev.lkey();
        let entries = [
            RecvEntry::default(),
            RecvEntry {
                wr_id: 11,
                addr: BUFFERS,
                length: 4096,
                lkey: lkey ^ 0x100,
                reserved: 0,
            },
            RecvEntry {
                wr_id: 12,
                addr: FUZZ_RAM_GPA + FUZZ_RAM_SIZE - 100,
                length: 4096,
                lkey,
                reserved: 0,
            },
            RecvEntry {
                wr_id: 13,
                addr: BUFFERS,
                length: 4096,
                lkey,
                reserved: 0,
            },
        ];
        for (i, e) in entries.iter().enumerate() {
            h.write_ram(rq + i as u64 * RQE_SIZE, vm_memory::ByteValued::as_slice(e));
        }
        h.reg_write(q, QP_RQ_PI, entries.len() as u64, false);
        assert_eq!(h.reg_read(q, QP_RQ_CI), 4);
        assert_eq!(h.reg_read(q, QP_CQ_COUNT), 3);
        for want in [0, 11, 12] {
            assert_eq!(h.reg_read(q, QP_CQE_WR_ID) as u32, want);
            assert_eq!(
                h.reg_read(q, QP_CQE_STATUS) as u32,
                WcStatus::LocProtErr.code()
            );
            assert_eq!(h.reg_read(q, QP_CQE_OPCODE) as u32, OP_RECV);
            h.reg_write(q, QP_CQ_POP, 1, false);
        }
        assert_eq!(h.reg_read(q, QP_CQ_COUNT), 0);
        let st = h.reg_read(q, QP_STATUS) as u32;
        assert_eq!(st & (STATUS_QP_ERROR | STATUS_DEVICE_ERROR), 0, "{st:#x}");
        assert_eq!(h.dev.stats.recvs_refused.load(Ordering::Relaxed), 3);
        assert_eq!(h.dev.stats.recvs_posted.load(Ordering::Relaxed), 1);
    }
}
