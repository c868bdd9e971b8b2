//! `odpvm bench teardown`: whole-VM teardown latency against memory size,
//! as the running guest feels it.
//!
//! For each size, mirror set and method, one VM runs the `writer` guest
//! (stamped writes over all of RAM, round after round, posting a progress
//! mark with its longest page step every 512 pages, and a span mark
//! whenever ~0.25 ms passed since its last mark). Before each repetition
//! the guest has written every page since the last teardown; then the
//! bench times the method and reads:
//!
//! * **stall**: the longest page step any vCPU took across the teardown
//!   (the guest's own TSC; a vCPU that could not run, or whose access
//!   waited for the teardown, shows it here), next to the same figure just
//!   before (`stall_before_ns`: the host's scheduling noise), and split
//!   by the vCPU thread's scheduler account (`crate::schedstat`), read at
//!   the mark after that step and the one two marks before it (a mark's
//!   own exit counts in the next step): `stall_run_delay_ns`, how long the vCPU
//!   waited runnable while another task held its CPU over that span (at
//!   most the step; uncapped: `stall_span_run_delay_ns`, the span itself:
//!   `stall_span_ns`, a little longer than the step), and
//!   `stall_less_run_delay_ns`, the rest: blocked (a fault, a lock) or
//!   working. Tests: `vmm/tests/bench_teardown.rs`
//!   `a_vcpu_kept_off_its_cpu_shows_as_run_delay`,
//!   `a_blocked_vcpu_shows_as_the_rest_not_run_delay`;
//! * **completion**: request → the call returned (every mirror stopped using
//!   old translations); its parts: `prezap_ns` (KVM's zap through a
//!   throwaway memslot, vCPUs running), `kvm_ns` (the KVM mirror's notice:
//!   `retire_ns` moving the pages out, or `pause_ns` for shared backings),
//!   `mmu_rnic_ns` (the rest: the mmu and the RNIC's ODP MR);
//! * **release**: completion → every retired mapping given back;
//! * **progress**: pages/s in the 20 ms from the request against the 20 ms
//!   before (after a teardown every page is fresh and faults again: this
//!   ratio is mostly that refault cost, the same for every method).
//!
//! Methods: `generation` (the product: `VmHandle::teardown`),
//! `invalidate-all` (one range invalidation per RAM region, the O(n) path a
//! balloon would use), `walk` (`Mmu::teardown_all_by_walk`, the mmu's O(n)
//! baseline). Mirrors: `kvm`, `rnic` (an emulated RNIC with an implicit ODP
//! MR prefetched over all RAM; KVM's mirror detached, so RAM stays), and
//! `kvm+rnic`.

use super::emit;
use crate::devices::serial::Sink;
use crate::devices::testdev::ProgressMark;
use crate::payload::Guest;
use crate::vm::{GuestConfig, RnicChoice, Vm, VmConfig, VmHandle};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pages between two progress marks of the `writer` guest.
const PAGES_PER_MARK: u64 = 512;
/// The window progress rates are measured over.
const RATE_WINDOW: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Generation,
    InvalidateAll,
    Walk,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Generation => "generation",
            Method::InvalidateAll => "invalidate-all",
            Method::Walk => "walk",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "generation" => Ok(Method::Generation),
            "invalidate-all" => Ok(Method::InvalidateAll),
            "walk" => Ok(Method::Walk),
            _ => Err(format!(
                "unknown method {s:?} (generation, invalidate-all, walk)"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mirrors {
    Kvm,
    Rnic,
    KvmRnic,
}

impl Mirrors {
    pub fn name(self) -> &'static str {
        match self {
            Mirrors::Kvm => "kvm",
            Mirrors::Rnic => "rnic",
            Mirrors::KvmRnic => "kvm+rnic",
        }
    }
    fn kvm(self) -> bool {
        self != Mirrors::Rnic
    }
    fn rnic(self) -> bool {
        self != Mirrors::Kvm
    }
}

impl std::str::FromStr for Mirrors {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Mirrors::Kvm),
            "rnic" => Ok(Mirrors::Rnic),
            "kvm+rnic" | "rnic+kvm" => Ok(Mirrors::KvmRnic),
            _ => Err(format!("unknown mirrors {s:?} (kvm, rnic, kvm+rnic)")),
        }
    }
}

