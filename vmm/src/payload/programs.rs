//! The payload programs. Each vCPU starts in ring 3 (no I/O privilege: it reports through MMIO) with `rdi` = its index,
//! `rsi` = the vCPU count, `rdx` = the parameter block, `rsp` = its stack.
//! Every program splits `work_pages` of RAM evenly between the vCPUs and
//! ends with a PASS or FAIL command to the test device.

use super::params;
use crate::devices::testdev::{ARG, CMD, CMD_BARRIER, CMD_FAIL, CMD_IDLE, CMD_PASS};
use crate::layout::TESTDEV_MMIO_GPA;
use iced_x86::code_asm::*;
use std::fmt;

/// The built-in guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Guest {
    /// Write a pattern to every page of its share, read it back, report
    /// pages and mismatches.
    Touch,
    /// Spin on the idle command until the VM is stopped.
    Idle,
    /// Write a pattern, wait at a barrier (the host invalidates some pages
    /// meanwhile), then classify every page: pattern kept, zero, or neither.
    Rewrite,
    /// `rounds` passes; each checks every page holds zero or its previous
    /// stamp, writes a new stamp and reads it back (zero allowed: a
    /// teardown may land in between). Any other value is a stale page.
    Churn,
    /// RDMA WRITE bandwidth to the host peer (stamped pages, checked by
    /// the device).
    RdmaWriteBw,
    /// RDMA READ bandwidth from the host peer (the guest checks stamps).
    RdmaReadBw,
    /// RDMA WRITE latency, one message at a time.
    RdmaWriteLat,
    /// SEND latency: the host peer echoes every message back.
    SendLat,
    /// Stamped SEND/RECV to another guest running `recv-pong` (over
    /// RoCE): sends `iters` messages one at a time, checks every reply's
    /// stamps (`payload::pingpong`).
    SendPing,
    /// Answers `send-ping`: checks each message's stamps and replies with
    /// its own, until the host asks it to stop.
    RecvPong,
    /// Garbage to the RNIC's registers and rings, then a short
    /// `rdma-write-bw` proving the device still works.
    RnicGarbage,
    /// Touch `work_pages` distinct pages (split between vCPUs) in a
    /// scattered order (page i*7919 mod share): no two faults in a row are
    /// neighbours. Reports pages and mismatches.
    Sparse,
    /// Stamped writes over its share, round after round (`rounds`, or
    /// until the host asks it to stop when 0): each page must hold zero or
    /// its previous round's stamp (else stale); a zero with no RAM-freshening
    /// host action started since the previous round began is a lost write.
    /// Every 512 pages it posts a progress mark carrying the longest gap
    /// between two page steps (the guest-visible stall), and a span mark
    /// (no work counted) whenever ~0.25 ms passed since its last mark.
    Writer,
}

impl Guest {
    pub const ALL: [Guest; 13] = [
        Guest::Touch,
        Guest::Idle,
        Guest::Rewrite,
        Guest::Churn,
        Guest::RdmaWriteBw,
        Guest::RdmaReadBw,
        Guest::RdmaWriteLat,
        Guest::SendLat,
        Guest::SendPing,
        Guest::RecvPong,
        Guest::RnicGarbage,
        Guest::Sparse,
        Guest::Writer,
    ];

    /// Whether it drives the RNIC.
    pub fn is_rdma(self) -> bool {
        self.rdma_kind().is_some() || matches!(self, Guest::SendPing | Guest::RecvPong)
    }

    fn rdma_kind(self) -> Option<super::rdma::Kind> {
        use super::rdma::Kind;
        match self {
            Guest::RdmaWriteBw => Some(Kind::WriteBw),
            Guest::RdmaReadBw => Some(Kind::ReadBw),
            Guest::RdmaWriteLat => Some(Kind::WriteLat),
            Guest::SendLat => Some(Kind::SendLat),
            Guest::RnicGarbage => Some(Kind::Garbage),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Guest::Touch => "touch",
            Guest::Idle => "idle",
            Guest::Rewrite => "rewrite",
            Guest::Churn => "churn",
            Guest::RdmaWriteBw => "rdma-write-bw",
            Guest::RdmaReadBw => "rdma-read-bw",
            Guest::RdmaWriteLat => "rdma-write-lat",
            Guest::SendLat => "send-lat",
            Guest::SendPing => "send-ping",
            Guest::RecvPong => "recv-pong",
            Guest::RnicGarbage => "rnic-garbage",
            Guest::Sparse => "sparse",
            Guest::Writer => "writer",
        }
    }

