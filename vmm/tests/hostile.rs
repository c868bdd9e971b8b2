//! Hostile guests against the paravirtual RNIC (issue 11, "guest → host").
//!
//! Each guest is a tiny crafted bzImage: a few dozen instructions at the
//! 64-bit entry point that map the MMIO hole and drive the RNIC only
//! through its documented registers (`vmm::devices::rnic`), reporting what
//! the device answered through the test device. What the host must keep
//! bounded (memory, CPU) is checked from the outside while they run.

mod common;

use common::{rss_kib, thread_cpu};
use iced_x86::code_asm::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::devices::rnic::*;
use vmm::devices::serial::Sink;
use vmm::devices::testdev::{ARG, CMD, CMD_IDLE, CMD_PASS};
use vmm::layout::{PAYLOAD_RAM_GPA, RNIC_MMIO_GPA, TESTDEV_MMIO_GPA};
use vmm::payload::Guest;
use vmm::vm::RnicChoice;
use vmm::{GuestConfig, RunReport, Vm, VmConfig, VmHandle};

const MIB: u64 = 1 << 20;
/// Guest-physical layout of the crafted guests (RAM starts at 0).
const ENTRY: u64 = 0x10_0200;
const SQ: u64 = 0x100_0000;
const RQ: u64 = 0x102_0000;
const BUF: u64 = 0x200_0000;
/// Status a wait reports when no completion came (10 s of idling).
const NO_CQE: u32 = 0xffff;
const LOC_PROT_ERR: u32 = 4;
const REM_ACCESS_ERR: u32 = 10;

type A = CodeAssembler;
type R = Result<(), IcedError>;

/// A value a WQE field gets: a constant, or read from a global register.
#[derive(Clone, Copy)]
enum V {
    Imm(u64),
    Lkey,
    PeerRkey,
    /// PEER_ADDR plus a signed offset.
    Peer(i64),
    /// PEER_ADDR + PEER_LEN.
    PeerEnd,
}

/// rax = `v` (rbx: RNIC registers).
fn load(a: &mut A, v: V) -> R {
    match v {
        V::Imm(x) => a.mov(rax, x)?,
        V::Lkey => a.mov(eax, dword_ptr(rbx + REG_LKEY))?,
        V::PeerRkey => a.mov(eax, dword_ptr(rbx + REG_PEER_RKEY))?,
        V::Peer(off) => {
            a.mov(rax, qword_ptr(rbx + REG_PEER_ADDR))?;
            a.mov(rcx, off as u64)?;
            a.add(rax, rcx)?;
        }
        V::PeerEnd => {
            a.mov(rax, qword_ptr(rbx + REG_PEER_ADDR))?;
            a.add(rax, qword_ptr(rbx + REG_PEER_LEN))?;
        }
    }
    Ok(())
}

/// Map the MMIO hole's first 2 MiB (test device and RNIC), set rbx = RNIC,
/// rbp = queue pair 0's bank, r12 = test device.
fn prologue(a: &mut A) -> R {
    // The loader's tables map the first GiB; PDPT[3] → a PD at 0xc000 whose
    // entry 128 is the 2 MiB page at 0xd000_0000.
    a.mov(rdi, 0xa018u64)?;
    a.mov(rax, 0xc003u64)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rdi, 0xc000u64 + 128 * 8)?;
    a.mov(rax, 0xd000_0000u64 | 0x83)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)?;
    a.mov(rbx, RNIC_MMIO_GPA)?;
    a.lea(rbp, qword_ptr(rbx + QP_BANK))?;
    a.mov(r12, TESTDEV_MMIO_GPA)?;
    Ok(())
}

/// Reset queue pair 0 and enable it with rings of `size` entries.
fn setup_qp(a: &mut A, size: u32) -> R {
    a.mov(dword_ptr(rbp + QP_CTRL), CTRL_RESET)?;
    a.mov(rax, SQ)?;
    a.mov(qword_ptr(rbp + QP_SQ_BASE), rax)?;
    a.mov(dword_ptr(rbp + QP_SQ_SIZE), size)?;
    a.mov(rax, RQ)?;
    a.mov(qword_ptr(rbp + QP_RQ_BASE), rax)?;
    a.mov(dword_ptr(rbp + QP_RQ_SIZE), size)?;
    a.mov(dword_ptr(rbp + QP_CTRL), CTRL_ENABLE)?;
    Ok(())
}

