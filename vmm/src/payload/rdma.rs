//! Guest RDMA workloads (perftest-like), driving the paravirtual RNIC from
//! ring 3. Everything they keep lives in registers (general purpose and
//! xmm), never in memory: a teardown may wipe guest memory between any two
//! instructions. Rings or buffers wiped under a queue pair make WQEs fail;
//! the workload then resets its queue pair and goes on (counting it).
//!
//! Per-vCPU guest memory (16 MiB each, from the start of RAM): send ring at
//! +0 (64 WQEs), receive ring at +4 KiB (`RQ_OFFSET`), message slots at +1 MiB (4 of at
//! most 512 KiB). On the host peer: vCPU `i` writes to
//! `[i * 4 MiB, +4 MiB)` and reads from `[len/2 + i * 2 MiB, +2 MiB)`.
//!
//! Message page stamps: a WRITE's source page carries `(message << 32) |
//! destination page index` in its first qword; the device checks it on
//! the host side. READ sources carry the host's `READ_STAMP_MAGIC | page`,
//! checked by the guest.

use super::params;
use crate::devices::rnic::*;
use crate::devices::testdev::{ARG, CMD, CMD_FAIL, CMD_PASS, CMD_SAMPLE, STOP};
use crate::layout::{PAYLOAD_RAM_VA, RNIC_MMIO_GPA, TESTDEV_MMIO_GPA};
use iced_x86::code_asm::*;
use std::mem::offset_of;

// Where the payloads store each field of a ring entry (the one layout in
// `devices::rnic::abi`).
pub(super) const WQE_WR_ID: u64 = offset_of!(SendWqe, wr_id) as u64;
pub(super) const WQE_OPCODE: u64 = offset_of!(SendWqe, opcode) as u64;
pub(super) const WQE_FLAGS: u64 = offset_of!(SendWqe, flags) as u64;
pub(super) const WQE_ADDR: u64 = offset_of!(SendWqe, addr) as u64;
pub(super) const WQE_LENGTH: u64 = offset_of!(SendWqe, length) as u64;
pub(super) const WQE_LKEY: u64 = offset_of!(SendWqe, lkey) as u64;
const WQE_REMOTE_ADDR: u64 = offset_of!(SendWqe, remote_addr) as u64;
const WQE_RKEY: u64 = offset_of!(SendWqe, rkey) as u64;
pub(super) const RQE_WR_ID: u64 = offset_of!(RecvEntry, wr_id) as u64;
pub(super) const RQE_ADDR: u64 = offset_of!(RecvEntry, addr) as u64;
pub(super) const RQE_LENGTH: u64 = offset_of!(RecvEntry, length) as u64;
pub(super) const RQE_LKEY: u64 = offset_of!(RecvEntry, lkey) as u64;
/// The receive ring follows the send ring, one page into the region.
pub(super) const RQ_OFFSET: u64 = 0x1000;
const _: () = assert!(RING * WQE_SIZE <= RQ_OFFSET);

pub const REGION: u64 = 16 << 20;
pub const RING: u64 = 64;
pub const SLOTS: u64 = 4;
pub const MSG_AREA: u64 = 1 << 20;
pub const PEER_WRITE_SPAN: u64 = 4 << 20;
pub const PEER_READ_SPAN: u64 = 2 << 20;
/// Messages per signaled completion (and per doorbell).
pub const BATCH: u64 = 16;
/// Batches in flight at most.
const DEPTH_BATCHES: u64 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Garbage to every register, ring and doorbell first; then prove the
    /// device still works with a short WRITE run.
    Garbage,
    WriteBw,
    ReadBw,
    WriteLat,
    SendLat,
}

pub(super) type Asm = CodeAssembler;
pub(super) type R = Result<(), IcedError>;

// Register roles:
//   r15 params, r14 vCPU, rbp RNIC queue-pair bank, rbx region VA,
//   r12 region gpa, r13 messages posted, r11 messages settled (completed
//   or abandoned), r10 send producer index, r9 messages completed OK.
//   xmm0 start TSC, xmm1 peer base for this vCPU (write or read span),
//   xmm2 message size, xmm3 lkey | rkey << 32, xmm4 iterations,
//   xmm5 error completions, xmm6 recoveries, xmm7 stale pages,
//   xmm8 receive producer index, xmm9 latency start TSC.

