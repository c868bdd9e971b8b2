//! `odpvm bench rnic`.

use super::{base, emit};
use crate::payload::Guest;
use crate::vm::{Vm, VmConfig};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        emit(o.json, &v)
    };
    let span = 64u64 << 20;
    let s = space(3 * span)?;
    let rnic = EmulatedRnic::new(RnicConfig::default());
    out(write_bw(o, &s, &rnic, span)?)?;
    out(invalidate_rtt(o, &s, &rnic, span)?)?;
    out(budget(o, &rnic)?)?;
    out(fanout(o, &s, &rnic, span)?)?;
    let mut summary = Value::Object(all);
    summary["bench"] = json!("rnic");
    summary["summary"] = json!(true);
    emit(o.json, &summary)?;
    Ok(())
}

/// Bandwidth: 64 MiB source and destination ODP MRs, prefetched, against
/// memcpy of the same bytes.
fn write_bw(
    o: &RnicBench,
    s: &rnic_bench::Space,
    rnic: &Arc<rdma_passthrough::EmulatedRnic>,
    span: u64,
) -> Result<Value, String> {
    use rdma_passthrough::*;
    use rnic_bench::*;
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
    Ok(
        json!({"bench": "rnic", "part": "write_bw", "msg_bytes": o.msg, "write_bw_gbps": write,
        "memcpy_gbps": memcpy, "write_over_memcpy": write / memcpy}),
    )
}

/// Invalidation round trip p50/p99 of one page mapped in an MR on `rnic`.
fn rtt_of(
    o: &RnicBench,
    s: &rnic_bench::Space,
    rnic: &Arc<rdma_passthrough::EmulatedRnic>,
    span: u64,
) -> Result<(u64, u64), String> {
    use rdma_passthrough::*;
    use rnic_bench::*;
    let pd = rnic.alloc_pd(s.space.clone());
    let mr = rnic
        .reg_mr(&pd, s.base, span, ODP)
        .map_err(|e| e.to_string())?;
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
}

/// Invalidation round trip: the polling device (default), then a device
/// that sleeps between commands.
fn invalidate_rtt(
    o: &RnicBench,
    s: &rnic_bench::Space,
    rnic: &Arc<rdma_passthrough::EmulatedRnic>,
    span: u64,
) -> Result<Value, String> {
    use rdma_passthrough::*;
    let (p50, p99) = rtt_of(o, s, rnic, span)?;
    let sleepy = EmulatedRnic::new(RnicConfig {
        poll: Duration::ZERO,
        ..RnicConfig::default()
    });
    let (sp50, sp99) = rtt_of(o, s, &sleepy, span)?;
    Ok(
        json!({"bench": "rnic", "part": "invalidate", "invalidate_rtt_ns_p50": p50,
        "invalidate_rtt_ns_p99": p99, "sleeping_device_rtt_ns_p50": sp50,
        "sleeping_device_rtt_ns_p99": sp99}),
    )
}

/// The working set of `budget`: four windows of `b` bytes, a registered
/// destination and bounce buffer, and a connected QP pair.
struct Budget {
    w: rnic_bench::Space,
    pd: rdma_passthrough::Pd,
    dst: rdma_passthrough::Mr,
    bounce: rdma_passthrough::Mr,
    link: rnic_bench::Link,
    b: u64,
    msg: u64,
}

/// Passes over the working set per run.
const BUDGET_PASSES: u64 = 4;

impl Budget {
    fn moved(&self) -> u64 {
        BUDGET_PASSES * 4 * self.b
    }

    /// Write window `base` (under `lkey`) to the destination.
    fn send(&self, base: u64, lkey: u32) -> Result<f64, String> {
        rnic_bench::write_stream(
            &self.link,
            (base, lkey),
            (self.dst.iova(), self.dst.rkey()),
            self.b,
            self.msg,
            self.b,
            32,
        )
    }

    /// ODP: one MR over everything; each window is released after use.
    /// Device faults map pages on first use; with `prefetch`, the next
    /// window is advised (asynchronously) while the current one moves.
    fn odp(
        &self,
        rnic: &Arc<rdma_passthrough::EmulatedRnic>,
        prefetch: bool,
    ) -> Result<f64, String> {
        use rdma_passthrough::*;
        let b = self.b;
        let mr = rnic
            .reg_mr(&self.pd, self.w.base, 4 * b, rnic_bench::ODP)
            .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        for pass in 0..BUDGET_PASSES {
            for win in 0..4u64 {
                let base = self.w.base + win * b;
                if prefetch && (pass, win) != (BUDGET_PASSES - 1, 3) {
                    let next = self.w.base + ((win + 1) % 4) * b;
                    mr.advise(
                        Advice::PrefetchWrite,
                        0,
                        &[Sge {
                            addr: next,
                            length: b as u32,
                            lkey: mr.lkey(),
                        }],
                    )
                    .map_err(|e| e.to_string())?;
                }
                self.send(base, mr.lkey())?;
                self.w.mmu.invalidate(base, b).map_err(|e| e.to_string())?;
            }
        }
        Ok(rnic_bench::gbps(self.moved(), t0.elapsed().as_secs_f64()))
    }

