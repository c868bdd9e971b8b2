//! Guest programs users write themselves (`odpvm run --payload`, issue 13):
//! the C and Rust examples in `guest/examples/` built with the documented
//! commands and run on a real VM through the `odpvm` binary; crashes,
//! exit statuses, timeouts and bad files.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm lives in the repository")
        .to_path_buf()
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("guest_sdk")
        .join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The README's command, exactly, from the repository root.
const CC: &[&str] = &[
    "-static",
    "-nostdlib",
    "-ffreestanding",
    "-fno-pie",
    "-no-pie",
    "-O2",
    "-I",
    "guest/include",
    "-T",
    "guest/link.ld",
];

fn cc(src: &Path, out: &Path, extra: &[&str]) {
    let o = Command::new("cc")
        .current_dir(repo())
        .args(CC)
        .arg(src)
        .arg("-o")
        .arg(out)
        .args(["-Wall", "-Wextra", "-Werror"])
        .args(extra)
        .output()
        .expect("running cc");
    assert!(
        o.status.success(),
        "cc {}: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Compile a C program given as source text.
fn cc_text(name: &str, text: &str) -> PathBuf {
    let dir = scratch(name);
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, text).unwrap();
    let out = dir.join(name);
    cc(&src, &out, &[]);
    out
}

/// A VM process that a failing test must not leave running.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn odpvm(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_odpvm"))
        .args(args)
        .output()
        .expect("running odpvm");
    (o, t.elapsed())
}

/// Run a program with `--json`; the report (last stdout line) and the
/// process output.
fn run(prog: &Path, extra: &[&str]) -> (Value, Output) {
    let p = prog.to_str().unwrap();
    let mut args = vec!["run", "--payload", p, "--memory", "64M", "--json"];
    args.extend_from_slice(extra);
    if !extra.contains(&"--timeout") {
        args.extend_from_slice(&["--timeout", "120"]);
    }
    let (o, _) = odpvm(&args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let report = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (report, o)
}

#[test]
fn c_example_writes_rdma_checked_by_the_host_peer() {
    let dir = scratch("rdma_write_bw");
    let prog = dir.join("rdma_write_bw");
    cc(Path::new("guest/examples/rdma_write_bw.c"), &prog, &[]);
    let (r, o) = run(
        &prog,
        &[
            "--vcpus",
            "2",
            "--payload-arg",
            "65536",
            "--payload-arg",
            "400",
        ],
    );
    assert!(o.status.success(), "{r}");
    assert_eq!(r["guest_result"], "pass", "{r}");
    assert_eq!(r["exit"], "guest-done");
    for v in 0..2 {
        assert_eq!(r["vcpu_reports"][v]["exit_code"], 0, "{r}");
    }
    let console = r["console"].as_str().unwrap();
    for v in 0..2 {
        assert!(console.contains(&format!("vCPU {v}: ready\n")), "{console}");
        assert!(
            console.contains(&format!("vCPU {v}: wrote 400 messages of 65536 bytes")),
            "{console}"
        );
    }
    // The console is echoed before the report.
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("vCPU "));
    // Every byte written was checked on the host: placed and stamped right.
    let s = &r["stats"];
    assert_eq!(s["rnic_bytes_written"], 2 * 400 * 65536, "{s}");
    assert_eq!(s["rnic_stale_accesses"], 0, "{s}");
    assert_eq!(s["rnic_wqes_rejected"], 0, "{s}");

    // Without the RNIC its window reads as zero: the program says so.
    let (r, o) = run(&prog, &["--vcpus", "1", "--rnic", "none"]);
    assert!(!o.status.success());
    assert_eq!(r["vcpu_reports"][0]["exit_code"], 2, "{r}");
    assert!(r["console"].as_str().unwrap().contains("no RNIC"), "{r}");

    // The host's check is real: stamps naming the wrong page are caught.
    let bad = dir.join("rdma_write_bw_bad_stamp");
    cc(
        Path::new("guest/examples/rdma_write_bw.c"),
        &bad,
        &["-DSTAMP_SKEW=1"],
    );
    let (r, _) = run(
        &bad,
        &[
            "--vcpus",
            "1",
            "--payload-arg",
            "8192",
            "--payload-arg",
            "32",
        ],
    );
    assert!(
        r["stats"]["rnic_stale_accesses"].as_u64().unwrap() > 0,
        "{r}"
    );
}