pub(super) fn xget(a: &mut Asm, dst: AsmRegister64, x: AsmRegisterXmm) -> R {
    a.movq(dst, x)
}

pub(super) fn xset(a: &mut Asm, x: AsmRegisterXmm, src: AsmRegister64) -> R {
    a.movq(x, src)
}

pub(super) fn xinc(a: &mut Asm, x: AsmRegisterXmm) -> R {
    xget(a, rax, x)?;
    a.inc(rax)?;
    xset(a, x, rax)
}

pub(super) fn report_arg(a: &mut Asm, src: AsmRegister64) -> R {
    a.mov(rax, src)?;
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(dword_ptr(rdx + ARG), eax)?;
    Ok(())
}

pub(super) fn report_cmd(a: &mut Asm, cmd: u32) -> R {
    a.mov(eax, cmd)?;
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(dword_ptr(rdx + CMD), eax)?;
    Ok(())
}

pub(super) fn spin_forever(a: &mut Asm) -> R {
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.pause()?;
    a.jmp(l)?;
    Ok(())
}

/// Reset queue pair `rbp` and enable it again on the ring at `r12` (send
/// queue there, receive queue `RQ_OFFSET` after it); jump to `failed` if
/// the device does not enable it. Clobbers eax.
pub(super) fn reset_and_enable_qp(a: &mut Asm, failed: CodeLabel) -> R {
    a.mov(dword_ptr(rbp + QP_CTRL), CTRL_RESET)?;
    a.mov(qword_ptr(rbp + QP_SQ_BASE), r12)?;
    a.mov(dword_ptr(rbp + QP_SQ_SIZE), RING as u32)?;
    a.lea(rax, qword_ptr(r12 + RQ_OFFSET))?;
    a.mov(qword_ptr(rbp + QP_RQ_BASE), rax)?;
    a.mov(dword_ptr(rbp + QP_RQ_SIZE), RING as u32)?;
    a.mov(dword_ptr(rbp + QP_CTRL), CTRL_ENABLE)?;
    a.mov(eax, dword_ptr(rbp + QP_STATUS))?;
    a.test(eax, STATUS_ENABLED)?;
    a.jz(failed)
}

/// rax = rdtsc (64-bit).
pub(super) fn tsc(a: &mut Asm) -> R {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    Ok(())
}

