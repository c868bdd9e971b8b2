//! Stamped SEND/RECV between two guests: `send-ping` sends message `m`
//! and waits for the reply; `recv-pong` (on the other VM) receives it,
//! checks it and SENDs back a reply it stamps itself, which `send-ping`
//! checks likewise. Both run in ring 3 and keep every piece of state in
//! registers (a teardown may wipe guest memory between any two
//! instructions).
//!
//! **Stamps.** Every 64-byte line of a message holds, in its first qword,
//! `(seq + 1) << 32 | tag << 24 | line`: `tag` names the sender (`0x01`
//! ping, `0x02` pong; bit `0x80` marks a resend). The receive buffer is
//! reused, so a line the RNIC did not write keeps an older message's
//! stamp: a short, stale, duplicated or reordered message shows a line
//! that is neither the expected stamp nor zero, and is counted `stale`
//! (so is a byte count other than the message size).
//!
//! **Teardowns.** A zero line is a page made fresh after the data landed
//! (at the receiver) or before the sender's RNIC read it (at the sender).
//! The receiver excuses zeros when a RAM-freshening action started on its
//! VM since it began waiting for the message (`EPOCH_STARTED`); otherwise
//! it holds the message as a candidate and waits for the sender's resend:
//! after each SEND completes, the sender reads its buffer back, and a
//! zero there (a wipe before or after its RNIC read it) makes it send the
//! message again, flagged. A resend of a message already taken is counted
//! `redundant`; the responder then resends its reply too (the requester
//! lost it, e.g. to a queue-pair reset). The requester resends after a
//! long silence (`timeouts`). Counted per guest: `checked` (every line
//! right the first time), `wiped` (excused or resent), `stale`.
//!
//! Ring entries are written key or opcode first: a teardown between the
//! stores loses that field, which the device rejects, instead of posting
//! a half-zero entry (`RnicDevice::recv_doorbell`).
//!
//! Buffers: vCPU `i` uses `[7/8 RAM + i MiB, +1 MiB)` of guest RAM (the
//! last eighth: inside the RoCE window, where the churn's invalidations
//! reach), the message it sends at `+0`, receives at `+512 KiB`. Rings as
//! the other RDMA payloads (`rdma.rs`).
//!
//! A queue-pair reset (after an error completion) drops the completions
//! queued; whatever either side may still wait for is sent again, flagged.
//! A bank that will not re-enable (its RoCE connection is gone) ends the
//! guest with its report and a failure.
//!
//! Tests: `vmm/tests/roce.rs` (`two_vmm_processes_send_recv_over_roce`:
//! every message checked; `two_vmm_processes_under_one_percent_loss_and_churn`:
//! nothing stale under loss and teardowns of the responder;
//! `a_queue_pair_whose_roce_connection_died_says_so`), and
//! `vmm/tests/roce_hostile.rs` (a raw peer: duplicate, short, RNR and
//! oversized SENDs counted or NAKed).

use super::params;
use super::rdma::*;
use crate::devices::rnic::*;
use crate::devices::testdev::{CMD_FAIL, CMD_PASS, EPOCH_STARTED, STOP};
use crate::layout::{PAYLOAD_RAM_VA, RNIC_MMIO_GPA, TESTDEV_MMIO_GPA};
use iced_x86::code_asm::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Requester: sends `iters` messages, one at a time.
    Ping,
    /// Responder: answers every message until the host says stop.
    Pong,
}

const TAG_PING: u64 = 0x01;
const TAG_PONG: u64 = 0x02;
const TAG_RESEND: u64 = 0x80;
const LINE: u64 = 64;
/// Per-vCPU buffer span and where the receive buffer starts in it.
const BUF_SPAN: u64 = 1 << 20;
const RX_OFF: u64 = 512 << 10;
/// Silence (no completion) after which the requester resends.
const TIMEOUT_MS: i32 = 500;
/// Idle polls between two looks at the status, `STOP` and the clock
/// (counted in r9 from bit 8: the low byte holds the flags).
const POLL_UNIT: i32 = 1 << 8;
const CHECK_EVERY_MASK: i32 = 0xff << 8;
/// Queue-pair resets before the guest gives up (its connection is gone).
const MAX_RECOVERIES: i32 = 64;

