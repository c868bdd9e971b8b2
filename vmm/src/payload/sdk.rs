//! The guest SDK's ABI files, generated from the VMM's own definitions:
//! `guest/include/odpvm_abi.h` (C) and `guest/rust/src/abi.rs` (the
//! `no_std` crate). Nothing in them is written by hand: addresses come
//! from `layout`, registers from `devices::testdev` and
//! `devices::rnic::abi`, structures from `rnic::abi` and
//! `payload::user::ProgramParams` (offsets by `offset_of!`).
//!
//! Test `checked_in_sdk_abi_is_current` fails when a checked-in file
//! differs from what this module generates; regenerate with
//! `ODPVM_BLESS_SDK=1 cargo test -p vmm --lib sdk`. Both files repeat the
//! layouts as compile-time asserts, so a C compiler checks them too (test
//! `guest_sdk::c_example_writes_rdma_checked_by_the_host_peer` compiles it).

use super::user::{self, ProgramParams, VcpuInfo};
use crate::devices::rnic::{self, RecvEntry, SendWqe};
use crate::devices::testdev;
use crate::layout;
use core::mem::{offset_of, size_of};
use std::fmt::Write;

#[derive(Clone, Copy)]
enum Ty {
    U32,
    U64,
}

struct Const {
    name: &'static str,
    value: u64,
    ty: Ty,
    doc: &'static str,
}

/// A group of constants: C names get `c_prefix`, Rust ones live in
/// module `module` (or at the top when empty).
struct Group {
    title: &'static str,
    c_prefix: &'static str,
    module: &'static str,
    consts: Vec<Const>,
}

struct Field {
    name: &'static str,
    ty: Ty,
    /// Array length, if an array.
    len: Option<usize>,
    offset: usize,
}

struct Struct {
    c_name: &'static str,
    rust_name: &'static str,
    doc: &'static str,
    size: usize,
    fields: Vec<Field>,
}

macro_rules! c {
    ($name:expr, $value:expr, $ty:ident, $doc:expr) => {
        Const {
            name: $name,
            value: $value as u64,
            ty: Ty::$ty,
            doc: $doc,
        }
    };
}

macro_rules! f {
    ($s:ty, $name:ident, $ty:ident) => {
        Field {
            name: stringify!($name),
            ty: Ty::$ty,
            len: None,
            offset: offset_of!($s, $name),
        }
    };
    ($s:ty, $name:ident, $ty:ident, $len:expr) => {
        Field {
            name: stringify!($name),
            ty: Ty::$ty,
            len: Some($len),
            offset: offset_of!($s, $name),
        }
    };
}