pub fn assemble(kind: Kind, a: &mut Asm) -> R {
    let mut no_device = a.create_label();
    let mut setup = a.create_label();
    let mut top = a.create_label();
    let mut finish = a.create_label();
    let mut recover = a.create_label();
    let mut drain = a.create_label();

    // ---- one-time set-up -------------------------------------------------
    a.mov(r15, rdx)?;
    a.mov(r14, rdi)?;
    if kind == Kind::Garbage {
        garbage(a)?;
    }
    let kind = if kind == Kind::Garbage {
        Kind::WriteBw
    } else {
        kind
    };
    a.mov(rsi, RNIC_MMIO_GPA)?;
    a.mov(eax, dword_ptr(rsi + REG_ID))?;
    a.cmp(eax, RNIC_ID as i32)?;
    a.jne(no_device)?;
    a.lea(rbp, qword_ptr(r14 + 1))?;
    a.shl(rbp, 8)?;
    a.add(rbp, rsi)?;
    a.mov(rbx, r14)?;
    a.shl(rbx, REGION.trailing_zeros())?;
    a.mov(r12, rbx)?;
    a.mov(rax, PAYLOAD_RAM_VA)?;
    a.add(rbx, rax)?;
    a.add(r12, qword_ptr(r15 + params::RAM_GPA))?;
    // xmm1: this vCPU's span on the peer.
    a.mov(rax, qword_ptr(rsi + REG_PEER_ADDR))?;
    a.mov(rcx, r14)?;
    if kind == Kind::ReadBw {
        a.shl(rcx, PEER_READ_SPAN.trailing_zeros())?;
        a.mov(rdx, qword_ptr(rsi + REG_PEER_LEN))?;
        a.shr(rdx, 1)?;
        a.add(rax, rdx)?;
    } else {
        a.shl(rcx, PEER_WRITE_SPAN.trailing_zeros())?;
    }
    a.add(rax, rcx)?;
    xset(a, xmm1, rax)?;
    a.mov(rax, qword_ptr(r15 + params::MSG))?;
    xset(a, xmm2, rax)?;
    a.mov(eax, dword_ptr(rsi + REG_LKEY))?;
    a.mov(ecx, dword_ptr(rsi + REG_PEER_RKEY))?;
    a.shl(rcx, 32)?;
    a.or(rax, rcx)?;
    xset(a, xmm3, rax)?;
    a.mov(rax, qword_ptr(r15 + params::ITERS))?;
    xset(a, xmm4, rax)?;
    a.xor(eax, eax)?;
    for x in [xmm5, xmm6, xmm7, xmm8] {
        xset(a, x, rax)?;
    }
    a.xor(r13, r13)?;
    a.xor(r9, r9)?;
    tsc(a)?;
    xset(a, xmm0, rax)?;

    // ---- (re)initialise the queue pair -----------------------------------
    a.set_label(&mut setup)?;
    reset_and_enable_qp(a, no_device)?;
    a.xor(r10, r10)?;
    a.xor(eax, eax)?;
    xset(a, xmm8, rax)?;
    a.mov(r11, r13)?; // whatever was in flight is abandoned

    // ---- main loop ---------------------------------------------------------
    a.set_label(&mut top)?;
    // Done? A fixed count, or (count 0) until the host says stop.
    xget(a, rax, xmm4)?;
    a.test(rax, rax)?;
    let mut by_stop = a.create_label();
    let mut go_on = a.create_label();
    a.jz(by_stop)?;
    a.cmp(r13, rax)?;
    a.jae(drain)?;
    a.jmp(go_on)?;
    a.set_label(&mut by_stop)?;
    a.test(r13, 63)?;
    a.jnz(go_on)?;
    a.mov(rax, TESTDEV_MMIO_GPA)?;
    a.mov(eax, dword_ptr(rax + STOP))?;
    a.test(eax, eax)?;
    a.jnz(drain)?;
    a.set_label(&mut go_on)?;

    match kind {
        Kind::WriteBw | Kind::ReadBw | Kind::Garbage => {
            // Flow control: at most DEPTH_BATCHES batches unsettled.
            let mut room = a.create_label();
            a.mov(rax, r13)?;
            a.sub(rax, r11)?;
            a.cmp(rax, (BATCH * DEPTH_BATCHES) as i32)?;
            a.jb(room)?;
            wait_one(a, kind, recover)?;
            a.jmp(top)?;
            a.set_label(&mut room)?;
            post_rw(a, kind)?;
            a.jmp(top)?;
        }
        Kind::WriteLat => {
            tsc(a)?;
            xset(a, xmm9, rax)?;
            post_rw(a, kind)?;
            wait_one(a, kind, recover)?;
            sample(a)?;
            a.jmp(top)?;
        }
        Kind::SendLat => {
            tsc(a)?;
            xset(a, xmm9, rax)?;
            post_recv(a)?;
            post_send(a)?;
            wait_one(a, kind, recover)?;
            sample(a)?;
            a.jmp(top)?;
        }
    }

    a.set_label(&mut recover)?;
    xinc(a, xmm6)?;
    a.jmp(setup)?;

    // ---- drain, check, report ------------------------------------------------
    a.set_label(&mut drain)?;
    a.cmp(r11, r13)?;
    a.jae(finish)?;
    wait_one(a, kind, recover)?;
    a.jmp(drain)?;
    a.set_label(&mut finish)?;
    tsc(a)?;
    xget(a, rcx, xmm0)?;
    a.sub(rax, rcx)?;
    a.mov(r8, rax)?;
    if kind == Kind::ReadBw {
        check_read_slots(a)?;
    }
    report_arg(a, r9)?;
    xget(a, rcx, xmm2)?;
    report_arg(a, rcx)?;
    report_arg(a, r8)?;
    a.shr(r8, 32)?;
    report_arg(a, r8)?;
    xget(a, rcx, xmm5)?;
    report_arg(a, rcx)?;
    xget(a, rcx, xmm6)?;
    report_arg(a, rcx)?;
    xget(a, rcx, xmm7)?;
    report_arg(a, rcx)?;
    let mut failed = a.create_label();
    a.test(rcx, rcx)?;
    a.jnz(failed)?;
    report_cmd(a, CMD_PASS)?;
    spin_forever(a)?;
    a.set_label(&mut failed)?;
    report_cmd(a, CMD_FAIL)?;
    spin_forever(a)?;

    a.set_label(&mut no_device)?;
    a.mov(ecx, 0xdead_u32)?;
    report_arg(a, rcx)?;
    report_cmd(a, CMD_FAIL)?;
    spin_forever(a)
}

