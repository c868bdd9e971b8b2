//! The odpvm guest SDK for Rust: what `guest/include/odpvm_guest.h` gives C
//! programs, for `#![no_std] #![no_main]` programs that `odpvm run
//! --payload` runs in ring 3 on every vCPU.
//!
//! A program defines the entry every vCPU starts in:
//!
//! ```ignore
//! #[no_mangle]
//! pub extern "C" fn _start(vcpu: u64, nvcpus: u64, params: &'static odpvm_guest::Params) -> i32 {
//!     odpvm_guest::print("hello\n");
//!     0 // returning ends this vCPU's program with this status (0 = pass)
//! }
//! ```
//!
//! and builds from `guest/` (whose `.cargo/config.toml` sets the flags)
//! with a `build.rs` passing `-T guest/link.ld` (see
//! `guest/examples/rust-hello`). Guest RAM is identity mapped: a pointer is
//! a guest-physical address, usable in WQEs as is. Constants and layouts
//! are in [`abi`], generated from the VMM's own definitions.
//!
//! A host-side teardown (or invalidation) may discard any page at any time:
//! afterwards the program's own pages (code, statics, stacks) read as loaded
//! and the rest of RAM as zero. State that must survive one lives in
//! registers or is re-derived ([`params`], [`vcpu_index`]).

#![no_std]

pub mod abi;

pub use abi::*;
use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};

// Every register access traps to the VMM and KVM emulates the faulting
// instruction; its emulator handles general-register moves, not SSE, so
// the accessors are spelled as the exact instructions rather than left to
// the optimiser (which may pick `movq xmm, [reg]` for a volatile store).

/// Write a 32-bit device register.
///
/// # Safety
/// `addr` must be a mapped device register (or memory) of this VM.
pub unsafe fn write32(addr: u64, v: u32) {
    // SAFETY: the caller names a mapped register; one 32-bit store.
    unsafe { asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) v, options(nostack)) }
}

/// # Safety
/// As [`write32`].
pub unsafe fn write64(addr: u64, v: u64) {
    // SAFETY: the caller names a mapped register; one 64-bit store.
    unsafe { asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) v, options(nostack)) }
}

/// # Safety
/// As [`write32`].
pub unsafe fn read32(addr: u64) -> u32 {
    let v: u32;
    // SAFETY: the caller names a mapped register; one 32-bit load.
    unsafe { asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack)) }
    v
}

/// # Safety
/// As [`write32`].
pub unsafe fn read64(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: the caller names a mapped register; one 64-bit load.
    unsafe { asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack)) }
    v
}

fn testdev(reg: u64) -> u64 {
    TESTDEV_BASE + reg
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads the time-stamp counter; nothing else.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

/// This vCPU's index, from its read-only info block (`%gs` points at it):
/// unlike a variable, it survives a teardown.
pub fn vcpu_index() -> u64 {
    let v: u64;
    // SAFETY: the VMM points GS at this vCPU's mapped `VcpuInfo`.
    unsafe { asm!("mov {}, gs:[0]", out(reg) v, options(nostack, readonly, preserves_flags)) };
    v
}

/// The vCPU count, from the same block.
pub fn vcpu_count() -> u64 {
    let v: u64;
    // SAFETY: as `vcpu_index`.
    unsafe { asm!("mov {}, gs:[8]", out(reg) v, options(nostack, readonly, preserves_flags)) };
    v
}

/// The parameter block (`rdx` at entry).
pub fn params() -> &'static Params {
    // SAFETY: the VMM maps the block read-only at PARAMS_ADDR for the
    // program's whole life.
    unsafe { &*(PARAMS_ADDR as *const Params) }
}

/// Print bytes to the VM's console (lines are kept whole per vCPU).
pub fn print_bytes(s: &[u8]) {
    let reg = testdev(testdev::CONSOLE);
    let mut words = s.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        // SAFETY: the console register is mapped; any width is text.
        unsafe { write64(reg, v) };
    }
    for b in words.remainder() {
        // SAFETY: as above, one byte wide.
        unsafe { write_volatile(reg as *mut u8, *b) };
    }
}