struct Wqe {
    op: u32,
    signaled: bool,
    addr: V,
    len: u32,
    lkey: V,
    raddr: V,
    rkey: V,
}

/// Write `w` into the send ring entry rdi points at (wr_id = rcx).
fn put_wqe(a: &mut A, w: &Wqe) -> R {
    a.mov(qword_ptr(rdi), rcx)?;
    a.mov(dword_ptr(rdi + 8), w.op)?;
    a.mov(dword_ptr(rdi + 12), u32::from(w.signaled))?;
    a.mov(dword_ptr(rdi + 24), w.len)?;
    a.push(rcx)?;
    load(a, w.addr)?;
    a.mov(qword_ptr(rdi + 16), rax)?;
    load(a, w.lkey)?;
    a.mov(dword_ptr(rdi + 28), eax)?;
    load(a, w.raddr)?;
    a.mov(qword_ptr(rdi + 32), rax)?;
    load(a, w.rkey)?;
    a.mov(dword_ptr(rdi + 40), eax)?;
    a.pop(rcx)?;
    Ok(())
}

fn idle(a: &mut A) -> R {
    a.mov(dword_ptr(r12 + CMD), CMD_IDLE)
}

/// ecx = the status of the next completion (popped), or `NO_CQE` after
/// about 10 s without one.
fn wait_cqe(a: &mut A) -> R {
    let (mut top, mut got, mut done) = (a.create_label(), a.create_label(), a.create_label());
    a.mov(r13, 1000u64)?;
    a.set_label(&mut top)?;
    a.mov(eax, dword_ptr(rbp + QP_CQ_COUNT))?;
    a.test(eax, eax)?;
    a.jnz(got)?;
    idle(a)?;
    a.dec(r13)?;
    a.jnz(top)?;
    a.mov(ecx, NO_CQE)?;
    a.jmp(done)?;
    a.set_label(&mut got)?;
    a.mov(ecx, dword_ptr(rbp + QP_CQE_STATUS))?;
    a.mov(dword_ptr(rbp + QP_CQ_POP), 1u32)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// One WQE on a freshly enabled queue pair; its completion status is
/// pushed on the stack.
fn one_wqe(a: &mut A, w: &Wqe) -> R {
    setup_qp(a, 64)?;
    a.mov(rdi, SQ)?;
    a.mov(rcx, 7u64)?;
    put_wqe(a, w)?;
    a.mov(dword_ptr(rbp + QP_SQ_PI), 1u32)?;
    wait_cqe(a)?;
    a.push(rcx)?;
    Ok(())
}

/// Report the `n` values pushed last (oldest first) and finish.
fn report_pushed(a: &mut A, n: usize) -> R {
    for i in (0..n).rev() {
        a.mov(rax, qword_ptr(rsp + (8 * i) as u64))?;
        a.mov(dword_ptr(r12 + ARG), eax)?;
    }
    a.mov(dword_ptr(r12 + CMD), CMD_PASS)?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.jmp(l)
}

/// Fill all `size` entries of the send ring with `w` (wr_id = index).
fn fill_ring(a: &mut A, size: u32, w: &Wqe) -> R {
    let mut top = a.create_label();
    a.mov(rdi, SQ)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut top)?;
    put_wqe(a, w)?;
    a.add(rdi, 64)?;
    a.inc(rcx)?;
    a.cmp(rcx, size as i32)?;
    a.jb(top)?;
    Ok(())
}