/// 20000 random register accesses (any width, any offset in the window)
/// and random stores into this vCPU's ring pages.
fn garbage(a: &mut Asm) -> R {
    let mut top = a.create_label();
    let mut narrow = a.create_label();
    let mut next = a.create_label();
    // r8: xorshift state, r9: count, rbx: ring pages VA.
    a.mov(r8, 0x9e37_79b9_7f4a_7c15u64)?;
    a.add(r8, r14)?;
    a.mov(r9, 20_000u64)?;
    a.mov(rbx, r14)?;
    a.shl(rbx, REGION.trailing_zeros())?;
    a.mov(rax, PAYLOAD_RAM_VA)?;
    a.add(rbx, rax)?;
    a.set_label(&mut top)?;
    for (op, sh) in [(0, 13), (1, 7), (0, 17)] {
        a.mov(rax, r8)?;
        if op == 0 {
            a.shl(rax, sh)?;
        } else {
            a.shr(rax, sh)?;
        }
        a.xor(r8, rax)?;
    }
    // Register at RNIC + (state & 0x1ffc) (the window and beyond a bit).
    a.mov(rsi, r8)?;
    a.and(rsi, 0x1ffc)?;
    a.mov(rax, RNIC_MMIO_GPA)?;
    a.add(rsi, rax)?;
    a.mov(rax, r8)?;
    a.shr(rax, 20)?;
    a.bt(r8, 40)?;
    a.jnc(narrow)?;
    a.and(rsi, !7i32)?;
    a.mov(qword_ptr(rsi), rax)?;
    a.jmp(next)?;
    a.set_label(&mut narrow)?;
    a.mov(dword_ptr(rsi), eax)?;
    a.set_label(&mut next)?;
    a.mov(ecx, dword_ptr(rsi))?;
    // And a random store into the ring pages.
    a.mov(rcx, r8)?;
    a.shr(rcx, 3)?;
    a.and(rcx, 0x1ff8)?;
    a.mov(qword_ptr(rbx + rcx), r8)?;
    a.dec(r9)?;
    a.jnz(top)?;
    Ok(())
}

/// Wait for one completion, inline (no call/ret: the stack is memory a
/// teardown may wipe). An error completion or a device error goes to
/// `recover`; success settles a batch (bandwidth) or one message.
fn wait_one(a: &mut Asm, kind: Kind, recover: CodeLabel) -> R {
    let mut poll = a.create_label();
    let mut got = a.create_label();
    let mut ok = a.create_label();
    a.set_label(&mut poll)?;
    a.mov(eax, dword_ptr(rbp + QP_CQ_COUNT))?;
    a.test(eax, eax)?;
    a.jnz(got)?;
    a.mov(eax, dword_ptr(rbp + QP_STATUS))?;
    a.test(eax, STATUS_DEVICE_ERROR)?;
    a.jnz(recover)?;
    a.pause()?;
    a.jmp(poll)?;
    a.set_label(&mut got)?;
    a.mov(ecx, dword_ptr(rbp + QP_CQE_STATUS))?;
    a.mov(dword_ptr(rbp + QP_CQ_POP), 1)?;
    a.test(ecx, ecx)?;
    a.jz(ok)?;
    xinc(a, xmm5)?;
    a.jmp(recover)?;
    a.set_label(&mut ok)?;
    let settled = if matches!(kind, Kind::WriteBw | Kind::ReadBw) {
        BATCH
    } else {
        1
    };
    a.add(r11, settled as i32)?;
    a.add(r9, settled as i32)?;
    Ok(())
}

