//! Teardown cost: generation bump (O(1)) against the zap-everything walk
//! (O(n)), for tables of any size, with one counting mirror subscribed.
//! Each generation teardown runs on a freshly filled table with the CPU
//! caches evicted first (as after a running guest), and is timed twice:
//! `ns` as the teardown reports it (until old translations are invisible
//! and the mirror confirmed) and the whole call as its caller sees it;
//! p50 and p99 of both are reported. Then the reclaimer's lock holds and what
//! a concurrent fault waits meanwhile — beside the scheduling delay of an
//! idle control thread measured at the same time, so host preemption is
//! told apart from waits the design causes.
//!
//! cargo run --release -p mmu --example teardown -- --sizes 1G,64G --lock spin,mutex
//!
//! 1 TiB of 4 KiB entries needs about 2.1 GiB of leaves; check free memory
//! first.

use clap::Parser;
use mmu::hist::Histogram;
use mmu::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Measure O(1) generation teardown against the O(n) walk")]
struct Args {
    /// Guest memory sizes to map fully with 4 KiB entries (K, M, G, T suffixes).
    #[arg(long, value_delimiter = ',', default_value = "1G,64G")]
    sizes: Vec<String>,
    /// Lock policies to measure, in turn: spin, mutex or both.
    #[arg(long, value_delimiter = ',', default_value = "spin")]
    lock: Vec<LockPolicy>,
    /// Walk repetitions per size, each with the concurrent-fault probes
    /// during reclaim and during the walk (medians are reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Generation teardowns per size (at least `reps`), each on a freshly
    /// filled table with caches evicted (p50 and p99 are reported). At 1 TiB
    /// each one costs a ~5 s refill.
    #[arg(long, default_value_t = 31)]
    gen_reps: usize,
    /// Leaves detached per reclaimer lock hold.
    #[arg(long, default_value_t = 10)]
    reclaim_batch: usize,
    /// Print one JSON object per (lock, size) instead of tables.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("bad size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mult)
        .filter(|b| *b > 0 && b % HUGE_PAGE_SIZE == 0)
        .ok_or_else(|| format!("size {s:?} must be a positive multiple of 2M"))
}

/// Counts notices; O(1) per notice like a generation-stamped device table.
struct Counter(AtomicU64);
impl Mirror for Counter {
    fn name(&self) -> &str {
        "counter"
    }
    fn invalidate_start(&self, _: &Invalidation) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn invalidate_wait(&self, _: &Invalidation) {}
}

const BASE: u64 = 1 << 40;
const HVA: u64 = 1 << 44;
/// A small region a concurrent "vCPU" keeps faulting in.
const PROBE_GPA: u64 = 0;
const PROBE_PAGES: u64 = 4096;
/// How long the idle control thread sleeps between wake-ups.
const IDLE_SLEEP: Duration = Duration::from_micros(200);

fn fill(m: &Mmu, size: u64) {
    let mut out = Vec::with_capacity(512);
    let mut gpa = BASE;
    while gpa < BASE + size {
        let t = m.read_begin(gpa, HUGE_PAGE_SIZE).unwrap();
        out.clear();
        for i in 0..512 {
            let g = gpa + i * PAGE_SIZE;
            out.push(Translation::small(g, t.host_addr(g).unwrap()));
        }
        m.install(&t, &out).unwrap();
        gpa += HUGE_PAGE_SIZE;
    }
}