// r9 flags.
const F_SEND_BUSY: i32 = 1;
const F_CANDIDATE: i32 = 2;
/// Ping: the reply to r13 was taken. Pong: a reply to r13 - 1 is owed.
const F_DONE: i32 = 4;
const F_OWED_RESEND: i32 = 8;
const F_TX_RESEND: i32 = 16;

// Registers: r15 params, r14 vCPU, rbp queue-pair bank, rbx ring VA,
// r12 ring gpa, r13 the message awaited (ping: the one sent; pong: the
// next one), r11 the seq stamped in the send buffer, r10 send producer
// index, r9 flags (bits 0-7) and idle polls (from bit 8), r8 the TSC of
// the last completion. xmm0 start TSC, xmm1 buffer offset in
// RAM, xmm2 message size, xmm3 lkey, xmm4 iterations, xmm5 errors, xmm6
// recoveries, xmm7 stale, xmm8 receive producer index, xmm9 latency start,
// xmm10 checked, xmm11 wiped, xmm12 resends, xmm13 redundant, xmm14 epoch
// when the wait began, xmm15 timeouts.

pub fn assemble(role: Role, a: &mut Asm) -> R {
    let (mut no_device, mut setup, mut top, mut poll) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let (mut got, mut cq_error, mut on_send, mut on_recv) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let (mut recover, mut finish) = (a.create_label(), a.create_label());
    let (mut not_enabled, mut fail) = (a.create_label(), a.create_label());
    let (my_tag, peer_tag) = match role {
        Role::Ping => (TAG_PING, TAG_PONG),
        Role::Pong => (TAG_PONG, TAG_PING),
    };

    // ---- one-time set-up ---------------------------------------------------
    a.mov(r15, rdx)?;
    a.mov(r14, rdi)?;
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
    // xmm1 = 7/8 of RAM + vCPU * BUF_SPAN
    a.mov(rax, qword_ptr(r15 + params::RAM_PAGES))?;
    a.shl(rax, 12)?;
    a.mov(rcx, rax)?;
    a.shr(rcx, 3)?;
    a.sub(rax, rcx)?;
    a.mov(rcx, r14)?;
    a.shl(rcx, BUF_SPAN.trailing_zeros())?;
    a.add(rax, rcx)?;
    xset(a, xmm1, rax)?;
    a.mov(rax, qword_ptr(r15 + params::MSG))?;
    xset(a, xmm2, rax)?;
    a.mov(eax, dword_ptr(rsi + REG_LKEY))?;
    xset(a, xmm3, rax)?;
    a.mov(rax, qword_ptr(r15 + params::ITERS))?;
    xset(a, xmm4, rax)?;
    a.xor(eax, eax)?;
    for x in [
        xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm15,
    ] {
        xset(a, x, rax)?;
    }
    a.xor(r11, r11)?;
    match role {
        // "Message -1 done": the loop sends message 0 first.
        Role::Ping => {
            a.mov(r13, -1i64)?;
            a.mov(r9, F_DONE as u64)?;
        }
        Role::Pong => {
            a.xor(r13, r13)?;
            a.xor(r9, r9)?;
        }
    }
    tsc(a)?;
    xset(a, xmm0, rax)?;

    // ---- (re)initialise the queue pair -------------------------------------
    // After a reset its completions are gone: nothing is in flight, and
    // whatever the peer may still wait for is sent again, flagged.
    a.set_label(&mut setup)?;
    reset_and_enable_qp(a, not_enabled)?;
    a.xor(r10, r10)?;
    a.xor(eax, eax)?;
    xset(a, xmm8, rax)?;
    a.and(r9, !(F_SEND_BUSY | F_TX_RESEND))?;
    tsc(a)?;
    a.mov(r8, rax)?;
    epoch_now(a)?;
    post_recv(a)?;
    match role {
        Role::Ping => {
            let mut no_resend = a.create_label();
            a.test(r9, F_DONE)?;
            a.jnz(no_resend)?;
            a.or(r9, F_TX_RESEND)?;
            send(a, my_tag)?;
            a.set_label(&mut no_resend)?;
            a.nop()?;
        }
        Role::Pong => {
            let mut none_yet = a.create_label();
            a.test(r13, r13)?;
            a.jz(none_yet)?;
            a.or(r9, F_DONE | F_OWED_RESEND)?;
            a.set_label(&mut none_yet)?;
            a.nop()?;
        }
    }

    // ---- event loop ----------------------------------------------------------
    a.set_label(&mut top)?;
    match role {
        Role::Ping => {
            // The reply to r13 taken and its SEND completed: next message.
            let mut wait = a.create_label();
            a.mov(rax, r9)?;
            a.and(eax, F_DONE | F_SEND_BUSY)?;
            a.cmp(eax, F_DONE)?;
            a.jne(wait)?;
            xget(a, rcx, xmm4)?;
            a.lea(rax, qword_ptr(r13 + 1))?;
            a.test(rcx, rcx)?;
            a.jz(wait)?; // 0: until STOP; checked while idle
            a.cmp(rax, rcx)?;
            a.jae(finish)?;
            a.set_label(&mut wait)?;
            let mut busy = a.create_label();
            a.mov(rax, r9)?;
            a.and(eax, F_DONE | F_SEND_BUSY)?;
            a.cmp(eax, F_DONE)?;
            a.jne(busy)?;
            a.inc(r13)?;
            a.and(r9, !(F_DONE | F_TX_RESEND))?;
            a.mov(r11, r13)?;
            tsc(a)?;
            xset(a, xmm9, rax)?;
            send(a, my_tag)?;
            a.set_label(&mut busy)?;
            a.nop()?;
        }
        Role::Pong => {
            let (mut busy, mut fresh) = (a.create_label(), a.create_label());
            a.mov(rax, r9)?;
            a.and(eax, F_DONE | F_SEND_BUSY)?;
            a.cmp(eax, F_DONE)?;
            a.jne(busy)?;
            a.lea(r11, qword_ptr(r13 - 1))?;
            a.and(r9, !F_TX_RESEND)?;
            a.test(r9, F_OWED_RESEND)?;
            a.jz(fresh)?;
            a.or(r9, F_TX_RESEND)?;
            a.set_label(&mut fresh)?;
            a.and(r9, !(F_DONE | F_OWED_RESEND))?;
            send(a, my_tag)?;
            a.set_label(&mut busy)?;
            a.nop()?;
        }
    }
    a.set_label(&mut poll)?;
    a.mov(eax, dword_ptr(rbp + QP_CQ_COUNT))?;
    a.test(eax, eax)?;
    a.jnz(got)?;
    // Every POLL_UNIT idle polls (one MMIO exit each): the device's
    // status, STOP and the clock.
    let mut patient = a.create_label();
    a.add(r9, POLL_UNIT)?;
    a.test(r9, CHECK_EVERY_MASK)?;
    a.jnz(patient)?;
    a.and(r9, POLL_UNIT - 1)?;
    a.mov(eax, dword_ptr(rbp + QP_STATUS))?;
    a.test(eax, STATUS_DEVICE_ERROR)?;
    a.jnz(recover)?;
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(eax, dword_ptr(rdx + STOP))?;
    a.test(eax, eax)?;
    a.jnz(finish)?;
    if role == Role::Ping {
        // Silence: send the awaited message again (the responder answers a
        // resend of what it already took with its reply, flagged).
        tsc(a)?;
        a.sub(rax, r8)?;
        a.mov(rcx, qword_ptr(r15 + params::TICKS_PER_MS))?;
        a.imul_3(rcx, rcx, TIMEOUT_MS)?;
        a.cmp(rax, rcx)?;
        a.jb(patient)?;
        tsc(a)?;
        a.mov(r8, rax)?;
        xinc(a, xmm15)?;
        a.test(r9, F_DONE | F_SEND_BUSY)?;
        a.jnz(patient)?;
        a.or(r9, F_TX_RESEND)?;
        xinc(a, xmm12)?;
        send(a, my_tag)?;
    }
    a.set_label(&mut patient)?;
    a.pause()?;
    a.jmp(top)?;

    a.set_label(&mut got)?;
    tsc(a)?;
    a.mov(r8, rax)?;
    a.mov(ecx, dword_ptr(rbp + QP_CQE_STATUS))?;
    a.mov(esi, dword_ptr(rbp + QP_CQE_OPCODE))?;
    a.mov(edi, dword_ptr(rbp + QP_CQE_LEN))?;
    a.mov(dword_ptr(rbp + QP_CQ_POP), 1)?;
    a.test(ecx, ecx)?;
    a.jnz(cq_error)?;
    a.cmp(esi, OP_SEND as i32)?;
    a.je(on_send)?;
    a.cmp(esi, OP_RECV as i32)?;
    a.je(on_recv)?;
    xinc(a, xmm5)?; // a completion of a kind never posted
    a.jmp(top)?;

    // An error completion: a receive the device refused (its entry was
    // wiped before the doorbell) is posted again; anything else resets.
    a.set_label(&mut cq_error)?;
    xinc(a, xmm5)?;
    a.mov(eax, dword_ptr(rbp + QP_STATUS))?;
    a.test(eax, (STATUS_QP_ERROR | STATUS_DEVICE_ERROR) as i32)?;
    a.jnz(recover)?;
    a.cmp(esi, OP_RECV as i32)?;
    a.jne(recover)?;
    post_recv(a)?;
    a.jmp(top)?;

    // Our SEND completed: its RNIC has read the buffer. Read it back; a
    // line that is not our stamp any more means the peer may have got
    // zeros: send it again, flagged.
    a.set_label(&mut on_send)?;
    a.and(r9, !F_SEND_BUSY)?;
    {
        let (mut line, mut intact, mut resend) =
            (a.create_label(), a.create_label(), a.create_label());
        buf_va(a, rdi, 0)?;
        xget(a, rax, xmm2)?;
        a.lea(rsi, qword_ptr(rdi + rax))?;
        tx_stamp(a, my_tag)?;
        a.set_label(&mut line)?;
        a.cmp(rdi, rsi)?;
        a.jae(intact)?;
        a.cmp(qword_ptr(rdi), rcx)?;
        a.jne(resend)?;
        a.inc(rcx)?;
        a.add(rdi, LINE as i32)?;
        a.jmp(line)?;
        a.set_label(&mut intact)?;
        a.jmp(top)?;
        a.set_label(&mut resend)?;
        a.or(r9, F_TX_RESEND)?;
        xinc(a, xmm12)?;
        send(a, my_tag)?;
        a.jmp(top)?;
    }

    a.set_label(&mut on_recv)?;
    on_recv_check(a, role, peer_tag)?;
    a.jmp(top)?;

    a.set_label(&mut recover)?;
    xinc(a, xmm6)?;
    xget(a, rax, xmm6)?;
    a.cmp(rax, MAX_RECOVERIES)?;
    a.jbe(setup)?;
    // The connection is gone: report and fail.
    a.jmp(fail)?;
    // The bank would not enable: no device at the start; after a reset,
    // its RoCE connection is gone (ERR_ROCE_GONE): report and fail.
    a.set_label(&mut not_enabled)?;
    xget(a, rax, xmm6)?;
    a.test(rax, rax)?;
    a.jz(no_device)?;
    a.jmp(fail)?;

    // ---- report ------------------------------------------------------------
    a.set_label(&mut finish)?;
    report(a, role)?;
    xget(a, rcx, xmm7)?;
    a.test(rcx, rcx)?;
    a.jnz(fail)?;
    report_cmd(a, CMD_PASS)?;
    spin_forever(a)?;
    a.set_label(&mut fail)?;
    report(a, role)?;
    report_cmd(a, CMD_FAIL)?;
    spin_forever(a)?;

    a.set_label(&mut no_device)?;
    a.mov(ecx, 0xdead_u32)?;
    report_arg(a, rcx)?;
    report_cmd(a, CMD_FAIL)?;
    spin_forever(a)
}

