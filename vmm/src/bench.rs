//! `odpvm bench`: measured figures, one JSON object per line with --json.

use crate::devices::serial::Sink;
use crate::fault::Tracking;
use crate::payload::Guest;
use crate::vm::{GuestConfig, Vm, VmConfig};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resident set of this process, KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn emit(json_out: bool, v: &Value) {
    if json_out {
        println!("{v}");
    } else {
        let o = v.as_object().expect("rows are objects");
        let parts: Vec<String> = o.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}", parts.join(" "));
    }
}

fn base(memory: u64, vcpus: usize, guest: Guest) -> VmConfig {
    VmConfig {
        guest: GuestConfig::Builtin(guest),
        memory,
        vcpus,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    }
}

/// One `touch` run; returns (seconds the guest ran, report).
fn touch(cfg: VmConfig) -> Result<(f64, crate::vm::RunReport), String> {
    let mut vm = Vm::new(cfg).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    vm.start().map_err(|e| e.to_string())?;
    let r = vm.wait(Some(Duration::from_secs(600)));
    let secs = t0.elapsed().as_secs_f64();
    if r.guest_result != "pass" {
        return Err(format!("touch failed: {} ({})", r.guest_result, r.exit));
    }
    Ok((secs, r))
}

/// First-touch fault cost with the tracker, with a raw userfaultfd handler
/// and with no userfaultfd, in one run; then start-up time and RSS.
pub fn faults(
    memory: u64,
    fa_memory: u64,
    vcpus: usize,
    reps: usize,
    json_out: bool,
) -> Result<(), String> {
    // Start-up first, in a fresh process: from Vm::new to the idle
    // guest's first device command, and the VMM's RSS then.
    let mut vm = Vm::new(base(memory, 1, Guest::Idle)).map_err(|e| e.to_string())?;
    let h = vm.handle();
    vm.start().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        if let Some(t) = h.ready_after() {
            break t;
        }
        if Instant::now() > deadline {
            return Err("the idle guest never became ready".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let rss = rss_kib();
    h.shutdown();
    let r = vm.wait(Some(Duration::from_secs(30)));
    emit(
        json_out,
        &json!({
            "bench": "startup",
            "ready_ms": ready.as_secs_f64() * 1e3,
            "build_ms": r.boot_ms,
            "vmm_rss_kib": rss,
            "guest_pages_faulted": r.faults_tracked,
        }),
    );
    let mut per_page = std::collections::BTreeMap::new();
    for tracking in [Tracking::Mmu, Tracking::RawUffd, Tracking::None] {
        let mut samples = Vec::new();
        let mut last = None;
        for _ in 0..reps.max(1) {
            // Page at a time: the per-fault cost is what is compared.
            let cfg = VmConfig {
                tracking,
                fault_around: 0,
                ..base(memory, vcpus, Guest::Touch)
            };
            let (secs, r) = touch(cfg)?;
            samples.push(secs);
            last = Some(r);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let secs = samples[samples.len() / 2];
        let r = last.expect("at least one repetition");
        let pages = r.pages_touched;
        let ns = secs * 1e9 / pages as f64;
        per_page.insert(tracking.as_str(), ns);
        emit(
            json_out,
            &json!({
                "bench": "faults",
                "mode": tracking.as_str(),
                "pages": pages,
                "vcpus": vcpus,
                "seconds": secs,
                "ns_per_page": ns,
                "faults": r.faults_tracked,
                "fault_retries": r.fault_retries,
                "reps": reps.max(1),
            }),
        );
    }
    emit(
        json_out,
        &json!({
            "bench": "faults",
            "summary": true,
            "mmu_over_raw_uffd": per_page["mmu"] / per_page["raw-uffd"],
            "mmu_over_no_uffd": per_page["mmu"] / per_page["none"],
        }),
    );

    fault_around(fa_memory, json_out)?;

    Ok(())
}

/// Fault-around: sequential first touch of `memory` page at a time, with
/// the adaptive window, and with 2 MiB pages; scattered sparse touch page
/// at a time and adaptive. One vCPU, one run each.
fn fault_around(memory: u64, json_out: bool) -> Result<(), String> {
    let row = |name: &str, guest: Guest, cfg: VmConfig| -> Result<f64, String> {
        let (secs, r) = touch(VmConfig {
            guest: GuestConfig::Builtin(guest),
            ..cfg
        })?;
        emit(
            json_out,
            &json!({
                "bench": "faults",
                "fault_around": name,
                "workload": guest.name(),
                "faults": r.faults_tracked,
                "pages": r.pages_tracked,
                "pages_touched": r.pages_touched,
                "seconds": secs,
                "pages_per_fault": r.pages_tracked as f64 / r.faults_tracked.max(1) as f64,
                "wasted_pages": r.stats.wasted_pages,
                "memory_bytes": memory,
            }),
        );
        Ok(secs)
    };
    let base = |fa: u64| VmConfig {
        fault_around: fa,
        ..self::base(memory, 1, Guest::Touch)
    };
    let off = row("off", Guest::Touch, base(0))?;
    let adaptive = row(
        "adaptive",
        Guest::Touch,
        base(crate::fault::MAX_FAULT_AROUND),
    )?;
    let huge = match crate::memory::reserve_huge_pages(memory / (2 << 20) + 1) {
        Ok(()) => Some(row(
            "2M",
            Guest::Touch,
            VmConfig {
                backing: crate::memory::Backing::Hugetlbfs,
                ..base(0)
            },
        )?),
        Err(why) => {
            emit(
                json_out,
                &json!({"bench": "faults", "fault_around": "2M", "skipped": why}),
            );
            None
        }
    };
    let sparse_pages = memory / 4096 / 16;
    let sparse = |fa| VmConfig {
        work_pages: Some(sparse_pages),
        ..base(fa)
    };
    let sparse_off = row("off", Guest::Sparse, sparse(0))?;
    let sparse_adaptive = row(
        "adaptive",
        Guest::Sparse,
        sparse(crate::fault::MAX_FAULT_AROUND),
    )?;
    emit(
        json_out,
        &json!({
            "bench": "faults",
            "fault_around_summary": true,
            "sequential_speedup_adaptive": off / adaptive,
            "sequential_speedup_2m": huge.map(|h| off / h),
            "sparse_slowdown_adaptive": sparse_adaptive / sparse_off,
        }),
    );
    Ok(())
}

/// Options of `odpvm bench rnic`.
#[derive(Clone, Debug)]
pub struct RnicBench {
    /// Message size for the bandwidth runs.
    pub msg: u64,
    /// Bytes moved per bandwidth measurement.
    pub total: u64,
    /// Memory budget for the ODP / re-register / copy comparison (the
    /// working set is four times this).
    pub budget: u64,
    /// Invalidations timed per configuration.
    pub invalidations: usize,
    pub json: bool,
}

impl Default for RnicBench {
    fn default() -> Self {
        RnicBench {
            msg: 64 << 10,
            total: 2 << 30,
            budget: 16 << 20,
            invalidations: 5000,
            json: false,
        }
    }
}

mod rnic_bench {
    use super::*;
    use mmu::{Config as MmuConfig, Mmu, RegionSpec, PAGE_SIZE};
    use rdma_passthrough::*;
    use std::sync::Arc;

    pub(super) const ODP: Access = Access(Access::ALL_REMOTE.0 | Access::ON_DEMAND.0);

    /// Populated process memory as an RNIC address space (iova = address).
    pub(super) struct Space {
        pub base: u64,
        pub mmu: Arc<Mmu>,
        pub space: Arc<AddressSpace>,
    }

    pub(super) fn space(len: u64) -> Result<Space, String> {
        // Kept for the process lifetime (MRs of the bench refer to it).
        let base = crate::memory::map_anonymous(len, true)?;
        let mmu = Mmu::new(MmuConfig::default()).map_err(|e| e.to_string())?;
        mmu.add_region(RegionSpec {
            name: "bench".into(),
            gpa: base,
            size: len,
            hva: base,
        })
        .map_err(|e| e.to_string())?;
        let space = AddressSpace::new(
            "bench",
            mmu.clone(),
            Arc::new(mmu::DirectResolver::new(mmu.clone())),
        );
        Ok(Space { base, mmu, space })
    }

    pub(super) struct Link {
        pub a: Qp,
        pub cq: Cq,
        _b: Qp,
        _bcq: Cq,
    }

    pub(super) fn link(rnic: Arc<EmulatedRnic>, pd: &Pd) -> Result<Link, String> {
        let cq = rnic.create_cq(1 << 16);
        let bcq = rnic.create_cq(1 << 16);
        let caps = QpCaps {
            max_send_wr: 1024,
            ..QpCaps::default()
        };
        let a = rnic
            .create_qp(pd, &cq, &cq, caps)
            .map_err(|e| e.to_string())?;
        let b = rnic
            .create_qp(pd, &bcq, &bcq, caps)
            .map_err(|e| e.to_string())?;
        rnic.connect(&a, &b);
        Ok(Link {
            a,
            cq,
            _b: b,
            _bcq: bcq,
        })
    }

    /// RDMA WRITE `total` bytes in `msg`-sized messages from `src` to `dst`
    /// (cycling through `span` bytes of each), `depth` in flight.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_stream(
        l: &Link,
        src: (u64, u32),
        dst: (u64, u32),
        span: u64,
        msg: u64,
        total: u64,
        depth: usize,
    ) -> Result<f64, String> {
        let n = total / msg;
        let t0 = Instant::now();
        let (mut posted, mut done) = (0u64, 0u64);
        while done < n {
            while posted < n && posted - done < depth as u64 {
                let off = (posted * msg) % span;
                l.a.post_send(SendWr {
                    wr_id: posted,
                    opcode: Opcode::RdmaWrite {
                        remote_addr: dst.0 + off,
                        rkey: dst.1,
                    },
                    sges: vec![Sge {
                        addr: src.0 + off,
                        length: msg as u32,
                        lkey: src.1,
                    }],
                    signaled: true,
                })
                .map_err(|e| e.to_string())?;
                posted += 1;
            }
            // Short spin: the device and page-fault threads need the cores.
            for wc in
                l.cq.wait(1, Duration::from_micros(50), Duration::from_secs(30))
            {
                if wc.status != WcStatus::Success {
                    return Err(format!("write failed: {wc:?}"));
                }
                done += 1;
            }
        }
        Ok(t0.elapsed().as_secs_f64())
    }

    pub(super) fn gbps(bytes: u64, secs: f64) -> f64 {
        bytes as f64 * 8.0 / secs / 1e9
    }

    pub(super) fn p(v: &mut [u64], q: f64) -> u64 {
        v.sort_unstable();
        v[((v.len() as f64 - 1.0) * q) as usize]
    }

    pub(super) const _PAGE: u64 = PAGE_SIZE;
}

/// `odpvm bench rnic`: emulated-RNIC bandwidth against memcpy, the
/// invalidation round trip, one invalidation fanned out to KVM and the
/// RNIC, and ODP against re-registration and bounce copies for a working
/// set four times a memory budget. Bandwidths are in Gb/s (perftest's unit).
pub fn rnic(o: &RnicBench) -> Result<(), String> {
    use rdma_passthrough::*;
    use rnic_bench::*;
    let mut all = serde_json::Map::new();
    let mut out = |v: Value| {
        if let Value::Object(m) = &v {
            for (k, x) in m {
                if k != "part" {
                    all.insert(k.clone(), x.clone());
                }
            }
        }
        emit(o.json, &v);
    };

    // 1. Bandwidth: 64 MiB source and destination ODP MRs, prefetched.
    let span = 64u64 << 20;
    let s = space(3 * span)?;
    let rnic = EmulatedRnic::new(RnicConfig::default());
    let pd = rnic.alloc_pd(s.space.clone());
    let src = rnic
        .reg_mr(&pd, s.base, span, ODP)
        .map_err(|e| e.to_string())?;
    let dst = rnic
        .reg_mr(&pd, s.base + span, span, ODP)
        .map_err(|e| e.to_string())?;
    for mr in [&src, &dst] {
        mr.advise(
            Advice::PrefetchWrite,
            ADVISE_FLAG_FLUSH,
            &[Sge {
                addr: mr.iova(),
                length: span as u32,
                lkey: mr.lkey(),
            }],
        )
        .map_err(|e| e.to_string())?;
    }
    let l = link(rnic.clone(), &pd)?;
    let secs = write_stream(
        &l,
        (s.base, src.lkey()),
        (s.base + span, dst.rkey()),
        span,
        o.msg,
        o.total,
        32,
    )?;
    let write = gbps(o.total, secs);
    let t0 = Instant::now();
    let mut off = 0;
    for _ in 0..o.total / o.msg {
        // SAFETY: both ranges lie inside the bench mapping and do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (s.base + off) as *const u8,
                (s.base + span + off) as *mut u8,
                o.msg as usize,
            )
        };
        off = (off + o.msg) % span;
    }
    let memcpy = gbps(o.total, t0.elapsed().as_secs_f64());
    out(
        json!({"bench": "rnic", "part": "write_bw", "msg_bytes": o.msg, "write_bw_gbps": write,
        "memcpy_gbps": memcpy, "write_over_memcpy": write / memcpy}),
    );

    // 2. Invalidation round trip (device polling by default, then a
    // device that sleeps between commands).
    let rtt = |rnic: &Arc<EmulatedRnic>, mr: &Mr| -> Result<(u64, u64), String> {
        rnic.reset_histograms();
        for i in 0..o.invalidations as u64 {
            let page = mr.iova() + (i % 4096) * 4096;
            mr.advise(
                Advice::Prefetch,
                ADVISE_FLAG_FLUSH,
                &[Sge {
                    addr: page,
                    length: 4096,
                    lkey: mr.lkey(),
                }],
            )
            .map_err(|e| e.to_string())?;
            s.mmu.invalidate(page, 4096).map_err(|e| e.to_string())?;
        }
        let h = rnic.stats().invalidate_rtt_ns;
        Ok((h.p50, h.p99))
    };
    let (p50, p99) = rtt(&rnic, &src)?;
    drop((src, dst, l, pd));
    let sleepy = EmulatedRnic::new(RnicConfig {
        poll: Duration::ZERO,
        ..RnicConfig::default()
    });
    let spd = sleepy.alloc_pd(s.space.clone());
    let smr = sleepy
        .reg_mr(&spd, s.base, span, ODP)
        .map_err(|e| e.to_string())?;
    let (sp50, sp99) = rtt(&sleepy, &smr)?;
    drop((smr, spd, sleepy));
    out(
        json!({"bench": "rnic", "part": "invalidate", "invalidate_rtt_ns_p50": p50,
        "invalidate_rtt_ns_p99": p99, "sleeping_device_rtt_ns_p50": sp50,
        "sleeping_device_rtt_ns_p99": sp99}),
    );

    // 3. Working set four times the memory budget.
    let b = o.budget;
    let ws = 4 * b;
    let w = space(ws + 2 * b)?;
    let wpd = rnic.alloc_pd(w.space.clone());
    let dst = rnic
        .reg_mr(&wpd, w.base + ws, b, Access::ALL_REMOTE)
        .map_err(|e| e.to_string())?;
    let bounce = rnic
        .reg_mr(&wpd, w.base + ws + b, b, Access::ALL_REMOTE)
        .map_err(|e| e.to_string())?;
    let wl = link(rnic.clone(), &wpd)?;
    let passes = 4u64;
    let moved = passes * ws;
    // ODP: one MR over everything; each window is released after use.
    // Device faults map pages on first use; with `prefetch`, the next
    // window is advised (asynchronously) while the current one moves.
    let odp_run = |prefetch: bool| -> Result<f64, String> {
        let odp_mr = rnic
            .reg_mr(&wpd, w.base, ws, ODP)
            .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        for pass in 0..passes {
            for win in 0..4u64 {
                let base = w.base + win * b;
                if prefetch && (pass, win) != (passes - 1, 3) {
                    let next = w.base + ((win + 1) % 4) * b;
                    odp_mr
                        .advise(
                            Advice::PrefetchWrite,
                            0,
                            &[Sge {
                                addr: next,
                                length: b as u32,
                                lkey: odp_mr.lkey(),
                            }],
                        )
                        .map_err(|e| e.to_string())?;
                }
                write_stream(
                    &wl,
                    (base, odp_mr.lkey()),
                    (dst.iova(), dst.rkey()),
                    b,
                    o.msg,
                    b,
                    32,
                )?;
                w.mmu.invalidate(base, b).map_err(|e| e.to_string())?;
            }
        }
        Ok(gbps(moved, t0.elapsed().as_secs_f64()))
    };
    // The first window of each run starts unmapped either way.
    // Re-register: pin (mlock + translate) each window, use it, unpin.
    let rereg_run = || -> Result<f64, String> {
        let t0 = Instant::now();
        for _ in 0..passes {
            for win in 0..4 {
                let base = w.base + win * b;
                let mr = rnic
                    .reg_mr(&wpd, base, b, Access::ALL_REMOTE)
                    .map_err(|e| e.to_string())?;
                write_stream(
                    &wl,
                    (base, mr.lkey()),
                    (dst.iova(), dst.rkey()),
                    b,
                    o.msg,
                    b,
                    32,
                )?;
                drop(mr);
            }
        }
        Ok(gbps(moved, t0.elapsed().as_secs_f64()))
    };
    // Copy into one registered bounce buffer.
    let copy_run = || -> Result<f64, String> {
        let t0 = Instant::now();
        for _ in 0..passes {
            for win in 0..4 {
                let base = w.base + win * b;
                // SAFETY: source window and bounce buffer are disjoint parts of
                // the bench mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        base as *const u8,
                        bounce.iova() as *mut u8,
                        b as usize,
                    )
                };
                write_stream(
                    &wl,
                    (bounce.iova(), bounce.lkey()),
                    (dst.iova(), dst.rkey()),
                    b,
                    o.msg,
                    b,
                    32,
                )?;
            }
        }
        Ok(gbps(moved, t0.elapsed().as_secs_f64()))
    }; // Interleaved repetitions, medians: this host is noisy.
    let (mut odp_v, mut plain_v, mut rereg_v, mut copy_v) = (vec![], vec![], vec![], vec![]);
    for _ in 0..3 {
        plain_v.push(odp_run(false)?);
        odp_v.push(odp_run(true)?);
        rereg_v.push(rereg_run()?);
        copy_v.push(copy_run()?);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (odp, odp_plain, rereg, copy) = (
        med(&mut odp_v),
        med(&mut plain_v),
        med(&mut rereg_v),
        med(&mut copy_v),
    );
    out(
        json!({"bench": "rnic", "part": "budget", "budget_bytes": b, "working_set_bytes": ws,
        "odp_gbps": odp, "odp_no_prefetch_gbps": odp_plain, "rereg_gbps": rereg, "copy_gbps": copy,
        "odp_over_rereg": odp / rereg,
        "odp_over_copy": odp / copy}),
    );
    drop((dst, bounce, wl, wpd));

    // 4. Fan-out: one invalidation to KVM alone, the RNIC alone, both.
    // The VM's own RNIC stays off: the only RNIC mirror is the one timed.
    let mut vm = Vm::new(VmConfig {
        rnic: crate::vm::RnicChoice::None,
        ..base(64 << 20, 1, Guest::Idle)
    })
    .map_err(|e| e.to_string())?;
    let h = vm.handle();
    vm.start().map_err(|e| e.to_string())?;
    let gspace = h.address_space("guest");
    let ram = crate::layout::PAYLOAD_RAM_GPA;
    let n = o.invalidations.min(2000);
    let range = 16 * 4096u64;
    let time_invalidations = |mmu: &Arc<mmu::Mmu>, prep: &dyn Fn(u64) -> Result<(), String>| {
        let mut v = Vec::with_capacity(n);
        for i in 0..n as u64 {
            let gpa = ram + (i % 256) * range;
            prep(gpa)?;
            let t0 = Instant::now();
            mmu.invalidate(gpa, range).map_err(|e| e.to_string())?;
            v.push(t0.elapsed().as_nanos() as u64);
        }
        Ok::<_, String>(v)
    };
    let populate = |gpa: u64| {
        gspace
            .resolver
            .resolve(gpa, range, true)
            .map_err(|e| e.to_string())
    };
    let mut kvm = time_invalidations(&gspace.mmu, &populate)?;
    let gpd = rnic.alloc_pd(gspace.clone());
    let gmr = rnic
        .reg_mr(&gpd, 0, u64::MAX, ODP)
        .map_err(|e| e.to_string())?;
    let map_both = |gpa: u64| {
        gmr.advise(
            Advice::PrefetchWrite,
            ADVISE_FLAG_FLUSH,
            &[Sge {
                addr: gpa,
                length: range as u32,
                lkey: gmr.lkey(),
            }],
        )
        .map_err(|e| e.to_string())
    };
    let mut both = time_invalidations(&gspace.mmu, &map_both)?;
    drop(gmr);
    h.shutdown();
    vm.wait(Some(Duration::from_secs(30)));
    let pmr = rnic
        .reg_mr(&rnic.alloc_pd(s.space.clone()), s.base, span, ODP)
        .map_err(|e| e.to_string())?;
    let map_rnic = |gpa: u64| {
        let addr = s.base + (gpa - ram);
        pmr.advise(
            Advice::PrefetchWrite,
            ADVISE_FLAG_FLUSH,
            &[Sge {
                addr,
                length: range as u32,
                lkey: pmr.lkey(),
            }],
        )
        .map_err(|e| e.to_string())
    };
    let mut rn = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let gpa = ram + (i % 256) * range;
        map_rnic(gpa)?;
        let t0 = Instant::now();
        s.mmu
            .invalidate(s.base + (gpa - ram), range)
            .map_err(|e| e.to_string())?;
        rn.push(t0.elapsed().as_nanos() as u64);
    }
    out(
        json!({"bench": "rnic", "part": "fanout", "range_bytes": range,
        "fanout_kvm_ns_p50": p(&mut kvm, 0.5), "fanout_rnic_ns_p50": p(&mut rn, 0.5),
        "fanout_ns_p50": p(&mut both, 0.5), "fanout_ns_p99": p(&mut both, 0.99)}),
    );

    let mut summary = Value::Object(all);
    summary["bench"] = json!("rnic");
    summary["summary"] = json!(true);
    emit(o.json, &summary);
    Ok(())
}