fn groups() -> Vec<Group> {
    use rnic::*;
    use testdev as t;
    vec![
        Group {
            title: "Guest memory and entry (payload::user, layout)",
            c_prefix: "ODPVM_",
            module: "",
            consts: vec![
                c!("PAGE_SIZE", layout::PAGE, U64, "4 KiB"),
                c!(
                    "LOAD_BASE",
                    user::LOAD_BASE,
                    U64,
                    "where programs are linked: the start of RAM"
                ),
                c!(
                    "PARAMS_ADDR",
                    user::PARAMS_GPA,
                    U64,
                    "the parameter block (rdx at entry; read-only)"
                ),
                c!("PARAMS_MAGIC", user::PARAMS_MAGIC, U64, "\"ODPVMUSR\""),
                c!("PARAMS_VERSION", user::PARAMS_VERSION, U32, ""),
                c!(
                    "MAX_ARGS",
                    user::MAX_PROGRAM_ARGS,
                    U32,
                    "most --payload-arg values"
                ),
                c!("STACK_SIZE", user::STACK_SIZE, U64, "each vCPU's stack"),
                c!("MAX_VCPUS", layout::MAX_VCPUS, U32, ""),
                c!(
                    "MMIO_HOLE_START",
                    layout::MMIO_HOLE_START,
                    U64,
                    "no RAM in [start, end)"
                ),
                c!("MMIO_HOLE_END", layout::MMIO_HOLE_END, U64, ""),
                c!(
                    "TESTDEV_BASE",
                    layout::TESTDEV_MMIO_GPA,
                    U64,
                    "the test device's registers"
                ),
                c!(
                    "RNIC_BASE",
                    layout::RNIC_MMIO_GPA,
                    U64,
                    "the paravirtual RNIC's registers"
                ),
                c!("RNIC_WINDOW_SIZE", layout::RNIC_MMIO_SIZE, U64, ""),
            ],
        },
        Group {
            title: "Test device registers (offsets from TESTDEV_BASE) and commands",
            c_prefix: "ODPVM_TESTDEV_",
            module: "testdev",
            consts: vec![
                c!("CMD", t::CMD, U64, "32-bit write: a command"),
                c!(
                    "ARG",
                    t::ARG,
                    U64,
                    "32-bit write: push an argument for the next command"
                ),
                c!(
                    "STOP",
                    t::STOP,
                    U64,
                    "32-bit read: non-zero once the host wants the program to finish"
                ),
                c!(
                    "EXIT",
                    t::EXIT,
                    U64,
                    "32-bit write: end this vCPU's program with this status (0 = pass)"
                ),
                c!(
                    "CONSOLE",
                    t::CONSOLE,
                    U64,
                    "1/2/4/8-byte write: console text"
                ),
                c!(
                    "CMD_BARRIER",
                    t::CMD_BARRIER,
                    U32,
                    "wait until the host releases (arg: phase)"
                ),
                c!("CMD_IDLE", t::CMD_IDLE, U32, "sleep briefly"),
                c!(
                    "CMD_SAMPLE",
                    t::CMD_SAMPLE,
                    U32,
                    "record a latency sample (arg: cycles)"
                ),
                c!(
                    "CMD_SYNC",
                    t::CMD_SYNC,
                    U32,
                    "meet every running vCPU (arg: phase)"
                ),
                c!("CMD_CLEAR", t::CMD_CLEAR, U32, "drop pushed arguments"),
            ],
        },
        Group {
            title: "Paravirtual RNIC registers (devices::rnic::abi)",
            c_prefix: "ODPVM_RNIC_",
            module: "rnic",
            consts: vec![
                c!("ID", RNIC_ID, U32, "value of REG_ID: \"ODPR\""),
                c!("VERSION", RNIC_VERSION, U32, ""),
                c!("REG_ID", REG_ID, U64, "global registers (read-only)"),
                c!("REG_VERSION", REG_VERSION, U64, ""),
                c!("REG_NUM_QPS", REG_NUM_QPS, U64, ""),
                c!(
                    "REG_LKEY",
                    REG_LKEY,
                    U64,
                    "key of the guest-RAM MR (also its rkey)"
                ),
                c!(
                    "REG_PEER_ADDR",
                    REG_PEER_ADDR,
                    U64,
                    "64-bit: the peer's buffer"
                ),
                c!("REG_PEER_LEN", REG_PEER_LEN, U64, "64-bit: its length"),
                c!("REG_PEER_RKEY", REG_PEER_RKEY, U64, "its rkey"),
                c!(
                    "QP_BANK",
                    QP_BANK,
                    U64,
                    "queue pair q's registers at QP_BANK * (q + 1)"
                ),
                c!("QP_STATUS", QP_STATUS, U64, "RO: STATUS_* bits"),
                c!("QP_ERROR", QP_ERROR, U64, "RO: ERR_*"),
                c!("QP_CTRL", QP_CTRL, U64, "WO: CTRL_RESET or CTRL_ENABLE"),
                c!(
                    "QP_SQ_BASE",
                    QP_SQ_BASE,
                    U64,
                    "RW 64-bit: send ring (guest-physical)"
                ),
                c!(
                    "QP_SQ_SIZE",
                    QP_SQ_SIZE,
                    U64,
                    "RW: entries, a power of two up to MAX_RING"
                ),
                c!("QP_RQ_BASE", QP_RQ_BASE, U64, "RW 64-bit: receive ring"),
                c!("QP_RQ_SIZE", QP_RQ_SIZE, U64, "RW: entries"),
                c!(
                    "QP_SQ_PI",
                    QP_SQ_PI,
                    U64,
                    "WO: send doorbell (producer index, free running)"
                ),
                c!("QP_RQ_PI", QP_RQ_PI, U64, "WO: receive doorbell"),
                c!("QP_SQ_CI", QP_SQ_CI, U64, "RO: WQEs the device has taken"),
                c!(
                    "QP_RQ_CI",
                    QP_RQ_CI,
                    U64,
                    "RO: receives the device has taken"
                ),
                c!("QP_CQ_COUNT", QP_CQ_COUNT, U64, "RO: completions waiting"),
                c!(
                    "QP_CQE_WR_ID",
                    QP_CQE_WR_ID,
                    U64,
                    "RO 64-bit: oldest completion's wr_id"
                ),
                c!(
                    "QP_CQE_STATUS",
                    QP_CQE_STATUS,
                    U64,
                    "RO: its ibv_wc_status (0 = success)"
                ),
                c!("QP_CQE_OPCODE", QP_CQE_OPCODE, U64, "RO: its OP_*"),
                c!("QP_CQE_LEN", QP_CQE_LEN, U64, "RO: its byte count"),
                c!(
                    "QP_CQ_POP",
                    QP_CQ_POP,
                    U64,
                    "WO: drop the oldest completion"
                ),
                c!("CTRL_RESET", CTRL_RESET, U32, ""),
                c!("CTRL_ENABLE", CTRL_ENABLE, U32, ""),
                c!("STATUS_ENABLED", STATUS_ENABLED, U32, ""),
                c!("STATUS_DEVICE_ERROR", STATUS_DEVICE_ERROR, U32, ""),
                c!("STATUS_QP_ERROR", STATUS_QP_ERROR, U32, ""),
                c!("OP_WRITE", OP_WRITE, U32, ""),
                c!("OP_READ", OP_READ, U32, ""),
                c!("OP_SEND", OP_SEND, U32, ""),
                c!("OP_RECV", OP_RECV, U32, "completions only"),
                c!(
                    "WQE_SIGNALED",
                    WQE_SIGNALED,
                    U32,
                    "SendWqe flags: ask for a completion"
                ),
                c!("WQE_SIZE", WQE_SIZE, U64, ""),
                c!("RQE_SIZE", RQE_SIZE, U64, ""),
                c!("MAX_RING", MAX_RING, U32, ""),
                c!("MAX_MSG", MAX_MSG, U32, "largest message a WQE may carry"),
                c!("ERR_NONE", ERR_NONE, U32, "QP_ERROR values"),
                c!("ERR_NOT_ENABLED", ERR_NOT_ENABLED, U32, ""),
                c!("ERR_BAD_RING", ERR_BAD_RING, U32, ""),
                c!("ERR_DOORBELL", ERR_DOORBELL, U32, ""),
                c!("ERR_REGISTER", ERR_REGISTER, U32, ""),
                c!("ERR_RING_READ", ERR_RING_READ, U32, ""),
                c!("ERR_ROCE_GONE", ERR_ROCE_GONE, U32, ""),
            ],
        },
    ]
}