/// The report's arguments (`Guest::report_fields`). Clobbers rax, rcx,
/// rdx, r8.
fn report(a: &mut Asm, role: Role) -> R {
    use crate::devices::testdev::CMD_CLEAR;
    report_cmd(a, CMD_CLEAR)?;
    // Messages done: pong took r13; ping took r13 + 1 if the last is done.
    a.mov(rcx, r13)?;
    if role == Role::Ping {
        let mut open = a.create_label();
        a.test(r9, F_DONE)?;
        a.jz(open)?;
        a.inc(rcx)?;
        a.set_label(&mut open)?;
    }
    report_arg(a, rcx)?;
    xget(a, rcx, xmm2)?;
    report_arg(a, rcx)?;
    tsc(a)?;
    xget(a, rcx, xmm0)?;
    a.sub(rax, rcx)?;
    a.mov(r8, rax)?;
    report_arg(a, r8)?;
    a.shr(r8, 32)?;
    report_arg(a, r8)?;
    for x in [xmm5, xmm6, xmm7, xmm10, xmm11, xmm12, xmm13, xmm15] {
        xget(a, rcx, x)?;
        report_arg(a, rcx)?;
    }
    Ok(())
}

/// xmm14 = EPOCH_STARTED now (the wait for a message begins).
fn epoch_now(a: &mut Asm) -> R {
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(eax, dword_ptr(rdx + EPOCH_STARTED))?;
    xset(a, xmm14, rax)
}