#[test]
fn rust_example_runs_in_ring3_on_every_vcpu() {
    let target = scratch("rust-target");
    let o = Command::new(env!("CARGO"))
        .current_dir(repo().join("guest/examples/rust-hello"))
        .args(["build", "--release", "--offline"])
        .env("CARGO_TARGET_DIR", &target)
        // The outer cargo's flags are for the host crates, not the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("running cargo");
    assert!(
        o.status.success(),
        "building the Rust example: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let prog = target.join("x86_64-unknown-linux-gnu/release/rust-hello");
    let (r, o) = run(&prog, &["--vcpus", "2"]);
    assert!(o.status.success(), "{r}");
    assert_eq!(r["guest_result"], "pass", "{r}");
    let console = r["console"].as_str().unwrap();
    for v in 0..2 {
        assert!(
            console.contains(&format!("hello from Rust on vCPU {v} of 2 (0 args)")),
            "{console}"
        );
        assert!(
            console.contains(&format!("vCPU {v}: wrote page {v} of the peer")),
            "{console}"
        );
    }
    assert_eq!(r["stats"]["rnic_bytes_written"], 2 * 4096);
    assert_eq!(r["stats"]["rnic_stale_accesses"], 0);
    // --payload-arg reaches the program: vCPU 0 exits with it.
    let (r, o) = run(&prog, &["--vcpus", "2", "--payload-arg", "3"]);
    assert!(!o.status.success());
    assert_eq!(r["guest_result"], "fail");
    assert_eq!(r["vcpu_reports"][0]["exit_code"], 3, "{r}");
    assert_eq!(r["vcpu_reports"][1]["exit_code"], 0, "{r}");
}

/// Checks what a vCPU starts with; exits with args[0] on vCPU 1.
const ENTRY_CHECK: &str = r#"
#include <odpvm_guest.h>
static unsigned long entry_rsp[ODPVM_MAX_VCPUS];
int _start(unsigned long vcpu, unsigned long nvcpus, const struct odpvm_params *p)
{
    unsigned long rsp;
    __asm__ volatile("mov %%rsp, %0" : "=r"(rsp));
    entry_rsp[vcpu] = rsp;
    if (p != odpvm_params() || p->magic != ODPVM_PARAMS_MAGIC) return 10;
    if (nvcpus != p->vcpus || vcpu >= nvcpus) return 11;
    /* RAM is writable from ring 3 up to its end. */
    *(volatile uint64_t *)(p->ram_low_end - 8 * (vcpu + 1)) = vcpu;
    odpvm_barrier();
    /* Each vCPU has its own stack. */
    if (vcpu == 1 && entry_rsp[1] - entry_rsp[0] != ODPVM_STACK_SIZE)
        return 12;
    odpvm_puts("vCPU ");
    odpvm_print_u64(vcpu);
    odpvm_puts(" args ");
    odpvm_print_u64(p->nargs);
    odpvm_puts("\n");
    return vcpu == 1 ? (int)p->args[0] : 0;
}
"#;

#[test]
fn exit_status_and_args_reach_the_report() {
    let prog = cc_text("entry_check", ENTRY_CHECK);
    let (r, o) = run(
        &prog,
        &[
            "--vcpus",
            "2",
            "--payload-arg",
            "0",
            "--payload-arg",
            "0x10",
        ],
    );
    assert!(o.status.success(), "{r}");
    assert_eq!(r["guest_result"], "pass", "{r}");
    assert!(r["console"].as_str().unwrap().contains("vCPU 1 args 2\n"));
    let (r, o) = run(&prog, &["--vcpus", "2", "--payload-arg", "3"]);
    assert!(!o.status.success(), "exit 3 must fail the run");
    assert_eq!(r["guest_result"], "fail");
    assert_eq!(
        r["vcpu_reports"][0],
        serde_json::json!({"passed": true, "exit_code": 0})
    );
    assert_eq!(
        r["vcpu_reports"][1],
        serde_json::json!({"passed": false, "exit_code": 3})
    );
}

#[test]
fn crashes_are_reported_with_vector_rip_and_address() {
    // (name, set-up, the instruction faulting at `fault_here` on vCPU 1,
    // exception, faulting address for #PF)
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        Option<u64>,
    );
    let cases: &[Case] = &[
        ("pf_null", "", "movq 0x8, %rax", "#PF", Some(0x8)),
        (
            "pf_hole",
            "movl $0xe0000000, %edx",
            "movl $1, (%rdx)",
            "#PF",
            Some(0xe000_0000),
        ),
        (
            "pf_past_ram",
            "",
            "movq 0x40000000, %rax",
            "#PF",
            Some(0x4000_0000),
        ),
        ("pf_vmm_area", "", "movq $1, 0x4000", "#PF", Some(0x4000)),
        ("gp_port", "", "inb $0x80, %al", "#GP", None),
        ("gp_cli", "", "cli", "#GP", None),
        (
            "gp_noncanonical",
            "movabsq $0x800000000000, %rax",
            "movq (%rax), %rax",
            "#GP",
            None,
        ),
        ("ud", "", "ud2", "#UD", None),
        ("de", "xorl %ecx, %ecx", "divl %ecx", "#DE", None),
        ("hlt", "", "hlt", "#GP", None),
        ("int3", "", "int3", "#BP", None),
    ];
    for (name, setup, insn, exception, address) in cases {
        // Extended asm (it has clobbers): registers are written %%.
        let insn = format!("{setup}\\n.globl fault_here\\nfault_here:\\n{insn}").replace('%', "%%");
        let text = format!(
            r#"#include <odpvm_guest.h>
extern char fault_here[];
int _start(unsigned long vcpu, unsigned long n, const struct odpvm_params *p)
{{
    (void)n; (void)p;
    if (vcpu == 1) {{
        odpvm_print_hex((uint64_t)fault_here);
        odpvm_puts("\n");
        __asm__ volatile("{insn}" ::: "rax", "rcx", "rdx", "memory");
    }}
    return 0;
}}
"#
        );
        let prog = cc_text(name, &text);
        let (r, o) = run(&prog, &["--vcpus", "2"]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: {r}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert_eq!(r["guest_result"], "fail", "{name}");
        assert_eq!(r["exit"], "guest-done", "{name}: the VM ends cleanly");
        assert_eq!(r["vcpu_reports"][0]["exit_code"], 0, "{name}: {r}");
        let v1 = &r["vcpu_reports"][1];
        assert_eq!(v1["exception"], *exception, "{name}: {v1}");
        // The rip is the faulting instruction's (int3 is a trap: one past it).
        let label = r["console"].as_str().unwrap().trim().to_string();
        let here = u64::from_str_radix(label.trim_start_matches("0x"), 16).unwrap();
        let want = if *exception == "#BP" { here + 1 } else { here };
        let crash = v1["crash"].as_str().unwrap();
        if *name != "de" && *name != "gp_noncanonical" {
            assert_eq!(v1["rip"], format!("{want:#x}"), "{name}: {v1}");
            assert!(
                crash.contains(&format!("at rip {want:#x}")),
                "{name}: {crash}"
            );
        }
        assert!(
            crash.starts_with(&format!("vCPU 1: {exception} (")),
            "{crash}"
        );
        if let Some(a) = address {
            assert_eq!(v1["address"], format!("{a:#x}"), "{name}: {v1}");
            assert!(crash.contains(&format!("address {a:#x}")), "{crash}");
        }
        // One line on stderr names it too.
        assert!(stderr.contains(crash), "{name}: {stderr}");
    }
}

#[test]
fn a_program_that_never_ends_stops_at_the_timeout() {
    let prog = cc_text(
        "spin",
        "#include <odpvm_guest.h>\nint _start(unsigned long v, unsigned long n, const struct odpvm_params *p)\n{ (void)v; (void)n; (void)p; for (;;) __asm__ volatile(\"\"); }\n",
    );
    let t = Instant::now();
    let (r, o) = run(&prog, &["--vcpus", "2", "--timeout", "1"]);
    assert!(!o.status.success());
    assert_eq!(r["guest_result"], "fail");
    assert_eq!(r["exit"], "timeout after 1.0s", "{r}");
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn bad_files_fail_with_one_clear_line() {
    let dir = scratch("bad_files");
    let good = cc_text("good", "int _start(void) { return 0; }\n");
    let elf = std::fs::read(&good).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let patched = |name: &str, at: usize, bytes: &[u8]| {
        let mut e = elf.clone();
        e[at..at + bytes.len()].copy_from_slice(bytes);
        write(name, &e)
    };
    let build = |name: &str, text: &str, args: &[&str]| {
        let src = dir.join(format!("{name}.c"));
        std::fs::write(&src, text).unwrap();
        let out = dir.join(name);
        let o = Command::new("cc")
            .current_dir(repo())
            .args(args)
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let start = "int _start(void) { return 0; }\n";
    let main = "int main(void) { return 0; }\n";
    let big_bss = {
        let src = dir.join("big.c");
        std::fs::write(
            &src,
            "static char big[100 << 20];\nint _start(void) { big[5] = 1; return big[7]; }\n",
        )
        .unwrap();
        let out = dir.join("big_bss");
        cc(&src, &out, &[]);
        out
    };
    let mut huge = elf.clone();
    huge.resize(5 << 20, 0);
    let cases: Vec<(PathBuf, &str, &str)> = vec![
        (
            write("text", b"#!/bin/sh\necho hi\n"),
            "64M",
            "not an ELF file",
        ),
        (patched("class32", 4, &[1]), "64M", "32-bit"),
        (patched("bigendian", 5, &[2]), "64M", "big-endian"),
        (
            build("object.o", start, &["-c"]),
            "64M",
            "not an executable",
        ),
        (
            build("dynamic", main, &["-no-pie", "-fno-pie"]),
            "64M",
            "dynamically linked",
        ),
        (
            build("pie", start, &["-static-pie", "-nostdlib", "-fpie"]),
            "64M",
            "position-independent",
        ),
        (
            build(
                "low",
                start,
                &[
                    "-static",
                    "-nostdlib",
                    "-fno-pie",
                    "-no-pie",
                    "-Wl,-Ttext-segment=0x100000",
                ],
            ),
            "64M",
            "reserved area",
        ),
        (big_bss, "64M", "past the end of RAM"),
        (
            patched("entry", 24, &0x10_0000_0000u64.to_le_bytes()),
            "64M",
            "entry point",
        ),
        (write("huge", &huge), "4M", "larger than the VM's RAM"),
        (dir.join("no-such-file"), "64M", "No such file"),
    ];
    for (path, mem, expect) in cases {
        let (o, t) = odpvm(&["run", "--payload", path.to_str().unwrap(), "--memory", mem]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: succeeded", path.display());
        assert!(err.contains(expect), "{}: {err}", path.display());
        assert_eq!(err.trim().lines().count(), 1, "{}: {err}", path.display());
        assert!(err.contains("--payload"), "{}: {err}", path.display());
        assert!(t < Duration::from_secs(30));
    }
}

/// Stamps its pages, waits for the host, then counts what it finds.
const HOST_BARRIER: &str = r#"
#include <odpvm_guest.h>
/* After each barrier everything is re-derived (vCPU index from CPUID,
 * sizes from the parameter block): a teardown resets the program's own
 * memory, its stack included, to the loaded state. */
static uint64_t base_of(unsigned long vcpu)
{
    const struct odpvm_params *p = odpvm_params();
    return p->ram_low_end - (vcpu + 1) * p->args[0] * ODPVM_PAGE_SIZE;
}
static void stamp(void)
{
    unsigned long vcpu = odpvm_vcpu_index();
    for (uint64_t i = 0; i < odpvm_params()->args[0]; i++)
        *(volatile uint64_t *)(base_of(vcpu) + i * ODPVM_PAGE_SIZE) = (vcpu + 1) << 32 | i;
}
static int check(uint32_t round)
{
    unsigned long vcpu = odpvm_vcpu_index();
    uint64_t kept = 0, zeroed = 0, bad = 0;
    for (uint64_t i = 0; i < odpvm_params()->args[0]; i++) {
        uint64_t v = *(volatile uint64_t *)(base_of(vcpu) + i * ODPVM_PAGE_SIZE);
        if (v == ((vcpu + 1) << 32 | i)) kept++;
        else if (v == 0) zeroed++;
        else bad++;
    }
    odpvm_puts("round "); odpvm_print_u64(round);
    odpvm_puts(": vCPU "); odpvm_print_u64(vcpu);
    odpvm_puts(" kept "); odpvm_print_u64(kept);
    odpvm_puts(" zeroed "); odpvm_print_u64(zeroed);
    odpvm_puts(" bad "); odpvm_print_u64(bad);
    odpvm_puts("\n");
    return bad != 0;
}
int _start(unsigned long vcpu, unsigned long n, const struct odpvm_params *p)
{
    (void)n; (void)p;
    if (vcpu != odpvm_vcpu_index()) return 9;
    stamp();
    odpvm_host_barrier(1);
    if (check(1)) return 1;
    stamp();
    odpvm_host_barrier(2);
    return check(2);
}
"#;

#[test]
fn the_control_socket_invalidates_and_tears_down_a_programs_memory_at_host_barriers() {
    let prog = cc_text("host_barrier", HOST_BARRIER);
    let dir = scratch("host_barrier");
    let sock = dir.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(env!("CARGO_BIN_EXE_odpvm"))
        .args([
            "run",
            "--payload",
            prog.to_str().unwrap(),
            "--memory",
            "64M",
        ])
        .args([
            "--vcpus",
            "2",
            "--payload-arg",
            "64",
            "--json",
            "--timeout",
            "120",
        ])
        .arg("--api-sock")
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child));
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_odpvm"))
            .arg("ctl")
            .arg("--api-sock")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), v)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if sock.exists() {
            let (ok, v) = ctl(&["stats"]);
            if ok && v["barrier_waiting"] == 2 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the program never reached the barrier"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // vCPU 0's 64 pages end where RAM below the hole ends (2 MiB + 64 MiB).
    let end: u64 = (2 + 64) << 20;
    let start = format!("{:#x}", end - 64 * 4096);
    let (ok, v) = ctl(&["invalidate", &start, "0x40000"]);
    assert!(ok, "{v}");
    let (ok, _) = ctl(&["resume"]);
    assert!(ok);
    // Second round: a teardown of everything while both wait again. The
    // program's own pages come back as loaded; its data as zero.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, v) = ctl(&["stats"]);
        if ok && v["barrier_waiting"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the program never came back to the barrier"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, v) = ctl(&["teardown"]);
    assert!(ok, "{v}");
    let (ok, _) = ctl(&["resume"]);
    assert!(ok);
    let out = child.0.take().unwrap().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(out.status.success(), "{r}");
    assert_eq!(r["guest_result"], "pass", "{r}");
    assert_eq!(r["invalidations"], 1);
    assert_eq!(r["teardowns"], 1);
    let console = r["console"].as_str().unwrap();
    for line in [
        "round 1: vCPU 0 kept 0 zeroed 64 bad 0\n",
        "round 1: vCPU 1 kept 64 zeroed 0 bad 0\n",
        "round 2: vCPU 0 kept 0 zeroed 64 bad 0\n",
        "round 2: vCPU 1 kept 0 zeroed 64 bad 0\n",
    ] {
        assert!(console.contains(line), "{console}");
    }
}

/// Regression (hostile-guest review): the SDK's register accessors were
/// plain volatile stores, which GCC 12 at -O2 compiled to `movq %xmm,
/// (mmio)` in this program; KVM cannot emulate that and vCPU 0 died with
/// "KVM internal error". The sweep itself (every register width and
/// offset, bad rings, wild doorbells, reset storms, a valid WRITE after
/// each group) must leave the device working.
#[test]
fn sdk_register_accessors_survive_the_optimiser_and_a_hostile_sweep() {
    let dir = scratch("register_sweep");
    let prog = dir.join("register_sweep");
    cc(
        Path::new("vmm/tests/guest_progs/register_sweep.c"),
        &prog,
        &[],
    );
    let (r, o) = run(&prog, &["--vcpus", "2"]);
    assert_eq!(
        r["guest_result"],
        "pass",
        "{r}\nstderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success());
}

/// Regression (hostile-guest review): the RNIC's MR covered all of
/// guest-physical space, so ring 3 could READ over the parameter block and
/// the IDT, copy the page tables out with a WRITE and place its rings in
/// the VMM's boot region (and from there take over ring 0). The device
/// reaches only the program's RAM now; see the program for each case.
#[test]
fn the_rnic_cannot_reach_the_vmms_boot_region() {
    let dir = scratch("reserved_region");
    let prog = dir.join("reserved_region");
    cc(
        Path::new("vmm/tests/guest_progs/reserved_region.c"),
        &prog,
        &[],
    );
    let (r, o) = run(&prog, &["--vcpus", "1", "--timeout", "60"]);
    assert_eq!(
        r["guest_result"],
        "pass",
        "{r}\nstderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