/// Record `rdtsc - xmm9` as a latency sample.
pub(super) fn sample(a: &mut Asm) -> R {
    tsc(a)?;
    xget(a, rcx, xmm9)?;
    a.sub(rax, rcx)?;
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(dword_ptr(rdx + ARG), eax)?;
    a.mov(eax, CMD_SAMPLE)?;
    a.mov(dword_ptr(rdx + CMD), eax)?;
    Ok(())
}

/// rsi = slot offset of message r13 (slot * msg); rdi = its VA.
fn slot(a: &mut Asm) -> R {
    a.mov(rsi, r13)?;
    a.and(rsi, (SLOTS - 1) as i32)?;
    xget(a, rax, xmm2)?;
    a.imul_2(rsi, rax)?;
    a.lea(rdi, qword_ptr(rbx + rsi + MSG_AREA as i32))?;
    Ok(())
}

/// rdx = VA of the next send-ring entry.
fn sq_entry(a: &mut Asm) -> R {
    a.mov(rdx, r10)?;
    a.and(rdx, (RING - 1) as i32)?;
    a.shl(rdx, WQE_SIZE.trailing_zeros())?;
    a.add(rdx, rbx)?;
    Ok(())
}

/// Post RDMA WRITE or READ of message r13 (signaled at the end of a batch,
/// or always for latency), ring the doorbell per batch.
fn post_rw(a: &mut Asm, kind: Kind) -> R {
    slot(a)?;
    if kind != Kind::ReadBw {
        // Stamp each page: (message << 32) | destination page index.
        let mut pg = a.create_label();
        let mut pg_done = a.create_label();
        // rcx = destination page index of page 0 = (vCPU span + slot) >> 12
        a.mov(rcx, r14)?;
        a.shl(rcx, PEER_WRITE_SPAN.trailing_zeros())?;
        a.add(rcx, rsi)?;
        a.shr(rcx, 12)?;
        a.mov(rax, r13)?;
        a.shl(rax, 32)?;
        a.or(rcx, rax)?;
        xget(a, rax, xmm2)?;
        a.lea(r8, qword_ptr(rdi + rax))?; // end VA
        a.mov(rdx, rdi)?;
        a.set_label(&mut pg)?;
        a.cmp(rdx, r8)?;
        a.jae(pg_done)?;
        a.mov(qword_ptr(rdx), rcx)?;
        a.inc(rcx)?;
        a.add(rdx, 4096)?;
        a.jmp(pg)?;
        a.set_label(&mut pg_done)?;
    }
    sq_entry(a)?;
    a.mov(qword_ptr(rdx + WQE_WR_ID), r13)?;
    let op = if kind == Kind::ReadBw {
        OP_READ
    } else {
        OP_WRITE
    };
    a.mov(dword_ptr(rdx + WQE_OPCODE), op)?;
    // signaled?
    if matches!(kind, Kind::WriteLat | Kind::SendLat) {
        a.mov(dword_ptr(rdx + WQE_FLAGS), WQE_SIGNALED)?;
    } else {
        a.mov(eax, r13d)?;
        a.and(eax, (BATCH - 1) as i32)?;
        a.cmp(eax, (BATCH - 1) as i32)?;
        a.sete(al)?;
        a.movzx(eax, al)?;
        a.mov(dword_ptr(rdx + WQE_FLAGS), eax)?;
    }
    // local address (gpa) = region gpa + MSG_AREA + slot offset
    a.lea(rax, qword_ptr(r12 + rsi + MSG_AREA as i32))?;
    a.mov(qword_ptr(rdx + WQE_ADDR), rax)?;
    xget(a, rax, xmm2)?;
    a.mov(dword_ptr(rdx + WQE_LENGTH), eax)?;
    xget(a, rax, xmm3)?;
    a.mov(dword_ptr(rdx + WQE_LKEY), eax)?;
    a.shr(rax, 32)?;
    a.mov(dword_ptr(rdx + WQE_RKEY), eax)?;
    xget(a, rax, xmm1)?;
    a.add(rax, rsi)?;
    a.mov(qword_ptr(rdx + WQE_REMOTE_ADDR), rax)?;
    a.inc(r10)?;
    a.inc(r13)?;
    if matches!(kind, Kind::WriteBw | Kind::ReadBw) {
        let mut no_bell = a.create_label();
        a.test(r13, (BATCH - 1) as i32)?;
        a.jnz(no_bell)?;
        a.mov(dword_ptr(rbp + QP_SQ_PI), r10d)?;
        a.set_label(&mut no_bell)?;
        a.nop()?;
    } else {
        a.mov(dword_ptr(rbp + QP_SQ_PI), r10d)?;
    }
    Ok(())
}