/// `dst` = VA of this vCPU's buffer at `off` (0: send, RX_OFF: receive).
fn buf_va(a: &mut Asm, dst: AsmRegister64, off: u64) -> R {
    xget(a, dst, xmm1)?;
    a.mov(rax, PAYLOAD_RAM_VA + off)?;
    a.add(dst, rax)
}

/// `dst` = guest-physical address of the buffer at `off`.
fn buf_gpa(a: &mut Asm, dst: AsmRegister64, off: u64) -> R {
    xget(a, dst, xmm1)?;
    a.add(dst, qword_ptr(r15 + params::RAM_GPA))?;
    if off != 0 {
        a.add(dst, off as i32)?;
    }
    Ok(())
}

/// rcx = line 0's stamp of the send buffer: seq r11, our tag (+ resend).
fn tx_stamp(a: &mut Asm, tag: u64) -> R {
    let mut plain = a.create_label();
    a.lea(rcx, qword_ptr(r11 + 1))?;
    a.shl(rcx, 32)?;
    a.mov(eax, (tag << 24) as u32)?;
    a.test(r9, F_TX_RESEND)?;
    a.jz(plain)?;
    a.bts(eax, (TAG_RESEND << 24).trailing_zeros())?;
    a.set_label(&mut plain)?;
    a.or(rcx, rax)?;
    Ok(())
}