    /// Argument names of its PASS/FAIL report, in order.
    pub fn report_fields(self) -> &'static [&'static str] {
        match self {
            Guest::Touch | Guest::Sparse => &["pages", "bad", "first_bad"],
            Guest::Idle => &[],
            Guest::Rewrite => &["pages", "kept", "zeroed", "bad"],
            Guest::Churn => &["pages", "stale", "zero_reads"],
            Guest::Writer => &["pages", "stale", "lost"],
            Guest::SendPing | Guest::RecvPong => &[
                "msgs",
                "msg_bytes",
                "cycles_lo",
                "cycles_hi",
                "errors",
                "recoveries",
                "stale",
                "checked",
                "wiped",
                "resends",
                "redundant",
                "timeouts",
            ],
            _ => &[
                "msgs",
                "msg_bytes",
                "cycles_lo",
                "cycles_hi",
                "errors",
                "recoveries",
                "stale",
            ],
        }
    }
}

impl fmt::Display for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Guest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Guest::ALL
            .iter()
            .copied()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Guest::ALL.iter().map(|g| g.name()).collect();
                format!("unknown guest {s:?} (built-in: {})", names.join(", "))
            })
    }
}

/// Golden-ratio multiplier for page patterns.
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

pub(super) type Asm = CodeAssembler;
pub(super) type R = Result<(), IcedError>;

/// r15 = params, r14 = vCPU index, r13 = vCPU count, rbx = RAM base VA,
/// r10 = seed, r9 = MIX.
fn common_registers(a: &mut Asm) -> R {
    a.mov(r15, rdx)?;
    a.mov(r14, rdi)?;
    a.mov(r13, rsi)?;
    a.mov(rbx, qword_ptr(r15 + params::RAM_VA))?;
    a.mov(r10, qword_ptr(r15 + params::SEED))?;
    a.mov(r9, MIX)?;
    Ok(())
}

/// `common_registers`, and r12..r11 = this vCPU's page range.
pub(super) fn prologue(a: &mut Asm) -> R {
    common_registers(a)?;
    // start = work_pages * index / vcpus
    a.mov(rax, qword_ptr(r15 + params::WORK_PAGES))?;
    a.mul(r14)?;
    a.div(r13)?;
    a.mov(r12, rax)?;
    // end = work_pages * (index + 1) / vcpus
    a.mov(rax, qword_ptr(r15 + params::WORK_PAGES))?;
    a.lea(rcx, qword_ptr(r14 + 1))?;
    a.mul(rcx)?;
    a.div(r13)?;
    a.mov(r11, rax)?;
    Ok(())
}

/// rax = pattern(rcx), rdi = address of page rcx.
fn pattern_and_addr(a: &mut Asm) -> R {
    a.mov(rax, rcx)?;
    a.imul_2(rax, r9)?;
    a.xor(rax, r10)?;
    a.mov(rdi, rcx)?;
    a.shl(rdi, 12)?;
    a.add(rdi, rbx)?;
    Ok(())
}

pub(super) fn push_arg(a: &mut Asm, reg: AsmRegister64) -> R {
    a.mov(rax, reg)?;
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(dword_ptr(rdx + ARG), eax)?;
    Ok(())
}

fn command(a: &mut Asm, cmd: u32) -> R {
    a.mov(eax, cmd)?;
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(dword_ptr(rdx + CMD), eax)?;
    Ok(())
}

/// PASS if `reg` is zero, else FAIL; then never return.
pub(super) fn finish(a: &mut Asm, reg: AsmRegister64) -> R {
    let mut fail = a.create_label();
    let mut spin = a.create_label();
    a.test(reg, reg)?;
    a.jnz(fail)?;
    command(a, CMD_PASS)?;
    a.jmp(spin)?;
    a.set_label(&mut fail)?;
    command(a, CMD_FAIL)?;
    // The VMM never resumes a finished vCPU; spin just in case.
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(spin)?;
    Ok(())
}

/// Write pattern(p) to the first and last qword of every page in r12..r11.
fn write_pass(a: &mut Asm) -> R {
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.mov(rcx, r12)?;
    a.set_label(&mut top)?;
    a.cmp(rcx, r11)?;
    a.jae(done)?;
    pattern_and_addr(a)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(qword_ptr(rdi + 4088), rax)?;
    a.inc(rcx)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    Ok(())
}