/// Ring the send doorbell a whole ring ahead of the consumer until it has
/// taken `target` WQEs (or a bounded number of rounds went by).
fn flood(a: &mut A, size: u32, target: u32) -> R {
    let (mut top, mut done) = (a.create_label(), a.create_label());
    a.mov(r13, 2_000_000u64)?;
    a.set_label(&mut top)?;
    a.mov(eax, dword_ptr(rbp + QP_SQ_CI))?;
    a.cmp(eax, target)?;
    a.jae(done)?;
    a.add(eax, size)?;
    a.mov(dword_ptr(rbp + QP_SQ_PI), eax)?;
    a.dec(r13)?;
    a.jnz(top)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// A bzImage whose 64-bit entry runs `body` (after the prologue).
fn bzimage(name: &str, body: impl FnOnce(&mut A) -> R) -> PathBuf {
    let mut a = CodeAssembler::new(64).unwrap();
    prologue(&mut a).unwrap();
    body(&mut a).unwrap();
    let code = a.assemble(ENTRY).unwrap();
    // Boot protocol 2.12 header; 4 setup sectors; the protected-mode part
    // is loaded at 1 MiB and entered at +0x200 in 64-bit mode.
    let setup = 5 * 512;
    let mut img = vec![0u8; setup + 0x200];
    img[0x1f1] = 4;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
    img[0x211] = 1; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img.extend_from_slice(&code);
    let path = std::env::temp_dir().join(format!("odpvm-hostile-{}-{name}", std::process::id()));
    std::fs::write(&path, img).unwrap();
    path
}

fn config(kernel: &Path, rnic: RnicChoice) -> VmConfig {
    VmConfig {
        guest: GuestConfig::Linux {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        },
        memory: 64 * MIB,
        vcpus: 1,
        rnic,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    }
}

fn start(cfg: VmConfig) -> (Vm, VmHandle) {
    let mut vm = Vm::new(cfg).expect("building the VM");
    let h = vm.handle();
    vm.start().unwrap();
    (vm, h)
}

/// The values the guest reported.
fn reported(r: &RunReport, n: usize) -> Vec<u32> {
    assert_eq!(r.vcpu_reports[0]["passed"], true, "{r:?}");
    (0..n)
        .map(|i| r.vcpu_reports[0][format!("arg{i}")].as_u64().unwrap() as u32)
        .collect()
}

fn device(h: &VmHandle) -> Arc<RnicDevice> {
    h.rnic().expect("an RNIC device")
}

/// A named emulated RNIC and host peer of its own, so its threads can be
/// told apart from other tests' VMs.
fn own_rnic(name: &str, fence_ms: u64) -> (Arc<rdma_passthrough::EmulatedRnic>, RnicChoice) {
    let nic = rdma_passthrough::EmulatedRnic::new(rdma_passthrough::RnicConfig {
        name: name.into(),
        fence_timeout: Duration::from_millis(fence_ms),
        ..Default::default()
    });
    let peer = HostPeer::new(&nic, 64 * MIB).unwrap();
    (nic.clone(), RnicChoice::Shared(nic, peer))
}

const FLOOD_WQES: u32 = 200_000;

/// Issue 11 item 1: a guest posting only unsignaled RDMA WRITEs (a whole
/// ring per doorbell, forever) used to grow a per-QP list without bound
/// (62 → 448 MB RSS in 14 s). The device's state stays bounded by the
/// ring size however many it posts, and every WRITE is retired.
#[test]
fn unsignaled_write_flood_keeps_device_memory_bounded() {
    let kernel = bzimage("flood", |a| {
        setup_qp(a, 1024)?;
        let w = Wqe {
            op: OP_WRITE,
            signaled: false,
            addr: V::Imm(BUF),
            len: 4096,
            lkey: V::Lkey,
            raddr: V::Peer(0),
            rkey: V::PeerRkey,
        };
        fill_ring(a, 1024, &w)?;
        flood(a, 1024, FLOOD_WQES)?;
        a.mov(eax, dword_ptr(rbp + QP_SQ_CI))?;
        a.push(rax)?;
        a.mov(eax, dword_ptr(rbp + QP_STATUS))?;
        a.push(rax)?;
        report_pushed(a, 2)
    });
    let rss0 = rss_kib();
    let (vm, h) = start(config(&kernel, RnicChoice::Emulated));
    let dev = device(&h);
    let mut most = 0;
    let t0 = Instant::now();
    while !h.finished() && t0.elapsed() < Duration::from_secs(120) {
        most = most.max(dev.pending(0).unwrap().0);
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = vm.wait(Some(Duration::from_secs(10)));
    let v = reported(&r, 2);
    let posted = dev.progress(0).unwrap().0;
    until("the RNIC retired every WRITE", || {
        let (p, retired) = dev.progress(0).unwrap();
        p == retired
    });
    // A completion read retires (and checks) what is left.
    let mut n = [0u8; 4];
    dev.mmio_read(QP_BANK + QP_CQ_COUNT, &mut n);
    let left = dev.pending(0).unwrap().0;
    println!(
        "flood: {} WQEs taken, {posted} posted; most WRITEs held {most}, left {left}; RSS {} → {} KiB; pages checked {}",
        v[0],
        rss0,
        rss_kib(),
        dev.stats.pages_verified.load(Ordering::Relaxed)
    );
    assert!(v[0] >= FLOOD_WQES, "{v:?}");
    assert_eq!(v[1], STATUS_ENABLED);
    // At most what the RNIC's send queue holds and executes when a
    // doorbell starts, plus one ring of new ones.
    assert!(
        most <= 2049,
        "the device held {most} WRITEs for a 1024-entry ring"
    );
    assert_eq!(left, 0);
    assert_eq!(dev.stats.stale_accesses.load(Ordering::Relaxed), 0);
    let _ = std::fs::remove_file(kernel);
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Issue 11 item 2: the host peer echoes a guest's SEND, and the guest
/// never posts a receive: the echo waits "receiver not ready" forever
/// (rnr_retry 7). It used to keep the device thread spinning (2.97 s of
/// CPU in 5 s); now it sleeps on the IBTA RNR timer between retries.
#[test]
fn rnr_forever_does_not_pin_a_host_core() {
    let kernel = bzimage("rnr", |a| {
        one_wqe(
            a,
            &Wqe {
                op: OP_SEND,
                signaled: true,
                addr: V::Imm(BUF),
                len: 64,
                lkey: V::Lkey,
                raddr: V::Imm(0),
                rkey: V::Imm(0),
            },
        )?;
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        idle(a)?;
        a.jmp(l)
    });
    let (nic, choice) = own_rnic("rnrvm", 100);
    let (vm, h) = start(config(&kernel, choice));
    until("the echo waiting for a receive", || {
        nic.stats().rnr_waits > 2
    });
    let (cpu0, waits0, t0) = (
        thread_cpu("rnrvm-dev"),
        nic.stats().rnr_waits,
        Instant::now(),
    );
    let peer0 = thread_cpu("odpvm-peer");
    std::thread::sleep(Duration::from_secs(2));
    let peer_cpu = thread_cpu("odpvm-peer") - peer0;
    let (cpu, waits, wall) = (
        thread_cpu("rnrvm-dev") - cpu0,
        nic.stats().rnr_waits - waits0,
        t0.elapsed().as_secs_f64(),
    );
    h.shutdown();
    vm.wait(Some(Duration::from_secs(30)));
    println!(
        "RNR for {wall:.2} s: {waits} retries, device thread {cpu:.3} CPU s, host peer thread {peer_cpu:.3}"
    );
    let timer = rdma_passthrough::rnr_timer(rdma_passthrough::QpCaps::default().min_rnr_timer);
    let most = (wall / timer.as_secs_f64() * 1.2) as u64 + 10;
    assert!(
        waits > 0 && waits <= most,
        "{waits} RNR retries (most {most})"
    );
    assert!(
        cpu < 0.1 * wall,
        "the device thread used {cpu:.3} s of {wall:.2} s"
    );
    // The host peer polls briefly after each idle check: a few percent.
    assert!(peer_cpu < 0.25 * wall, "the host peer used {peer_cpu:.3} s");
    let _ = std::fs::remove_file(kernel);
}

/// Issue 11 item 3: buffers at the top of the address space (ending at
/// 2^64 − 1, in the last page, or in the top MiB) used to wrap a
/// `page + 1 MiB` / `next_multiple_of` computation and hang the queue pair
/// with status OK (or panic the device thread with overflow checks). Each
/// completes with an error now, and the queue pair works afterwards.
#[test]
fn wqes_at_the_top_of_the_address_space_complete_with_an_error() {
    let top = |op, addr, len| Wqe {
        op,
        signaled: true,
        addr: V::Imm(addr),
        len,
        lkey: V::Lkey,
        raddr: V::Peer(0),
        rkey: V::PeerRkey,
    };
    let cases = [
        top(OP_WRITE, u64::MAX - 15, 15),
        top(OP_WRITE, u64::MAX - 4095, 4095),
        top(OP_READ, u64::MAX - 4096 - 100, 200),
        top(OP_WRITE, u64::MAX - MIB + 1, 4096),
        top(OP_WRITE, BUF, 4096),
    ];
    let kernel = bzimage("top", |a| {
        for w in &cases {
            one_wqe(a, w)?;
        }
        report_pushed(a, cases.len())
    });
    let (vm, _h) = start(config(&kernel, RnicChoice::Emulated));
    let r = vm.wait(Some(Duration::from_secs(120)));
    let v = reported(&r, cases.len());
    assert_eq!(
        v,
        [LOC_PROT_ERR, LOC_PROT_ERR, LOC_PROT_ERR, LOC_PROT_ERR, 0],
        "completion statuses"
    );
    let _ = std::fs::remove_file(kernel);
}

/// Issue 11 item 5: a guest posting signaled WQEs and never popping used
/// to lose completions silently (100 000 posted, 16 384 delivered, QP
/// OK). The overrun is reported: CQ overrun and QP error in STATUS.
#[test]
fn cq_overrun_is_reported_to_the_guest() {
    let kernel = bzimage("overrun", |a| {
        setup_qp(a, 1024)?;
        let w = Wqe {
            op: OP_WRITE,
            signaled: true,
            addr: V::Imm(BUF),
            len: 64,
            lkey: V::Lkey,
            raddr: V::Peer(0),
            rkey: V::PeerRkey,
        };
        fill_ring(a, 1024, &w)?;
        flood(a, 1024, 40_000)?;
        // Give the device time to run them; stop once it reports an error.
        let (mut top, mut done) = (a.create_label(), a.create_label());
        a.mov(r14, 500u64)?;
        a.set_label(&mut top)?;
        a.mov(eax, dword_ptr(rbp + QP_STATUS))?;
        a.test(eax, STATUS_CQ_OVERRUN)?;
        a.jnz(done)?;
        idle(a)?;
        a.dec(r14)?;
        a.jnz(top)?;
        a.set_label(&mut done)?;
        a.mov(eax, dword_ptr(rbp + QP_STATUS))?;
        a.push(rax)?;
        a.mov(eax, dword_ptr(rbp + QP_SQ_CI))?;
        a.push(rax)?;
        report_pushed(a, 2)
    });
    let (vm, h) = start(config(&kernel, RnicChoice::Emulated));
    let r = vm.wait(Some(Duration::from_secs(120)));
    let v = reported(&r, 2);
    let want = STATUS_ENABLED | STATUS_QP_ERROR | STATUS_CQ_OVERRUN;
    assert_eq!(v[0] & want, want, "STATUS {:#x} after {} WQEs", v[0], v[1]);
    assert!(device(&h).rnic().stats().cq_overruns >= 1);
    let _ = std::fs::remove_file(kernel);
}

/// Issue 11 item 4, guest to guest: A used to get the rkey of B's
/// whole-RAM MR and could read and write B's memory anywhere. Now its
/// peer is an MR covering exactly the advertised window, in a domain of
/// its own: outside the window, and with B's RAM key, A gets remote access
/// errors; inside, it works.
#[test]
fn a_guest_peer_reaches_only_the_advertised_window() {
    let nic = rdma_passthrough::EmulatedRnic::new(Default::default());
    let host = HostPeer::new(&nic, 64 * MIB).unwrap();
    let shared = RnicChoice::Shared(nic.clone(), host);
    let mut b_cfg = config(&PathBuf::new(), shared.clone());
    b_cfg.guest = GuestConfig::Builtin(Guest::Idle);
    let (b, hb) = start(b_cfg);
    let dev_b = device(&hb);
    let b_ram_key = u64::from(dev_b.lkey());
    let w = |op, raddr, rkey| Wqe {
        op,
        signaled: true,
        addr: V::Imm(BUF),
        len: 4096,
        lkey: V::Lkey,
        raddr,
        rkey,
    };
    let cases = [
        w(OP_WRITE, V::Peer(-4096), V::PeerRkey),
        w(OP_WRITE, V::PeerEnd, V::PeerRkey),
        w(OP_WRITE, V::Peer(-4096), V::Imm(b_ram_key)),
        w(OP_READ, V::Peer(-(MIB as i64)), V::Imm(b_ram_key)),
        w(OP_WRITE, V::Peer(0), V::Imm(b_ram_key)),
        w(OP_WRITE, V::Peer(0), V::PeerRkey),
    ];
    let kernel = bzimage("g2g", |a| {
        for c in &cases {
            one_wqe(a, c)?;
        }
        report_pushed(a, cases.len())
    });
    let mut a_vm = Vm::new(config(&kernel, shared)).unwrap();
    let ha = a_vm.handle();
    let window = PAYLOAD_RAM_GPA + 32 * MIB;
    device(&ha)
        .peer_with_guest(&dev_b, hb.ram().clone(), window, 16 * MIB)
        .unwrap();
    a_vm.start().unwrap();
    let r = a_vm.wait(Some(Duration::from_secs(120)));
    hb.shutdown();
    b.wait(Some(Duration::from_secs(30)));
    let v = reported(&r, cases.len());
    let e = REM_ACCESS_ERR;
    assert_eq!(v, [e, e, e, e, e, 0], "completion statuses");
    let _ = std::fs::remove_file(kernel);
}

/// Issue 11 item 4, a host peer shared by two guests: each used to reach
/// the whole peer buffer, so one guest could read and overwrite what the
/// other had there. Each now has a window of its own: the other's, with
/// either guest's rkey, is a remote access error.
#[test]
fn a_shared_host_peer_confines_each_guest_to_its_window() {
    let nic = rdma_passthrough::EmulatedRnic::new(Default::default());
    let host = HostPeer::new(&nic, 64 * MIB).unwrap();
    let shared = RnicChoice::Shared(nic.clone(), host);
    let mut b_cfg = config(&PathBuf::new(), shared.clone());
    b_cfg.guest = GuestConfig::Builtin(Guest::Idle);
    let (b, hb) = start(b_cfg);
    let dev_b = device(&hb);
    let (b_base, b_len, b_rkey) = {
        let w = dev_b.peer_window();
        (w.base, w.len, u64::from(w.rkey()))
    };
    let w = |op, raddr, rkey| Wqe {
        op,
        signaled: true,
        addr: V::Imm(BUF),
        len: 4096,
        lkey: V::Lkey,
        raddr,
        rkey,
    };
    let cases = [
        w(OP_WRITE, V::Imm(b_base), V::PeerRkey),
        w(OP_WRITE, V::Imm(b_base), V::Imm(b_rkey)),
        w(OP_READ, V::Imm(b_base + b_len / 2), V::Imm(b_rkey)),
        w(OP_WRITE, V::Peer(0), V::Imm(b_rkey)),
        w(OP_WRITE, V::Peer(0), V::PeerRkey),
    ];
    let kernel = bzimage("shared", |a| {
        for c in &cases {
            one_wqe(a, c)?;
        }
        report_pushed(a, cases.len())
    });
    let (a_vm, ha) = start(config(&kernel, shared));
    let r = a_vm.wait(Some(Duration::from_secs(120)));
    let a_window = device(&ha).peer_window().base;
    hb.shutdown();
    b.wait(Some(Duration::from_secs(30)));
    let v = reported(&r, cases.len());
    let e = REM_ACCESS_ERR;
    assert_ne!(a_window, b_base);
    assert_eq!(v, [e, e, e, e, 0], "completion statuses");
    let _ = std::fs::remove_file(kernel);
}

/// Issue 11 item 6: once the device missed an invalidation deadline, the
/// guest's only MR used to stay fenced for the VM's life (all RDMA
/// failed). Now it is re-registered once the device answers again,
/// counted, and the guest's RDMA WRITEs succeed again.
#[test]
fn a_fenced_guest_mr_recovers_and_rdma_resumes() {
    let (nic, choice) = own_rnic("fencevm", 20);
    let cfg = VmConfig {
        guest: GuestConfig::Builtin(Guest::RdmaWriteBw),
        memory: 64 * MIB,
        vcpus: 1,
        iters: 0,
        rnic: choice,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    };
    let (vm, h) = start(cfg);
    until("RDMA running", || nic.stats().wqes > 100);
    nic.set_ignore_invalidations(true);
    // The guest's message slots. The device may not map them at this very
    // moment (then it has nothing to confirm and nothing is fenced): invalidate
    // again until it had to confirm and did not.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while nic.stats().fenced_mrs == 0 && std::time::Instant::now() < deadline {
        h.invalidate(PAYLOAD_RAM_GPA + MIB, MIB).unwrap();
        if nic.stats().fenced_mrs == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(nic.stats().fenced_mrs, 1);
    std::thread::sleep(Duration::from_millis(200));
    let during = nic.stats();
    assert_eq!(during.mr_recoveries, 0);
    nic.set_ignore_invalidations(false);
    until("the MR re-registered", || nic.stats().mr_recoveries == 1);
    let after = nic.stats().wqes;
    until("RDMA WRITEs succeeding again", || {
        nic.stats().wqes > after + 100
    });
    h.shutdown();
    let r = vm.wait(Some(Duration::from_secs(30)));
    let s = nic.stats();
    println!(
        "fenced {} recovered {} wqes {} → {} → {}; guest {:?}",
        s.fenced_mrs, s.mr_recoveries, during.wqes, after, s.wqes, r.perftest
    );
    assert_eq!((s.fenced_mrs, s.mr_recoveries), (1, 1));
}