/// Stamp the send buffer (seq r11) and post a signaled SEND of it.
fn send(a: &mut Asm, tag: u64) -> R {
    let mut line = a.create_label();
    let mut stamped = a.create_label();
    buf_va(a, rdi, 0)?;
    xget(a, rax, xmm2)?;
    a.lea(rsi, qword_ptr(rdi + rax))?;
    tx_stamp(a, tag)?;
    a.set_label(&mut line)?;
    a.cmp(rdi, rsi)?;
    a.jae(stamped)?;
    a.mov(qword_ptr(rdi), rcx)?;
    a.inc(rcx)?;
    a.add(rdi, LINE as i32)?;
    a.jmp(line)?;
    a.set_label(&mut stamped)?;
    // The entry, opcode first (see the module header).
    a.mov(rdx, r10)?;
    a.and(rdx, (RING - 1) as i32)?;
    a.shl(rdx, WQE_SIZE.trailing_zeros())?;
    a.add(rdx, rbx)?;
    a.mov(dword_ptr(rdx + WQE_OPCODE), OP_SEND)?;
    a.mov(dword_ptr(rdx + WQE_FLAGS), WQE_SIGNALED)?;
    buf_gpa(a, rax, 0)?;
    a.mov(qword_ptr(rdx + WQE_ADDR), rax)?;
    xget(a, rax, xmm2)?;
    a.mov(dword_ptr(rdx + WQE_LENGTH), eax)?;
    xget(a, rax, xmm3)?;
    a.mov(dword_ptr(rdx + WQE_LKEY), eax)?;
    a.mov(qword_ptr(rdx + WQE_WR_ID), r11)?;
    a.inc(r10)?;
    a.mov(dword_ptr(rbp + QP_SQ_PI), r10d)?;
    a.or(r9, F_SEND_BUSY)?;
    Ok(())
}