/// Options of `odpvm bench teardown`.
#[derive(Clone, Debug)]
pub struct TeardownBench {
    pub sizes: Vec<u64>,
    pub methods: Vec<Method>,
    pub mirrors: Vec<Mirrors>,
    pub reps: usize,
    pub vcpus: usize,
    pub pin_vcpus: bool,
    /// Where the threads a lone pinned vCPU waits on run.
    pub helpers: crate::affinity::Helpers,
    pub json: bool,
    pub plot: Option<PathBuf>,
    /// Empty KVM's shadow tables through a throwaway memslot first (for
    /// comparison; off in the product).
    pub prezap: bool,
    /// What backs guest RAM (shared backings take the paused path).
    pub backing: crate::memory::Backing,
}

/// What one repetition measured (nanoseconds unless named otherwise).
#[derive(Clone, Copy, Debug, Default)]
struct Rep {
    stall: u64,
    stall_before: u64,
    stall_run_delay: u64,
    stall_span: u64,
    stall_span_run_delay: u64,
    complete: u64,
    prezap: u64,
    kvm: u64,
    retire: u64,
    chunk_max: u64,
    pause: u64,
    kick: u64,
    mmu_rnic: u64,
    release: u64,
    progress_ratio: f64,
    /// Guest faults the fault thread put off (an invalidation in their
    /// way) or served untracked (a retiring region) during the teardown.
    deferred: u64,
    untracked: u64,
}

/// One row of the output (also what the plot draws).
#[derive(Clone, Debug)]
pub struct Row {
    pub memory_bytes: u64,
    pub method: Method,
    pub mirrors: Mirrors,
    pub stall_ns_p50: u64,
    pub complete_ns_p50: u64,
}

fn quantile(mut v: Vec<u64>, q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[(((v.len() - 1) as f64) * q).round() as usize]
}