fn structs() -> Vec<Struct> {
    vec![
        Struct {
            c_name: "odpvm_params",
            rust_name: "Params",
            doc: "The parameter block at PARAMS_ADDR (rdx at entry).",
            size: size_of::<ProgramParams>(),
            fields: vec![
                f!(ProgramParams, magic, U64),
                f!(ProgramParams, version, U32),
                f!(ProgramParams, vcpus, U32),
                f!(ProgramParams, ram_start, U64),
                f!(ProgramParams, ram_low_end, U64),
                f!(ProgramParams, ram_high_end, U64),
                f!(ProgramParams, free_start, U64),
                f!(ProgramParams, stack_size, U64),
                f!(ProgramParams, nargs, U64),
                f!(ProgramParams, args, U64, user::MAX_PROGRAM_ARGS),
            ],
        },
        Struct {
            c_name: "odpvm_vcpu_info",
            rust_name: "VcpuInfo",
            doc: "This vCPU's identity, where %gs points (read-only; survives teardowns).",
            size: size_of::<VcpuInfo>(),
            fields: vec![f!(VcpuInfo, index, U64), f!(VcpuInfo, vcpus, U64)],
        },
        Struct {
            c_name: "odpvm_wqe",
            rust_name: "SendWqe",
            doc: "A send-ring entry (addr guest-physical, remote_addr in the peer's space).",
            size: size_of::<SendWqe>(),
            fields: vec![
                f!(SendWqe, wr_id, U64),
                f!(SendWqe, opcode, U32),
                f!(SendWqe, flags, U32),
                f!(SendWqe, addr, U64),
                f!(SendWqe, length, U32),
                f!(SendWqe, lkey, U32),
                f!(SendWqe, remote_addr, U64),
                f!(SendWqe, rkey, U32),
                f!(SendWqe, reserved, U32, 5),
            ],
        },
        Struct {
            c_name: "odpvm_rqe",
            rust_name: "RecvEntry",
            doc: "A receive-ring entry.",
            size: size_of::<RecvEntry>(),
            fields: vec![
                f!(RecvEntry, wr_id, U64),
                f!(RecvEntry, addr, U64),
                f!(RecvEntry, length, U32),
                f!(RecvEntry, lkey, U32),
                f!(RecvEntry, reserved, U64),
            ],
        },
    ]
}

const BANNER: &str =
    "Generated by vmm/src/payload/sdk.rs from the VMM's definitions: do not edit.\n\
    Regenerate with ODPVM_BLESS_SDK=1 cargo test -p vmm --lib sdk";