fn touch(a: &mut Asm) -> R {
    prologue(a)?;
    write_pass(a)?;
    // Verify: r8 = bad pages, rsi = first bad page (or all ones).
    let (mut top, mut done, mut bad, mut next) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    a.xor(r8, r8)?;
    a.mov(rsi, -1i64)?;
    a.mov(rcx, r12)?;
    a.set_label(&mut top)?;
    a.cmp(rcx, r11)?;
    a.jae(done)?;
    pattern_and_addr(a)?;
    a.cmp(qword_ptr(rdi), rax)?;
    a.jne(bad)?;
    a.cmp(qword_ptr(rdi + 4088), rax)?;
    a.jne(bad)?;
    a.set_label(&mut next)?;
    a.inc(rcx)?;
    a.jmp(top)?;
    a.set_label(&mut bad)?;
    a.inc(r8)?;
    a.cmp(rsi, -1)?;
    a.jne(next)?;
    a.mov(rsi, rcx)?;
    a.jmp(next)?;
    a.set_label(&mut done)?;
    a.mov(rcx, r11)?;
    a.sub(rcx, r12)?;
    push_arg(a, rcx)?;
    push_arg(a, r8)?;
    push_arg(a, rsi)?;
    finish(a, r8)
}

fn idle(a: &mut Asm) -> R {
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    command(a, CMD_IDLE)?;
    a.jmp(top)?;
    Ok(())
}

fn rewrite(a: &mut Asm) -> R {
    prologue(a)?;
    write_pass(a)?;
    a.mov(rcx, 1u64)?;
    push_arg(a, rcx)?;
    command(a, CMD_BARRIER)?;
    // r8 = kept, rsi = zeroed, rbp = bad
    let (mut top, mut done, mut not_kept, mut next) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let mut bad = a.create_label();
    a.xor(r8, r8)?;
    a.xor(rsi, rsi)?;
    a.xor(rbp, rbp)?;
    a.mov(rcx, r12)?;
    a.set_label(&mut top)?;
    a.cmp(rcx, r11)?;
    a.jae(done)?;
    pattern_and_addr(a)?;
    a.cmp(qword_ptr(rdi), rax)?;
    a.jne(not_kept)?;
    a.cmp(qword_ptr(rdi + 4088), rax)?;
    a.jne(bad)?;
    a.inc(r8)?;
    a.jmp(next)?;
    a.set_label(&mut not_kept)?;
    a.cmp(qword_ptr(rdi), 0)?;
    a.jne(bad)?;
    a.cmp(qword_ptr(rdi + 4088), 0)?;
    a.jne(bad)?;
    a.inc(rsi)?;
    a.jmp(next)?;
    a.set_label(&mut bad)?;
    a.inc(rbp)?;
    a.set_label(&mut next)?;
    a.inc(rcx)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.mov(rcx, r11)?;
    a.sub(rcx, r12)?;
    push_arg(a, rcx)?;
    push_arg(a, r8)?;
    push_arg(a, rsi)?;
    push_arg(a, rbp)?;
    finish(a, rbp)
}

/// stamp(round, page) = 1 << 63 | round << 32 | page, in rax (rcx = page,
/// r8 = round). Never zero.
pub(super) fn stamp(a: &mut Asm, round: AsmRegister64) -> R {
    a.mov(rax, round)?;
    a.shl(rax, 32)?;
    a.or(rax, rcx)?;
    a.bts(rax, 63)?;
    Ok(())
}

fn churn(a: &mut Asm) -> R {
    prologue(a)?;
    // r8 = round (1..=rounds), rsi = stale, rbp = zero reads, rdx spare
    let (mut round_top, mut round_done, mut top, mut page_done) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let (mut prev_ok, mut after_ok, mut stale1, mut stale2) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let mut after_zero = a.create_label();
    a.xor(rsi, rsi)?;
    a.xor(rbp, rbp)?;
    a.mov(r8, 1u64)?;
    a.set_label(&mut round_top)?;
    a.cmp(r8, qword_ptr(r15 + params::ROUNDS))?;
    a.ja(round_done)?;
    a.mov(rcx, r12)?;
    a.set_label(&mut top)?;
    a.cmp(rcx, r11)?;
    a.jae(page_done)?;
    a.mov(rdi, rcx)?;
    a.shl(rdi, 12)?;
    a.add(rdi, rbx)?;
    // The page must hold zero or the previous round's stamp.
    a.mov(rdx, qword_ptr(rdi))?;
    a.test(rdx, rdx)?;
    a.jz(prev_ok)?;
    a.lea(rax, qword_ptr(r8 - 1))?;
    stamp(a, rax)?;
    a.cmp(rdx, rax)?;
    a.jne(stale1)?;
    a.set_label(&mut prev_ok)?;
    stamp(a, r8)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rdx, qword_ptr(rdi))?;
    a.cmp(rdx, rax)?;
    a.je(after_ok)?;
    a.test(rdx, rdx)?;
    a.jnz(stale2)?;
    a.set_label(&mut after_zero)?;
    a.inc(rbp)?;
    a.set_label(&mut after_ok)?;
    a.inc(rcx)?;
    a.jmp(top)?;
    a.set_label(&mut stale1)?;
    a.inc(rsi)?;
    a.jmp(prev_ok)?;
    a.set_label(&mut stale2)?;
    a.inc(rsi)?;
    a.jmp(after_ok)?;
    a.set_label(&mut page_done)?;
    a.inc(r8)?;
    a.jmp(round_top)?;
    a.set_label(&mut round_done)?;
    // pages touched = (end - start) * rounds
    a.mov(rax, r11)?;
    a.sub(rax, r12)?;
    a.imul_2(rax, qword_ptr(r15 + params::ROUNDS))?;
    a.mov(rcx, rax)?;
    push_arg(a, rcx)?;
    push_arg(a, rsi)?;
    push_arg(a, rbp)?;
    finish(a, rsi)
}