/// Post a receive for the echo into slot 3's area.
fn post_recv(a: &mut Asm) -> R {
    xget(a, rdx, xmm8)?;
    a.and(rdx, (RING - 1) as i32)?;
    a.shl(rdx, RQE_SIZE.trailing_zeros())?;
    a.lea(rdx, qword_ptr(rbx + rdx + RQ_OFFSET))?;
    a.mov(qword_ptr(rdx + RQE_WR_ID), r13)?;
    xget(a, rax, xmm2)?;
    a.imul_3(rax, rax, (SLOTS - 1) as i32)?;
    a.lea(rax, qword_ptr(r12 + rax + MSG_AREA as i32))?;
    a.mov(qword_ptr(rdx + RQE_ADDR), rax)?;
    xget(a, rax, xmm2)?;
    a.mov(dword_ptr(rdx + RQE_LENGTH), eax)?;
    xget(a, rax, xmm3)?;
    a.mov(dword_ptr(rdx + RQE_LKEY), eax)?;
    xinc(a, xmm8)?;
    xget(a, rax, xmm8)?;
    a.mov(dword_ptr(rbp + QP_RQ_PI), eax)?;
    Ok(())
}

/// An unsignaled SEND of message slot 0.
fn post_send(a: &mut Asm) -> R {
    sq_entry(a)?;
    a.mov(qword_ptr(rdx + WQE_WR_ID), r13)?;
    a.mov(dword_ptr(rdx + WQE_OPCODE), OP_SEND)?;
    a.mov(dword_ptr(rdx + WQE_FLAGS), 0)?;
    a.lea(rax, qword_ptr(r12 + MSG_AREA as i32))?;
    a.mov(qword_ptr(rdx + WQE_ADDR), rax)?;
    xget(a, rax, xmm2)?;
    a.mov(dword_ptr(rdx + WQE_LENGTH), eax)?;
    xget(a, rax, xmm3)?;
    a.mov(dword_ptr(rdx + WQE_LKEY), eax)?;
    a.inc(r10)?;
    a.inc(r13)?;
    a.mov(dword_ptr(rbp + QP_SQ_PI), r10d)?;
    Ok(())
}

/// READ results: every page of every slot holds zero (wiped) or the host's
/// stamp for its place; anything else counts in xmm7 (stale).
fn check_read_slots(a: &mut Asm) -> R {
    let (mut top, mut done, mut next, mut bad) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    // rdi walks the slots' pages; rcx = expected page index on the host.
    a.lea(rdi, qword_ptr(rbx + MSG_AREA as i32))?;
    xget(a, rax, xmm2)?;
    a.imul_3(rax, rax, SLOTS as i32)?;
    a.lea(rsi, qword_ptr(rdi + rax))?;
    xget(a, rcx, xmm1)?;
    a.mov(rax, RNIC_MMIO_GPA)?;
    a.sub(rcx, qword_ptr(rax + REG_PEER_ADDR))?;
    a.shr(rcx, 12)?;
    a.mov(rdx, READ_STAMP_MAGIC)?;
    a.or(rcx, rdx)?;
    a.set_label(&mut top)?;
    a.cmp(rdi, rsi)?;
    a.jae(done)?;
    a.mov(rax, qword_ptr(rdi))?;
    a.test(rax, rax)?;
    a.jz(next)?;
    a.cmp(rax, rcx)?;
    a.jne(bad)?;
    a.set_label(&mut next)?;
    a.inc(rcx)?;
    a.add(rdi, 4096)?;
    a.jmp(top)?;
    a.set_label(&mut bad)?;
    xinc(a, xmm7)?;
    a.jmp(next)?;
    a.set_label(&mut done)?;
    Ok(())
}