pub fn print(s: &str) {
    print_bytes(s.as_bytes());
}

/// Print `v` in decimal.
pub fn print_u64(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    print_bytes(&buf[i..]);
}

/// `core::fmt` output to the console: `write!(odpvm_guest::Console, ...)`.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        print(s);
        Ok(())
    }
}

/// End this vCPU's program with `code` (0 = pass).
pub fn exit(code: i32) -> ! {
    // SAFETY: the EXIT register is mapped; the VMM ends this vCPU.
    unsafe { write32(testdev(testdev::EXIT), code as u32) };
    loop {
        core::hint::spin_loop();
    }
}

/// Wait until every vCPU still running has called `barrier` too.
pub fn barrier() {
    // SAFETY: the command register is mapped.
    unsafe { write32(testdev(testdev::CMD), testdev::CMD_SYNC) };
}

/// Wait until the host releases this vCPU (`odpvm ctl resume`); meanwhile
/// the host may invalidate or tear down guest memory. Without a controller
/// it waits until `--timeout`.
pub fn host_barrier(phase: u32) {
    // SAFETY: the test device's registers are mapped.
    unsafe {
        write32(testdev(testdev::CMD), testdev::CMD_CLEAR);
        write32(testdev(testdev::ARG), phase);
        write32(testdev(testdev::CMD), testdev::CMD_BARRIER);
    }
}

/// Whether the host asked looping programs to finish.
pub fn should_stop() -> bool {
    // SAFETY: the STOP register is mapped.
    unsafe { read32(testdev(testdev::STOP)) != 0 }
}

/// Read an RNIC global register.
pub fn rnic_read32(reg: u64) -> u32 {
    // SAFETY: registers of the RNIC window read as zero when it is absent.
    unsafe { read32(RNIC_BASE + reg) }
}

pub fn rnic_read64(reg: u64) -> u64 {
    // SAFETY: as `rnic_read32`.
    unsafe { read64(RNIC_BASE + reg) }
}

/// Whether the VM has the RNIC (`--rnic emulated`, the default).
pub fn rnic_present() -> bool {
    rnic_read32(rnic::REG_ID) == rnic::ID
}

/// A completion, as read from the CQE registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    pub wr_id: u64,
    /// `ibv_wc_status`: 0 = success.
    pub status: u32,
    /// `rnic::OP_*`.
    pub opcode: u32,
    pub len: u32,
}

/// Why a poll found nothing to return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    Empty,
    /// The device stopped the queue pair (`QP_ERROR` says why).
    DeviceError(u32),
}

/// One queue pair and its rings, driven by one vCPU.
pub struct Qp {
    regs: u64,
    sq: &'static mut [SendWqe],
    rq: &'static mut [RecvEntry],
    sq_pi: u32,
    rq_pi: u32,
    /// Key of guest RAM (local and remote).
    pub lkey: u32,
}

impl Qp {
    /// Reset queue pair `q` and enable it with these rings (lengths: powers
    /// of two up to `rnic::MAX_RING`). The rings must stay where they are
    /// while the queue pair is open; the error is the `QP_ERROR` code.
    pub fn open(
        q: u32,
        sq: &'static mut [SendWqe],
        rq: &'static mut [RecvEntry],
    ) -> Result<Qp, u32> {
        let regs = RNIC_BASE + rnic::QP_BANK * (u64::from(q) + 1);
        // SAFETY: the bank lies in the mapped RNIC window (the device
        // ignores banks past its queue pairs).
        unsafe {
            write32(regs + rnic::QP_CTRL, rnic::CTRL_RESET);
            write64(regs + rnic::QP_SQ_BASE, sq.as_ptr() as u64);
            write32(regs + rnic::QP_SQ_SIZE, sq.len() as u32);
            write64(regs + rnic::QP_RQ_BASE, rq.as_ptr() as u64);
            write32(regs + rnic::QP_RQ_SIZE, rq.len() as u32);
            write32(regs + rnic::QP_CTRL, rnic::CTRL_ENABLE);
            if read32(regs + rnic::QP_STATUS) & rnic::STATUS_ENABLED == 0 {
                return Err(read32(regs + rnic::QP_ERROR).max(rnic::ERR_NOT_ENABLED));
            }
        }
        Ok(Qp {
            regs,
            sq,
            rq,
            sq_pi: 0,
            rq_pi: 0,
            lkey: rnic_read32(rnic::REG_LKEY),
        })
    }