/// Scattered distinct pages: vCPU i owns RAM pages [i*S, (i+1)*S) with
/// S = ram_pages / vcpus (a power of two); it touches pages
/// i*S + (j*7919 mod S) for j < work_pages / vcpus.
fn sparse(a: &mut Asm) -> R {
    common_registers(a)?;
    // r12 = S (share), r11 = touches per vCPU
    a.mov(rax, qword_ptr(r15 + params::RAM_PAGES))?;
    a.xor(edx, edx)?;
    a.div(r13)?;
    a.mov(r12, rax)?;
    a.mov(rax, qword_ptr(r15 + params::WORK_PAGES))?;
    a.xor(edx, edx)?;
    a.div(r13)?;
    a.mov(r11, rax)?;
    // rbp = first page of the share
    a.mov(rbp, r12)?;
    a.imul_2(rbp, r14)?;
    let (mut top, mut done, mut ok) = (a.create_label(), a.create_label(), a.create_label());
    a.xor(r8, r8)?; // bad
    a.xor(rsi, rsi)?; // j
    a.set_label(&mut top)?;
    a.cmp(rsi, r11)?;
    a.jae(done)?;
    // rcx = page = rbp + (j * 7919 & (S - 1))
    a.imul_3(rcx, rsi, 7919)?;
    a.lea(rax, qword_ptr(r12 - 1))?;
    a.and(rcx, rax)?;
    a.add(rcx, rbp)?;
    pattern_and_addr(a)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.cmp(qword_ptr(rdi), rax)?;
    a.je(ok)?;
    a.inc(r8)?;
    a.set_label(&mut ok)?;
    a.inc(rsi)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.mov(rsi, -1i64)?;
    push_arg(a, r11)?;
    push_arg(a, r8)?;
    push_arg(a, rsi)?;
    finish(a, r8)
}

/// reg = rdtsc (64-bit); clobbers rax, rdx.
pub(super) fn tsc(a: &mut Asm, reg: AsmRegister64) -> R {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(reg, rax)?;
    Ok(())
}

/// eax = the test device's 32-bit register at `offset`.
pub(super) fn read_reg(a: &mut Asm, offset: u64) -> R {
    a.mov(rdx, TESTDEV_MMIO_GPA)?;
    a.mov(eax, dword_ptr(rdx + offset))?;
    Ok(())
}

/// Machine code for `guest`, to be loaded at `ip`.
pub fn assemble(guest: Guest, ip: u64) -> Result<Vec<u8>, String> {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        match guest {
            Guest::Touch => touch(&mut a)?,
            Guest::Idle => idle(&mut a)?,
            Guest::Rewrite => rewrite(&mut a)?,
            Guest::Churn => churn(&mut a)?,
            Guest::Sparse => sparse(&mut a)?,
            Guest::Writer => super::writer::assemble(&mut a)?,
            Guest::SendPing => super::pingpong::assemble(super::pingpong::Role::Ping, &mut a)?,
            Guest::RecvPong => super::pingpong::assemble(super::pingpong::Role::Pong, &mut a)?,
            g => super::rdma::assemble(g.rdma_kind().expect("RDMA guest"), &mut a)?,
        }
        a.assemble(ip)
    };
    build().map_err(|e| format!("assembling {guest}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_assembles() {
        for g in Guest::ALL {
            let code = assemble(g, 0x10_0000).unwrap();
            assert!(!code.is_empty(), "{g}");
            assert_eq!(g.name().parse::<Guest>().unwrap(), g);
        }
        assert!("nope".parse::<Guest>().unwrap_err().contains("touch"));
    }
}