    /// Re-register: pin (mlock + translate) each window, use it, unpin.
    fn rereg(&self, rnic: &Arc<rdma_passthrough::EmulatedRnic>) -> Result<f64, String> {
        let t0 = Instant::now();
        for _ in 0..BUDGET_PASSES {
            for win in 0..4 {
                let base = self.w.base + win * self.b;
                let mr = rnic
                    .reg_mr(&self.pd, base, self.b, rdma_passthrough::Access::ALL_REMOTE)
                    .map_err(|e| e.to_string())?;
                self.send(base, mr.lkey())?;
            }
        }
        Ok(rnic_bench::gbps(self.moved(), t0.elapsed().as_secs_f64()))
    }

    /// Copy each window into one registered bounce buffer.
    fn copy(&self) -> Result<f64, String> {
        let t0 = Instant::now();
        for _ in 0..BUDGET_PASSES {
            for win in 0..4 {
                let base = self.w.base + win * self.b;
                // SAFETY: source window and bounce buffer are disjoint parts
                // of the bench mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        base as *const u8,
                        self.bounce.iova() as *mut u8,
                        self.b as usize,
                    )
                };
                self.send(self.bounce.iova(), self.bounce.lkey())?;
            }
        }
        Ok(rnic_bench::gbps(self.moved(), t0.elapsed().as_secs_f64()))
    }
}

/// A working set four times the memory budget: ODP (with and without
/// prefetching) against re-registration and bounce copies. Interleaved
/// repetitions, medians: this host is noisy. The first window of each run
/// starts unmapped either way.
fn budget(o: &RnicBench, rnic: &Arc<rdma_passthrough::EmulatedRnic>) -> Result<Value, String> {
    use rdma_passthrough::*;
    use rnic_bench::*;
    let b = o.budget;
    let ws = 4 * b;
    let w = space(ws + 2 * b)?;
    let pd = rnic.alloc_pd(w.space.clone());
    let dst = rnic
        .reg_mr(&pd, w.base + ws, b, Access::ALL_REMOTE)
        .map_err(|e| e.to_string())?;
    let bounce = rnic
        .reg_mr(&pd, w.base + ws + b, b, Access::ALL_REMOTE)
        .map_err(|e| e.to_string())?;
    let link = link(rnic.clone(), &pd)?;
    let ctx = Budget {
        w,
        pd,
        dst,
        bounce,
        link,
        b,
        msg: o.msg,
    };
    let (mut odp_v, mut plain_v, mut rereg_v, mut copy_v) = (vec![], vec![], vec![], vec![]);
    for _ in 0..3 {
        plain_v.push(ctx.odp(rnic, false)?);
        odp_v.push(ctx.odp(rnic, true)?);
        rereg_v.push(ctx.rereg(rnic)?);
        copy_v.push(ctx.copy()?);
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
    Ok(
        json!({"bench": "rnic", "part": "budget", "budget_bytes": b, "working_set_bytes": ws,
        "odp_gbps": odp, "odp_no_prefetch_gbps": odp_plain, "rereg_gbps": rereg, "copy_gbps": copy,
        "odp_over_rereg": odp / rereg,
        "odp_over_copy": odp / copy}),
    )
}

/// Fan-out: one invalidation to KVM alone, the RNIC alone, both. The VM's
/// own RNIC stays off: the only RNIC mirror is the one timed.
fn fanout(
    o: &RnicBench,
    s: &rnic_bench::Space,
    rnic: &Arc<rdma_passthrough::EmulatedRnic>,
    span: u64,
) -> Result<Value, String> {
    use rdma_passthrough::*;
    use rnic_bench::*;
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
    Ok(
        json!({"bench": "rnic", "part": "fanout", "range_bytes": range,
        "fanout_kvm_ns_p50": p(&mut kvm, 0.5), "fanout_rnic_ns_p50": p(&mut rn, 0.5),
        "fanout_ns_p50": p(&mut both, 0.5), "fanout_ns_p99": p(&mut both, 0.99)}),
    )
}