/// `guest/include/odpvm_abi.h`.
pub fn c_abi() -> String {
    let mut o = String::new();
    let _ = writeln!(o, "/* {} */", BANNER.replace('\n', "\n * "));
    o += "#ifndef ODPVM_ABI_H\n#define ODPVM_ABI_H\n\n#include <stddef.h>\n#include <stdint.h>\n";
    o += "\n#if defined(__cplusplus) && !defined(_Static_assert)\n#define _Static_assert static_assert\n#endif\n";
    for g in groups() {
        let _ = writeln!(o, "\n/* {} */", g.title);
        for c in &g.consts {
            let name = format!("{}{}", g.c_prefix, c.name);
            let suffix = match c.ty {
                Ty::U32 => "u",
                Ty::U64 => "ul",
            };
            let _ = write!(o, "#define {name} {:#x}{suffix}", c.value);
            if !c.doc.is_empty() {
                let _ = write!(o, " /* {} */", c.doc);
            }
            o.push('\n');
        }
    }
    for s in structs() {
        let _ = writeln!(o, "\n/* {} */\nstruct {} {{", s.doc, s.c_name);
        for f in &s.fields {
            let ty = match f.ty {
                Ty::U32 => "uint32_t",
                Ty::U64 => "uint64_t",
            };
            match f.len {
                Some(n) => {
                    let _ = writeln!(o, "    {ty} {}[{n}];", f.name);
                }
                None => {
                    let _ = writeln!(o, "    {ty} {};", f.name);
                }
            }
        }
        o += "};\n";
        let _ = writeln!(
            o,
            "_Static_assert(sizeof(struct {0}) == {1}, \"struct {0} is {1} bytes\");",
            s.c_name, s.size
        );
        for f in &s.fields {
            let _ = writeln!(
                o,
                "_Static_assert(offsetof(struct {0}, {1}) == {2}, \"{0}.{1} at {2}\");",
                s.c_name, f.name, f.offset
            );
        }
    }
    o += "\n#endif /* ODPVM_ABI_H */\n";
    o
}

/// `guest/rust/src/abi.rs`.
pub fn rust_abi() -> String {
    let mut o = String::new();
    for line in BANNER.lines() {
        let _ = writeln!(o, "//! {line}");
    }
    o += "\n#![allow(dead_code)]\n\nuse core::mem::{offset_of, size_of};\n";
    let rust_ty = |t: Ty| match t {
        Ty::U32 => "u32",
        Ty::U64 => "u64",
    };
    for g in groups() {
        let indent = if g.module.is_empty() { "" } else { "    " };
        let _ = writeln!(o, "\n/// {}", g.title);
        if !g.module.is_empty() {
            let _ = writeln!(o, "pub mod {} {{", g.module);
        }
        for c in &g.consts {
            if !c.doc.is_empty() {
                let _ = writeln!(o, "{indent}/// {}", c.doc);
            }
            let _ = writeln!(
                o,
                "{indent}pub const {}: {} = {:#x};",
                c.name,
                rust_ty(c.ty),
                c.value
            );
        }
        if !g.module.is_empty() {
            o += "}\n";
        }
    }
    for s in structs() {
        let _ = writeln!(
            o,
            "\n/// {}\n#[repr(C)]\n#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]\npub struct {} {{",
            s.doc, s.rust_name
        );
        for f in &s.fields {
            match f.len {
                Some(n) => {
                    let _ = writeln!(o, "    pub {}: [{}; {n}],", f.name, rust_ty(f.ty));
                }
                None => {
                    let _ = writeln!(o, "    pub {}: {},", f.name, rust_ty(f.ty));
                }
            }
        }
        o += "}\n";
        let _ = writeln!(
            o,
            "const _: () = assert!(size_of::<{}>() == {});",
            s.rust_name, s.size
        );
        for f in &s.fields {
            let _ = writeln!(
                o,
                "const _: () = assert!(offset_of!({}, {}) == {});",
                s.rust_name, f.name, f.offset
            );
        }
    }
    o
}

/// Where the generated files live, from the vmm crate's directory.
pub const C_ABI_PATH: &str = "../guest/include/odpvm_abi.h";
pub const RUST_ABI_PATH: &str = "../guest/rust/src/abi.rs";

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn checked_in_sdk_abi_is_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bless = std::env::var("ODPVM_BLESS_SDK").as_deref() == Ok("1");
        for (path, want) in [(C_ABI_PATH, c_abi()), (RUST_ABI_PATH, rust_abi())] {
            let path = dir.join(path);
            if bless {
                std::fs::write(&path, &want).unwrap();
                continue;
            }
            let have = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                have == want,
                "{} is not what vmm/src/payload/sdk.rs generates: regenerate it with \
                 ODPVM_BLESS_SDK=1 cargo test -p vmm --lib sdk",
                path.display()
            );
        }
    }

    #[test]
    fn every_struct_field_is_listed_in_order_without_gaps() {
        for s in structs() {
            let mut at = 0;
            for f in &s.fields {
                assert_eq!(f.offset, at, "{}.{}", s.c_name, f.name);
                let unit = match f.ty {
                    Ty::U32 => 4,
                    Ty::U64 => 8,
                };
                at += unit * f.len.unwrap_or(1);
            }
            assert_eq!(at, s.size, "{} has fields the generator misses", s.c_name);
        }
    }
}