/// Post the receive buffer, key first (see the module header).
fn post_recv(a: &mut Asm) -> R {
    xget(a, rdx, xmm8)?;
    a.and(rdx, (RING - 1) as i32)?;
    a.shl(rdx, RQE_SIZE.trailing_zeros())?;
    a.lea(rdx, qword_ptr(rbx + rdx + RQ_OFFSET))?;
    xget(a, rax, xmm3)?;
    a.mov(dword_ptr(rdx + RQE_LKEY), eax)?;
    xget(a, rax, xmm2)?;
    a.mov(dword_ptr(rdx + RQE_LENGTH), eax)?;
    buf_gpa(a, rax, RX_OFF)?;
    a.mov(qword_ptr(rdx + RQE_ADDR), rax)?;
    a.mov(qword_ptr(rdx + RQE_WR_ID), r13)?;
    xinc(a, xmm8)?;
    xget(a, rax, xmm8)?;
    a.mov(dword_ptr(rbp + QP_RQ_PI), eax)?;
    Ok(())
}

/// A message landed (edi = its byte count): classify it (module header),
/// take it or keep waiting, post the receive again.
fn on_recv_check(a: &mut Asm, role: Role, peer_tag: u64) -> R {
    let (mut scan, mut next, mut zero, mut prev) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let (mut scanned, mut bad, mut good_line, mut no_good) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let (mut zeros, mut wiped, mut checked, mut redundant) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let (mut accept, mut repost, mut bad_line) =
        (a.create_label(), a.create_label(), a.create_label());
    xget(a, rax, xmm2)?;
    a.cmp(rdi, rax)?;
    a.jne(bad)?;
    // rax = the seq expected: r13, or (ping, reply already taken) r13 + 1.
    a.mov(rax, r13)?;
    if role == Role::Ping {
        let mut open = a.create_label();
        a.test(r9, F_DONE)?;
        a.jz(open)?;
        a.inc(rax)?;
        a.set_label(&mut open)?;
    }
    // rcx = stamp(seq, peer tag), r8 = stamp(seq - 1, peer tag | resend).
    a.mov(r8, rax)?;
    a.shl(r8, 32)?;
    a.mov(ecx, ((peer_tag | TAG_RESEND) << 24) as u32)?;
    a.or(r8, rcx)?;
    a.lea(rcx, qword_ptr(rax + 1))?;
    a.shl(rcx, 32)?;
    a.mov(edx, (peer_tag << 24) as u32)?;
    a.or(rcx, rdx)?;
    buf_va(a, rdi, RX_OFF)?;
    xget(a, rax, xmm2)?;
    a.lea(rsi, qword_ptr(rdi + rax))?;
    // dl: 1 a line of the expected message, 2 a zero line, 4 a line of the
    // previous one resent, 8 anything else.
    a.xor(edx, edx)?;
    a.set_label(&mut scan)?;
    a.cmp(rdi, rsi)?;
    a.jae(scanned)?;
    a.mov(rax, qword_ptr(rdi))?;
    a.test(rax, rax)?;
    a.jz(zero)?;
    a.cmp(rax, r8)?;
    a.je(prev)?;
    a.btr(rax, 31)?; // resent or not, the same message
    a.cmp(rax, rcx)?;
    a.je(good_line)?;
    a.jmp(bad_line)?;
    a.set_label(&mut zero)?;
    a.or(dl, 2)?;
    a.jmp(next)?;
    a.set_label(&mut prev)?;
    a.or(dl, 4)?;
    a.jmp(next)?;
    a.set_label(&mut good_line)?;
    a.or(dl, 1)?;
    a.jmp(next)?;
    a.set_label(&mut bad_line)?;
    a.or(dl, 8)?;
    a.set_label(&mut next)?;
    a.inc(rcx)?;
    a.inc(r8)?;
    a.add(rdi, LINE as i32)?;
    a.jmp(scan)?;

    a.set_label(&mut scanned)?;
    a.test(dl, 8)?;
    a.jnz(bad)?;
    a.test(dl, 1)?;
    a.jz(no_good)?;
    a.test(dl, 4)?;
    a.jnz(bad)?; // two messages mixed
    a.test(dl, 2)?;
    a.jz(checked)?;
    a.jmp(zeros)?;
    a.set_label(&mut no_good)?;
    a.test(dl, 4)?;
    a.jnz(redundant)?;
    // All zero (or empty): as zeros.
    a.set_label(&mut zeros)?;
    // Excused if a RAM-freshening action started here since the wait
    // began; otherwise the sender's read-back will resend it.
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(eax, dword_ptr(rdx + EPOCH_STARTED))?;
    xget(a, rcx, xmm14)?;
    a.cmp(eax, ecx)?;
    a.jne(wiped)?;
    a.or(r9, F_CANDIDATE)?;
    a.jmp(repost)?;
    a.set_label(&mut checked)?;
    a.test(r9, F_CANDIDATE)?;
    a.jnz(wiped)?;
    xinc(a, xmm10)?;
    a.jmp(accept)?;
    a.set_label(&mut wiped)?;
    xinc(a, xmm11)?;
    a.jmp(accept)?;
    a.set_label(&mut bad)?;
    xinc(a, xmm7)?;
    a.jmp(accept)?;
    a.set_label(&mut redundant)?;
    xinc(a, xmm13)?;
    if role == Role::Pong {
        // The requester lost our reply: owe it again, flagged.
        a.test(r13, r13)?;
        a.jz(repost)?;
        a.or(r9, F_DONE | F_OWED_RESEND)?;
    }
    a.jmp(repost)?;

    a.set_label(&mut accept)?;
    a.and(r9, !F_CANDIDATE)?;
    match role {
        Role::Ping => {
            let mut again = a.create_label();
            // A second copy of a reply already taken changes nothing.
            a.test(r9, F_DONE)?;
            a.jnz(again)?;
            a.or(r9, F_DONE)?;
            sample(a)?;
            a.set_label(&mut again)?;
        }
        Role::Pong => {
            a.inc(r13)?;
            a.or(r9, F_DONE)?;
        }
    }
    epoch_now(a)?;
    a.set_label(&mut repost)?;
    // r8 (the clock of the last completion) served the scan.
    tsc(a)?;
    a.mov(r8, rax)?;
    post_recv(a)
}