fn median_f(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A vCPU's longest page step, and how the span between the two progress
/// marks around it was spent by the vCPU thread (zero where the kernel
/// keeps no account).
#[derive(Clone, Copy, Debug, Default)]
struct Step {
    gap_ns: u64,
    span_ns: u64,
    /// Runnable, waiting for a CPU another task held.
    run_delay_ns: u64,
}

/// The guest's progress marks, kept with their arrival times.
struct Marks {
    all: Vec<ProgressMark>,
    vcpus: usize,
}

impl Marks {
    fn pull(&mut self, h: &VmHandle) {
        self.all.extend(h.take_progress());
    }

    /// Pages written since `t` (all vCPUs; span marks count none). Polled
    /// every few ms over up to a repetition's marks: it reads from the
    /// newest back (marks arrive in time order, give or take vCPUs racing
    /// for the lock, which at worst delays a wait by one poll).
    fn pages_since(&self, t: Instant) -> u64 {
        let n = self
            .all
            .iter()
            .rev()
            .take_while(|m| m.at >= t)
            .filter(|m| m.work)
            .count();
        n as u64 * PAGES_PER_MARK
    }

    fn pages_between(&self, a: Instant, b: Instant) -> u64 {
        let n = self
            .all
            .iter()
            .filter(|m| m.work && m.at >= a && m.at < b)
            .count();
        n as u64 * PAGES_PER_MARK
    }

    /// Whether every vCPU posted a mark after `t`.
    fn all_after(&self, t: Instant) -> bool {
        (0..self.vcpus).all(|v| {
            self.all
                .iter()
                .rev()
                .take_while(|m| m.at > t)
                .any(|m| m.vcpu as usize == v)
        })
    }

    /// The longest page step of any vCPU in the marks whose span (from the
    /// vCPU's previous mark) overlaps `[a, b]`, and how the vCPU thread
    /// spent the time around it.
    fn longest_step(&self, a: Instant, b: Instant) -> Step {
        let mut worst = Step::default();
        for v in 0..self.vcpus {
            // A mark's gap may include the previous mark's own exit (the
            // guest's step clock runs through it), part of which came
            // before the VMM read the account there: the account is taken
            // from the mark before that one.
            let (mut prev, mut before_prev): (Option<&ProgressMark>, Option<&ProgressMark>) =
                (None, None);
            for m in self.all.iter().filter(|m| m.vcpu as usize == v) {
                let from = before_prev.or(prev);
                // Overlap is judged from the same mark: the previous one may
                // be stamped only after a hold in its exit ended.
                let start = from.map_or(m.at, |p| p.at);
                let gap = mmu::ticks_to_ns(u64::from(m.gap) << 10);
                if m.at >= a && start <= b && gap >= worst.gap_ns {
                    let run_delay = from
                        .and_then(|p| Some(m.run_delay_ns?.saturating_sub(p.run_delay_ns?)))
                        .unwrap_or(0);
                    worst = Step {
                        gap_ns: gap,
                        span_ns: (m.at - start).as_nanos() as u64,
                        run_delay_ns: run_delay,
                    };
                }
                before_prev = prev;
                prev = Some(m);
            }
        }
        worst
    }

    /// The longest page step in the marks posted in the `span` before `t`
    /// (ended before it: the host's background noise).
    fn longest_step_before(&self, t: Instant, span: Duration) -> u64 {
        let from = t.checked_sub(span.max(RATE_WINDOW)).unwrap_or(t);
        self.all
            .iter()
            .filter(|m| m.at >= from && m.at < t)
            .map(|m| mmu::ticks_to_ns(u64::from(m.gap) << 10))
            .max()
            .unwrap_or(0)
    }

    /// Forget marks older than `t`.
    fn trim(&mut self, t: Instant) {
        self.all.retain(|m| m.at >= t);
    }
}

/// An emulated RNIC with an implicit ODP MR over guest memory.
struct Nic {
    _nic: Arc<rdma_passthrough::EmulatedRnic>,
    mr: rdma_passthrough::Mr,
    /// RAM regions (gpa, size).
    ram: Vec<(u64, u64)>,
}

impl Nic {
    fn new(h: &VmHandle) -> Result<Nic, String> {
        use rdma_passthrough::*;
        let nic = EmulatedRnic::new(RnicConfig::default());
        let pd = nic.alloc_pd(h.address_space("bench-teardown"));
        let access = Access(Access::ALL_REMOTE.0 | Access::ON_DEMAND.0);
        let mr = nic
            .reg_mr(&pd, 0, u64::MAX, access)
            .map_err(|e| e.to_string())?;
        let ram = h.mmu().regions().iter().map(|r| (r.gpa, r.size)).collect();
        Ok(Nic { _nic: nic, mr, ram })
    }

    /// Map every page of RAM in the MR (the RNIC then caches n entries).
    fn prefetch(&self) -> Result<(), String> {
        use rdma_passthrough::*;
        for &(gpa, size) in &self.ram {
            let mut at = gpa;
            while at < gpa + size {
                let len = (gpa + size - at).min(1 << 30);
                self.mr
                    .advise(
                        Advice::PrefetchWrite,
                        ADVISE_FLAG_FLUSH,
                        &[Sge {
                            addr: at,
                            length: len as u32,
                            lkey: self.mr.lkey(),
                        }],
                    )
                    .map_err(|e| format!("prefetching the RNIC's MR: {e}"))?;
                at += len;
            }
        }
        Ok(())
    }
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Run `method` once; Err on an mmu error.
fn run_method(h: &VmHandle, method: Method) -> Result<(), String> {
    let r = match method {
        Method::Generation => h.teardown().map(|_| ()),
        Method::InvalidateAll => h
            .mmu()
            .regions()
            .iter()
            .try_for_each(|r| h.invalidate(r.gpa, r.size).map(|_| ())),
        Method::Walk => h.mmu().teardown_all_by_walk().map(|_| ()),
    };
    r.map_err(|e| format!("{}: {e}", method.name()))
}

/// One repetition: the guest has written all of RAM; time the method.
fn repetition(h: &VmHandle, marks: &mut Marks, method: Method, memory: u64) -> Result<Rep, String> {
    let all_pages = memory / 4096;
    let mut rep = Rep::default();
    // Every page written since the last teardown: all RAM is mapped.
    let since = Instant::now();
    let limit = Duration::from_secs(60 + memory / (64 << 20));
    wait_until("the guest to write all of RAM", limit, || {
        marks.pull(h);
        marks.pages_since(since) >= all_pages
    })?;
    std::thread::sleep(RATE_WINDOW);
    h.take_teardown_parts();
    let faults = h.stats();
    let t_req = Instant::now();
    run_method(h, method)?;
    let t_done = Instant::now();
    let faults_after = h.stats();
    rep.deferred = faults_after.faults_deferred - faults.faults_deferred;
    rep.untracked = faults_after.faults_untracked - faults.faults_untracked;
    let parts = h.take_teardown_parts();
    rep.complete = (t_done - t_req).as_nanos() as u64;
    rep.prezap = parts.prezap_ns;
    rep.kvm = parts.total_ns;
    rep.retire = parts.retire_ns;
    rep.chunk_max = parts.chunk_max_ns;
    rep.pause = parts.pause_ns;
    rep.kick = parts.kick_ns;
    rep.mmu_rnic = rep.complete.saturating_sub(rep.kvm + rep.prezap);
    // Release: every retired mapping given back.
    wait_until("retired memory to be given back", limit, || {
        h.retired_mappings() == 0
    })?;
    rep.release = (Instant::now() - t_done).as_nanos() as u64;
    // The guest's view: wait until every vCPU stepped past the teardown
    // and the rate window has passed.
    wait_until("the guest to go on after the teardown", limit, || {
        marks.pull(h);
        marks.all_after(t_done) && Instant::now() > t_req + RATE_WINDOW
    })
    .map_err(|e| {
        let last: Vec<_> = (0..marks.vcpus)
            .map(|v| {
                marks
                    .all
                    .iter()
                    .rev()
                    .find(|m| m.vcpu as usize == v)
                    .map(|m| m.at.elapsed())
            })
            .collect();
        format!(
            "{e} (last marks per vCPU: {last:?} ago; finished: {})",
            h.finished()
        )
    })?;
    let step = marks.longest_step(t_req, t_done);
    rep.stall = step.gap_ns;
    // The part of the step the host's scheduler can account for: at most
    // the run delay over the span holding it.
    rep.stall_run_delay = step.run_delay_ns.min(step.gap_ns);
    rep.stall_span = step.span_ns;
    rep.stall_span_run_delay = step.run_delay_ns;
    rep.stall_before = marks.longest_step_before(t_req, t_done - t_req);
    let rate_before = marks.pages_between(t_req - RATE_WINDOW, t_req);
    let rate_during = marks.pages_between(t_req, t_req + RATE_WINDOW);
    rep.progress_ratio = rate_during as f64 / rate_before.max(1) as f64;
    // Let the reclaimer finish before the next repetition.
    wait_until("the mmu's reclaimer", limit, || !h.mmu().reclaim_pending())?;
    marks.trim(t_done);
    Ok(rep)
}

/// One VM per (size, mirrors); every method on it in turn.
fn size_and_mirrors(
    o: &TeardownBench,
    host: &super::host::HostContext,
    memory: u64,
    mirrors: Mirrors,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let cfg = VmConfig {
        guest: GuestConfig::Builtin(Guest::Writer),
        memory,
        vcpus: o.vcpus,
        pin_vcpus: o.pin_vcpus,
        helpers: o.helpers,
        rounds: 0,
        rnic: RnicChoice::None,
        backing: o.backing,
        console: Sink::Buffer(Default::default()),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(cfg).map_err(|e| e.to_string())?;
    let h = vm.handle();
    vm.start().map_err(|e| e.to_string())?;
    let result = (|| -> Result<(), String> {
        let mut nic = if mirrors.rnic() {
            Some(Nic::new(&h)?)
        } else {
            None
        };
        if !mirrors.kvm() {
            h.detach_kvm_mirror().map_err(|e| e.to_string())?;
        }
        h.set_prezap(o.prezap);
        let mut marks = Marks {
            all: Vec::new(),
            vcpus: o.vcpus,
        };
        for &method in &o.methods {
            let mut reps = Vec::new();
            let mut fenced = 0;
            for i in 0..o.reps {
                if let Some(n) = &mut nic {
                    // A slow invalidation gets the MR fenced (the RNIC
                    // stops trusting it): register a new one and go on.
                    if n.prefetch().is_err() {
                        fenced += 1;
                        *n = Nic::new(&h)?;
                        n.prefetch()?;
                    }
                }
                let r = repetition(&h, &mut marks, method, memory)?;
                eprintln!(
                    "  {:>6} MiB {:<14} {:<8} rep {}/{}: stall {:.3} ms ({:.3} of it waiting for a CPU, over {:.1} ms), complete {:.3} ms, release {:.1} ms, faults deferred {} untracked {}",
                    memory >> 20,
                    method.name(),
                    mirrors.name(),
                    i + 1,
                    o.reps,
                    r.stall as f64 / 1e6,
                    r.stall_run_delay as f64 / 1e6,
                    r.stall_span as f64 / 1e6,
                    r.complete as f64 / 1e6,
                    r.release as f64 / 1e6,
                    r.deferred,
                    r.untracked
                );
                reps.push(r);
            }
            let mut row = summarize(memory, method, mirrors, o.backing, &reps);
            row.0["rnic_mr_fenced"] = fenced.into();
            // What else shares the CPUs: the stall over a long window
            // includes it (see `bench::host`).
            row.0["vcpus"] = o.vcpus.into();
            row.0["pin_vcpus"] = o.pin_vcpus.into();
            // Where they ran, not what was asked: with no CPU to spare,
            // several vCPUs or no real-time class they stay apart.
            row.0["helpers"] = h.helpers_placed().map_or("unpinned", |p| p.name()).into();
            row.0["host_cpus"] = host.cpus.into();
            row.0["host_damon_running"] = host.damon_running.into();
            emit(o.json, &row.0)?;
            rows.push(row.1);
        }
        Ok(())
    })();
    h.request_stop();
    let report = vm.wait(Some(Duration::from_secs(120)));
    result?;
    if report.guest_result != crate::vm::GuestResult::Pass {
        return Err(format!(
            "the writer guest found stale pages or lost writes: {:?}",
            report.vcpu_reports
        ));
    }
    Ok(())
}

fn summarize(
    memory: u64,
    method: Method,
    mirrors: Mirrors,
    backing: crate::memory::Backing,
    reps: &[Rep],
) -> (Value, Row) {
    let col = |f: fn(&Rep) -> u64| reps.iter().map(f).collect::<Vec<_>>();
    let p50 = |f: fn(&Rep) -> u64| quantile(col(f), 0.5);
    let p99 = |f: fn(&Rep) -> u64| quantile(col(f), 0.99);
    let v = json!({
        "bench": "teardown",
        "memory_bytes": memory,
        "method": method.name(),
        "mirrors": mirrors.name(),
        "backing": backing.as_str(),
        "reps": reps.len(),
        "stall_ns_p50": p50(|r| r.stall),
        "stall_ns_p99": p99(|r| r.stall),
        "stall_before_ns_p50": p50(|r| r.stall_before),
        "stall_run_delay_ns_p50": p50(|r| r.stall_run_delay),
        "stall_less_run_delay_ns_p50": p50(|r| r.stall - r.stall_run_delay),
        "stall_less_run_delay_ns_p99": p99(|r| r.stall - r.stall_run_delay),
        "stall_span_ns_p50": p50(|r| r.stall_span),
        "stall_span_run_delay_ns_p50": p50(|r| r.stall_span_run_delay),
        "complete_ns_p50": p50(|r| r.complete),
        "complete_ns_p99": p99(|r| r.complete),
        "prezap_ns_p50": p50(|r| r.prezap),
        "kvm_ns_p50": p50(|r| r.kvm),
        "retire_ns_p50": p50(|r| r.retire),
        "retire_chunk_max_ns_p50": p50(|r| r.chunk_max),
        "pause_ns_p50": p50(|r| r.pause),
        "pause_kick_ns_p50": p50(|r| r.kick),
        "mmu_rnic_ns_p50": p50(|r| r.mmu_rnic),
        "release_ns_p50": p50(|r| r.release),
        "faults_deferred_p50": p50(|r| r.deferred),
        "faults_untracked_p50": p50(|r| r.untracked),
        "progress_ratio_p50": median_f(reps.iter().map(|r| r.progress_ratio).collect()),
    });
    let row = Row {
        memory_bytes: memory,
        method,
        mirrors,
        stall_ns_p50: p50(|r| r.stall),
        complete_ns_p50: p50(|r| r.complete),
    };
    (v, row)
}

/// `odpvm bench teardown`.
pub fn teardown(o: &TeardownBench) -> Result<(), String> {
    if o.reps == 0 || o.sizes.is_empty() || o.methods.is_empty() || o.mirrors.is_empty() {
        return Err("--reps, --memory, --methods and --mirrors must not be empty".into());
    }
    let host = super::host::HostContext::read();
    for note in host.notes(o.vcpus, o.pin_vcpus) {
        eprintln!("teardown: note: {note}");
    }
    let mut rows = Vec::new();
    for &memory in &o.sizes {
        for &mirrors in &o.mirrors {
            eprintln!("teardown: {} MiB, mirrors {}", memory >> 20, mirrors.name());
            size_and_mirrors(o, &host, memory, mirrors, &mut rows)?;
        }
    }
    if let Some(path) = &o.plot {
        super::plot::teardown_svg(path, &rows)?;
        eprintln!("teardown: plot written to {}", path.display());
    }
    Ok(())
}
