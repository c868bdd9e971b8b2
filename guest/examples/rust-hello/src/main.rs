//! A Rust guest program: every vCPU greets, meets the others at a barrier,
//! RDMA-WRITEs one stamped page to its own place in the host peer's buffer
//! (the VMM checks the stamp where it lands), waits for the completion and
//! exits with `--payload-arg` 0 (default 0) on vCPU 0's behalf.
//!
//! ```sh
//! cd guest/examples/rust-hello && cargo build --release
//! odpvm run --payload target/x86_64-unknown-linux-gnu/release/rust-hello --vcpus 2 --json
//! ```

#![no_std]
#![no_main]

use core::fmt::Write;
use odpvm_guest::{rnic, Console, Params, Qp, RecvEntry, SendWqe, MAX_VCPUS, PAGE_SIZE};

const RING: usize = 16;

#[repr(C, align(4096))]
struct Rings {
    sq: [[SendWqe; RING]; MAX_VCPUS as usize],
    rq: [[RecvEntry; RING]; MAX_VCPUS as usize],
}

/// One page per vCPU to send from.
#[repr(C, align(4096))]
struct Pages([[u8; PAGE_SIZE as usize]; MAX_VCPUS as usize]);

static mut RINGS: Rings = Rings {
    sq: [[SendWqe {
        wr_id: 0,
        opcode: 0,
        flags: 0,
        addr: 0,
        length: 0,
        lkey: 0,
        remote_addr: 0,
        rkey: 0,
        reserved: [0; 5],
    }; RING]; MAX_VCPUS as usize],
    rq: [[RecvEntry {
        wr_id: 0,
        addr: 0,
        length: 0,
        lkey: 0,
        reserved: 0,
    }; RING]; MAX_VCPUS as usize],
};
static mut PAGES: Pages = Pages([[0; PAGE_SIZE as usize]; MAX_VCPUS as usize]);

#[no_mangle]
pub extern "C" fn _start(vcpu: u64, nvcpus: u64, params: &'static Params) -> i32 {
    let _ = writeln!(
        Console,
        "hello from Rust on vCPU {vcpu} of {nvcpus} ({} args)",
        params.nargs
    );
    if params.magic != odpvm_guest::PARAMS_MAGIC || u64::from(params.vcpus) != nvcpus {
        return 10;
    }
    if !odpvm_guest::rnic_present() {
        let _ = writeln!(Console, "no RNIC");
        return 11;
    }
    odpvm_guest::barrier();

    let i = vcpu as usize;
    // SAFETY: each vCPU uses only its own rings and page (index `vcpu`),
    // and nothing else touches these statics.
    let (sq, rq, page) = unsafe {
        let rings = &mut *core::ptr::addr_of_mut!(RINGS);
        let pages = &mut *core::ptr::addr_of_mut!(PAGES);
        (&mut rings.sq[i][..], &mut rings.rq[i][..], &mut pages.0[i])
    };
    let mut qp = match Qp::open(vcpu as u32, sq, rq) {
        Ok(qp) => qp,
        Err(e) => {
            let _ = writeln!(Console, "vCPU {vcpu}: queue pair refused (error {e})");
            return 12;
        }
    };
    // vCPU i writes page i of the peer buffer; its stamp says so.
    let peer = odpvm_guest::rnic_read64(rnic::REG_PEER_ADDR);
    let stamp = (1u64 << 32) | vcpu;
    page[..8].copy_from_slice(&stamp.to_le_bytes());
    qp.post_send(&SendWqe {
        wr_id: 7,
        opcode: rnic::OP_WRITE,
        flags: rnic::WQE_SIGNALED,
        addr: page.as_ptr() as u64,
        length: PAGE_SIZE as u32,
        lkey: qp.lkey,
        remote_addr: peer + vcpu * PAGE_SIZE,
        rkey: odpvm_guest::rnic_read32(rnic::REG_PEER_RKEY),
        reserved: [0; 5],
    });
    qp.ring_sq();
    let status = match qp.wait() {
        Ok(c) if c.wr_id == 7 && c.status == 0 && c.opcode == rnic::OP_WRITE => 0,
        Ok(c) => {
            let _ = writeln!(Console, "vCPU {vcpu}: bad completion {c:?}");
            13
        }
        Err(e) => {
            let _ = writeln!(Console, "vCPU {vcpu}: {e:?}");
            14
        }
    };
    let _ = writeln!(Console, "vCPU {vcpu}: wrote page {vcpu} of the peer");
    odpvm_guest::barrier();
    if status != 0 {
        return status;
    }
    if vcpu == 0 && params.nargs > 0 {
        return params.args[0] as i32;
    }
    0
}