/// Keep the measuring thread on the CPU it runs on now, so the caches
/// `evict_caches` empties are the ones the teardown then runs on (a
/// migration to the other core found its caches warm from earlier work:
/// bimodal figures). Best effort: a failure leaves the thread unpinned.
fn pin_to_current_cpu() {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu < 0 {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // inside it (cpu < CPU_SETSIZE, as the kernel numbered it).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Stream through a buffer larger than the last-level cache so every
/// measurement starts equally cold, whatever the previous fill touched.
fn evict_caches(buf: &mut [u8]) {
    for i in (0..buf.len()).step_by(64) {
        buf[i] = buf[i].wrapping_add(1);
    }
    std::hint::black_box(&buf);
}

fn median(v: &mut [u64]) -> u64 {
    quantile(v, 0.5)
}

/// The `q` quantile of the samples (nearest rank; p99 of fewer than 100
/// samples is their maximum).
fn quantile(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    let rank = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Latencies seen while one phase ran: a concurrent fault (the "vCPU"),
/// and how late an idle control thread woke up from a short sleep.
#[derive(Default)]
struct Seen {
    fault: Histogram,
    idle: Histogram,
}

impl Seen {
    fn merge(&self, other: &Seen) {
        self.fault.merge_from(&other.fault);
        self.idle.merge_from(&other.idle);
    }
}

/// Run `phase` with a prober faulting in pages and an idle thread timing
/// its wake-ups.
fn observed<T>(m: &Arc<Mmu>, phase: impl FnOnce() -> T) -> (T, Seen) {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let prober = {
        let (m, stop, seen) = (m.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut page = 0;
            while !stop.load(Ordering::Relaxed) {
                let gpa = PROBE_GPA + (page % PROBE_PAGES) * PAGE_SIZE;
                let t0 = Instant::now();
                m.fault_in(gpa, PAGE_SIZE, |t, out| {
                    out.push(Translation::small(gpa, t.host_addr(gpa)?));
                    Ok(())
                })
                .unwrap();
                seen.fault.record(t0.elapsed().as_nanos() as u64);
                page += 1;
            }
        })
    };
    let idle = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                std::thread::sleep(IDLE_SLEEP);
                let late = t0.elapsed().saturating_sub(IDLE_SLEEP);
                seen.idle.record(late.as_nanos() as u64);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(2));
    let r = phase();
    stop.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    idle.join().unwrap();
    let seen = Arc::try_unwrap(seen).unwrap_or_default();
    (r, seen)
}

fn wait_reclaimed(m: &Mmu) {
    while m.reclaim_pending() {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One (lock policy, size) measurement.
struct Row {
    lock: LockPolicy,
    size: u64,
    /// As the teardown reports it (`TeardownReport::ns`).
    gen_ns: Vec<u64>,
    /// The whole `teardown_all` call, timed by its caller.
    gen_call_ns: Vec<u64>,
    walk_ns: Vec<u64>,
    reclaim_hold: Histogram,
    reclaim: Seen,
    walk: Seen,
    notices: u64,
}

fn measure(args: &Args, lock: LockPolicy, size: u64, evict: &mut [u8]) -> Result<Row, Error> {
    let m = Mmu::new(Config {
        lock,
        reclaim_batch: args.reclaim_batch,
        ..Config::default()
    })?;
    m.add_region(RegionSpec {
        name: "probe".into(),
        gpa: PROBE_GPA,
        size: PROBE_PAGES * PAGE_SIZE,
        hva: HVA,
    })?;
    m.add_region(RegionSpec {
        name: "ram".into(),
        gpa: BASE,
        size,
        hva: HVA + BASE,
    })?;
    let counter = Arc::new(Counter(AtomicU64::new(0)));
    m.register_mirror(counter.clone());
    let mut row = Row {
        lock,
        size,
        gen_ns: Vec::new(),
        gen_call_ns: Vec::new(),
        walk_ns: Vec::new(),
        reclaim_hold: Histogram::new(),
        reclaim: Seen::default(),
        walk: Seen::default(),
        notices: 0,
    };
    let reps = args.reps.max(1);
    for rep in 0..args.gen_reps.max(reps) {
        fill(&m, size);
        m.stats().reset_histograms();
        evict_caches(evict);
        let t0 = ticks();
        let report = m.teardown_all()?;
        row.gen_call_ns.push(ticks_to_ns(ticks().wrapping_sub(t0)));
        row.gen_ns.push(report.ns);
        if rep >= reps {
            wait_reclaimed(&m);
            continue;
        }
        // The background reclaimer frees the old generation while the
        // prober keeps faulting.
        let ((), seen) = observed(&m, || wait_reclaimed(&m));
        row.reclaim.merge(&seen);
        row.reclaim_hold.merge_from(m.stats().reclaim_holds());
        fill(&m, size);
        evict_caches(evict);
        let (walk, seen) = observed(&m, || m.teardown_all_by_walk());
        row.walk_ns.push(walk?.ns);
        row.walk.merge(&seen);
        wait_reclaimed(&m);
    }
    row.notices = counter.0.load(Ordering::Relaxed);
    Ok(row)
}

/// CPU time the background reclaimer threads have used so far, in ns
/// (`/proc/self/task/*/schedstat`), or `None` if that cannot be read.
fn reclaimer_cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != "mmu-reclaim" {
            continue;
        }
        // A thread that exited meanwhile (an mmu dropped) has no file left.
        let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// What an idle mmu's reclaimer costs: it polls for teardowns' kicks
/// instead of being woken (see `RECLAIM_POLL` in the mmu). Returns µs of
/// CPU per second of wall time.
fn idle_reclaimer_cost() -> Result<Option<f64>, Error> {
    let m = Mmu::new(Config::default())?;
    std::thread::sleep(Duration::from_millis(100));
    let (t0, c0) = (Instant::now(), reclaimer_cpu_ns());
    std::thread::sleep(Duration::from_secs(2));
    let (c1, secs) = (reclaimer_cpu_ns(), t0.elapsed().as_secs_f64());
    drop(m);
    Ok(c0
        .zip(c1)
        .map(|(c0, c1)| c1.saturating_sub(c0) as f64 / 1e3 / secs))
}

fn quantiles(h: &Histogram) -> [u64; 4] {
    let s = h.summary();
    [s.p50, s.p99, s.p999, s.max]
}

fn main() {
    let args = Args::parse();
    let sizes: Vec<u64> = match args.sizes.iter().map(|s| parse_size(s)).collect() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("teardown: {e}");
            std::process::exit(2);
        }
    };
    let mut evict = vec![0u8; 128 << 20];
    pin_to_current_cpu();
    let mut rows = Vec::new();
    for &lock in &args.lock {
        for &size in &sizes {
            match measure(&args, lock, size, &mut evict) {
                Ok(row) => rows.push(row),
                Err(e) => {
                    eprintln!("teardown: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let idle = match idle_reclaimer_cost() {
        Ok(idle) => idle,
        Err(e) => {
            eprintln!("teardown: {e}");
            std::process::exit(1);
        }
    };
    if args.json {
        for r in &rows {
            print_json(r);
        }
        println!(
            "{}",
            serde_json::json!({ "idle_reclaimer_cpu_us_per_s": idle })
        );
    } else {
        print_tables(&rows);
        match idle {
            Some(us) => {
                println!("\nidle reclaimer (polling for kicks): {us:.1} µs of CPU per second")
            }
            None => println!("\nidle reclaimer: /proc/self/task/*/schedstat unreadable"),
        }
    }
}

fn print_json(r: &Row) {
    let (mut gen, mut call, mut w) = (r.gen_ns.clone(), r.gen_call_ns.clone(), r.walk_ns.clone());
    let (g, w) = (median(&mut gen), median(&mut w));
    let hold = r.reclaim_hold.summary();
    let q = |h: &Histogram| {
        let [p50, p99, p999, max] = quantiles(h);
        serde_json::json!({"p50": p50, "p99": p99, "p999": p999, "max": max})
    };
    println!(
        "{}",
        serde_json::json!({
            "lock": r.lock.as_str(),
            "size_bytes": r.size,
            "entries": r.size / PAGE_SIZE,
            "gen_teardown_ns": g,
            "gen_teardown_ns_p99": quantile(&mut gen, 0.99),
            "gen_call_ns_p50": median(&mut call),
            "gen_call_ns_p99": quantile(&mut call, 0.99),
            "gen_teardown_ns_samples": r.gen_ns,
            "walk_teardown_ns": w,
            "walk_over_gen": w as f64 / g.max(1) as f64,
            "reclaim_hold_ns_p999": hold.p999,
            "reclaim_hold_ns_max": hold.max,
            "reclaim_holds": hold.count,
            "fault_ns_during_reclaim": q(&r.reclaim.fault),
            "idle_delay_ns_during_reclaim": q(&r.reclaim.idle),
            "fault_ns_during_walk": q(&r.walk.fault),
            "idle_delay_ns_during_walk": q(&r.walk.idle),
            "mirror_notices": r.notices,
            "reps": r.walk_ns.len(),
            "gen_reps": r.gen_ns.len(),
        })
    );
}

fn print_tables(rows: &[Row]) {
    println!(
        "{:>5} {:>6} {:>11} {:>13} {:>13} {:>12} {:>9} {:>13} {:>12}",
        "lock",
        "size",
        "entries",
        "gen_ns p50/99",
        "call p50/99",
        "walk_ns",
        "walk/gen",
        "hold p99.9",
        "hold max"
    );
    let base = rows.first().map(|r| median(&mut r.gen_ns.clone()));
    for r in rows {
        let (g, w) = (
            median(&mut r.gen_ns.clone()),
            median(&mut r.walk_ns.clone()),
        );
        let (mut gen, mut call) = (r.gen_ns.clone(), r.gen_call_ns.clone());
        let hold = r.reclaim_hold.summary();
        println!(
            "{:>5} {:>6} {:>11} {:>13} {:>13} {:>12} {:>9.0} {:>13} {:>12}",
            r.lock.as_str(),
            human(r.size),
            r.size / PAGE_SIZE,
            format!("{g}/{}", quantile(&mut gen, 0.99)),
            format!("{}/{}", median(&mut call), quantile(&mut call, 0.99)),
            w,
            w as f64 / g.max(1) as f64,
            hold.p999,
            hold.max
        );
    }
    if let (Some(base), Some(last)) = (base, rows.last()) {
        let g = median(&mut last.gen_ns.clone());
        println!(
            "gen teardown, last row over first: {:.2}x",
            g as f64 / base.max(1) as f64
        );
    }
    println!();
    println!(
        "{:>5} {:>6} {:>8} | {:>31} | {:>31}",
        "", "", "", "concurrent fault wait, ns", "idle thread wake-up delay, ns"
    );
    println!(
        "{:>5} {:>6} {:>8} | {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7}",
        "lock", "size", "phase", "p50", "p99", "p99.9", "max", "p50", "p99", "p99.9", "max"
    );
    for r in rows {
        for (phase, seen) in [("reclaim", &r.reclaim), ("walk", &r.walk)] {
            let f = quantiles(&seen.fault);
            let i = quantiles(&seen.idle);
            println!(
                "{:>5} {:>6} {:>8} | {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7}",
                r.lock.as_str(),
                human(r.size),
                phase,
                f[0],
                f[1],
                f[2],
                f[3],
                i[0],
                i[1],
                i[2],
                i[3]
            );
        }
    }
}

fn human(b: u64) -> String {
    if b >= 1 << 40 {
        format!("{}T", b >> 40)
    } else if b >= 1 << 30 {
        format!("{}G", b >> 30)
    } else {
        format!("{}M", b >> 20)
    }
}
