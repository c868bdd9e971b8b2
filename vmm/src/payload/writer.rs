//! The `writer` built-in guest: stamped writes over its share of RAM,
//! round after round, checking every page for stale data and lost writes,
//! and posting progress marks with its longest page step (what the
//! teardown bench reads as the guest's stall). Split from `programs` as
//! the one guest whose marks carry measurements.

use super::params;
use super::programs::{finish, prologue, push_arg, read_reg, stamp, tsc, Asm, R};
use crate::devices::testdev::{EPOCH_DONE, EPOCH_STARTED, PROGRESS, PROGRESS_SPAN, STOP};
use crate::layout::TESTDEV_MMIO_GPA;
use iced_x86::code_asm::*;

/// The `writer` posts a span mark once a millisecond's TSC ticks shifted
/// right by this (a quarter of a millisecond) passed since its last mark:
/// the longest step of a span is then bracketed by marks at most this
/// much apart plus the step itself, whatever the TSC's rate.
const SPAN_SHIFT: u32 = 2;

/// Post a progress mark to register `offset`: the longest gap since the
/// last mark (r13) in 1024-cycle units, saturated; then restart the gap
/// and the span clock (r15). The step clock (r10) runs on: the
/// mark's exit counts in the next step, so a vCPU held in it (paused by
/// the VMM, or KVM fetching the instruction from a page being
/// invalidated) shows as a stall like any other. Clobbers rax, rdx.
fn post_mark(a: &mut Asm, offset: u64) -> R {
    let mut small = a.create_label();
    a.mov(rax, r13)?;
    a.shr(rax, 10)?;
    a.mov(rdx, 0xffff_ffffu64)?;
    a.cmp(rax, rdx)?;
    a.jbe(small)?;
    a.mov(rax, rdx)?;
    a.set_label(&mut small)?;
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(dword_ptr(rdx + offset), eax)?;
    a.xor(r13, r13)?;
    tsc(a, r15)?;
    Ok(())
}

/// Registers (no state it needs lives in memory: a teardown refills the
/// boot region, stack included, from the image): r8 round, rcx page, rsi
/// stale, r9 lost, rbp zeros read this round, r10 previous TSC, r13
/// longest gap since the last mark, r14 = EPOCH_DONE at the start of the
/// previous round << 32 | at the start of this one, r15 the last mark's
/// TSC (paces span marks; the parameter block is read at its fixed
/// address instead). It touches no stack: a teardown would make that a
/// fault inside the steps it measures.
pub(super) fn assemble(a: &mut Asm) -> R {
    prologue(a)?;
    let (mut round_top, mut check_stop, mut go, mut done) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let (mut page_top, mut page_done, mut no_max, mut was_zero) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let (mut write, mut no_mark, mut no_span, mut next_round) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    a.xor(rsi, rsi)?;
    a.xor(r9, r9)?;
    a.xor(r13, r13)?;
    a.xor(r14, r14)?;
    a.mov(r8, 1u64)?;
    tsc(a, r10)?;
    a.mov(r15, r10)?;

    a.set_label(&mut round_top)?;
    // r15 is the span clock from here on: the parameter block is read at
    // its fixed address (where the boot put rdx).
    a.mov(rax, crate::layout::PARAMS_GPA + params::ROUNDS)?;
    a.mov(rax, qword_ptr(rax))?;
    a.test(rax, rax)?;
    a.jz(check_stop)?;
    a.cmp(r8, rax)?;
    a.ja(done)?;
    a.jmp(go)?;
    a.set_label(&mut check_stop)?;
    read_reg(a, STOP)?;
    a.test(eax, eax)?;
    a.jnz(done)?;
    a.set_label(&mut go)?;
    read_reg(a, EPOCH_DONE)?;
    a.shl(r14, 32)?;
    a.or(r14, rax)?;
    a.xor(rbp, rbp)?;
    a.mov(rcx, r12)?;

    a.set_label(&mut page_top)?;
    a.cmp(rcx, r11)?;
    a.jae(page_done)?;
    // The step's length: the longest one since the last mark is kept.
    tsc(a, rdi)?;
    a.mov(rdx, rdi)?;
    a.sub(rdx, r10)?;
    a.mov(r10, rdi)?;
    a.cmp(rdx, r13)?;
    a.jbe(no_max)?;
    a.mov(r13, rdx)?;
    a.set_label(&mut no_max)?;
    // A span mark once ~0.25 ms have passed since the last mark, so the
    // host's scheduler account brackets every long step closely (rdi =
    // now, r15 = the last mark's TSC). Not on the page that ends with a
    // PROGRESS mark: one mark per page, so the step a mark reports holds
    // at most one mark's exit.
    a.mov(rax, rcx)?;
    a.and(eax, 511)?;
    a.cmp(eax, 511)?;
    a.je(no_span)?;
    a.mov(rax, rdi)?;
    a.sub(rax, r15)?;
    a.mov(rdx, crate::layout::PARAMS_GPA + params::TICKS_PER_MS)?;
    a.mov(rdx, qword_ptr(rdx))?;
    a.shr(rdx, SPAN_SHIFT)?;
    a.cmp(rax, rdx)?;
    a.jb(no_span)?;
    post_mark(a, PROGRESS_SPAN)?;
    a.set_label(&mut no_span)?;
    a.mov(rdi, rcx)?;
    a.shl(rdi, 12)?;
    a.add(rdi, rbx)?;
    // Swap the new stamp in (one write fault on fresh memory, not a read
    // fault then a copy-on-write one); the old value must be zero or the
    // previous round's stamp, anything else is stale.
    stamp(a, r8)?;
    a.xchg(qword_ptr(rdi), rax)?;
    a.mov(rdx, rax)?;
    a.test(rdx, rdx)?;
    a.jz(was_zero)?;
    a.lea(rax, qword_ptr(r8 - 1))?;
    stamp(a, rax)?;
    a.cmp(rdx, rax)?;
    a.je(write)?;
    a.inc(rsi)?;
    a.jmp(write)?;
    a.set_label(&mut was_zero)?;
    a.inc(rbp)?;
    a.set_label(&mut write)?;
    a.inc(rcx)?;
    a.test(rcx, 511)?;
    a.jnz(no_mark)?;
    post_mark(a, PROGRESS)?;
    a.set_label(&mut no_mark)?;
    a.jmp(page_top)?;

    a.set_label(&mut page_done)?;
    // Zeros read this round replaced the previous round's stamps; unless a
    // host action started after the previous round began, they were lost.
    a.cmp(r8, 1)?;
    a.jbe(next_round)?;
    read_reg(a, EPOCH_STARTED)?;
    a.mov(rdx, r14)?;
    a.shr(rdx, 32)?;
    a.cmp(rax, rdx)?;
    a.jne(next_round)?;
    a.add(r9, rbp)?;
    a.set_label(&mut next_round)?;
    a.inc(r8)?;
    a.jmp(round_top)?;

    a.set_label(&mut done)?;
    // pages written = (rounds done) * share
    a.lea(rax, qword_ptr(r8 - 1))?;
    a.mov(rcx, r11)?;
    a.sub(rcx, r12)?;
    a.imul_2(rcx, rax)?;
    push_arg(a, rcx)?;
    push_arg(a, rsi)?;
    push_arg(a, r9)?;
    a.add(rsi, r9)?;
    finish(a, rsi)
}