    /// Put `w` in the next send slot; the device sees it at the next
    /// doorbell. Keep at most the ring's length outstanding.
    pub fn post_send(&mut self, w: &SendWqe) {
        let i = self.sq_pi as usize & (self.sq.len() - 1);
        // SAFETY: the slot is in the ring; volatile so the store is not
        // dropped (only the device reads it).
        unsafe { write_volatile(&mut self.sq[i], *w) };
        self.sq_pi = self.sq_pi.wrapping_add(1);
    }

    pub fn post_recv(&mut self, r: &RecvEntry) {
        let i = self.rq_pi as usize & (self.rq.len() - 1);
        // SAFETY: as `post_send`.
        unsafe { write_volatile(&mut self.rq[i], *r) };
        self.rq_pi = self.rq_pi.wrapping_add(1);
    }

    /// Hand every posted WQE to the device.
    pub fn ring_sq(&mut self) {
        // SAFETY: the doorbell register of this open queue pair.
        unsafe { write32(self.regs + rnic::QP_SQ_PI, self.sq_pi) };
    }

    pub fn ring_rq(&mut self) {
        // SAFETY: as `ring_sq`.
        unsafe { write32(self.regs + rnic::QP_RQ_PI, self.rq_pi) };
    }

    /// Take the oldest completion.
    pub fn poll(&mut self) -> Result<Cqe, Poll> {
        // SAFETY: registers of this open queue pair.
        unsafe {
            if read32(self.regs + rnic::QP_CQ_COUNT) == 0 {
                if read32(self.regs + rnic::QP_STATUS) & rnic::STATUS_DEVICE_ERROR != 0 {
                    return Err(Poll::DeviceError(read32(self.regs + rnic::QP_ERROR)));
                }
                return Err(Poll::Empty);
            }
            let c = Cqe {
                wr_id: read64(self.regs + rnic::QP_CQE_WR_ID),
                status: read32(self.regs + rnic::QP_CQE_STATUS),
                opcode: read32(self.regs + rnic::QP_CQE_OPCODE),
                len: read32(self.regs + rnic::QP_CQE_LEN),
            };
            write32(self.regs + rnic::QP_CQ_POP, 1);
            Ok(c)
        }
    }

    /// Poll until a completion arrives or the device stops the queue pair.
    pub fn wait(&mut self) -> Result<Cqe, Poll> {
        loop {
            match self.poll() {
                Err(Poll::Empty) => core::hint::spin_loop(),
                other => return other,
            }
        }
    }
}

#[cfg(feature = "panic-handler")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    let _ = writeln!(Console, "panic: {info}");
    exit(101)
}

// The compiler calls these for copies and fills; without libc the program
// brings them. String instructions: the compiler cannot turn them back
// into calls to themselves.

/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping ranges of n bytes.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is safe for this overlap (or none).
        unsafe { memcpy(dst, src, n) };
    } else {
        // SAFETY: backward copy of valid ranges; the direction flag is
        // cleared again.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                 inout("rcx") n => _, options(nostack))
        };
    }
    dst
}

/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid range of n bytes.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller passes valid ranges of n bytes.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// Never called: programs build with `panic = "abort"`, but the prebuilt
/// `core` of the linux-gnu target still names the unwinder's personality
/// routine, so the linker needs the symbol.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
