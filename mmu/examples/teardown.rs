//! Teardown cost: generation bump (O(1)) against the zap-everything walk
//! (O(n)), for tables of any size, plus the reclaimer's lock holds and what
//! a concurrent fault waits meanwhile.
//!
//! cargo run --release -p mmu --example teardown -- --sizes 1G,64G --json

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
    /// Lock policy: spin or mutex.
    #[arg(long, default_value = "spin")]
    lock: LockPolicy,
    /// Repetitions per size (medians are reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Leaves detached per reclaimer lock hold.
    #[arg(long, default_value_t = 10)]
    reclaim_batch: usize,
    /// Print one JSON object per size instead of a table.
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

/// Stream through a buffer larger than the last-level cache so every
/// measurement starts equally cold, whatever the previous fill touched.
fn evict_caches(buf: &mut [u8]) {
    for i in (0..buf.len()).step_by(64) {
        buf[i] = buf[i].wrapping_add(1);
    }
    std::hint::black_box(&buf);
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Fault latencies of a concurrent prober while `phase` runs.
fn with_prober<T>(m: &Arc<Mmu>, phase: impl FnOnce() -> T) -> (T, Histogram) {
    let stop = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Histogram::new());
    let prober = {
        let (m, stop, hist) = (m.clone(), stop.clone(), hist.clone());
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
                hist.record(t0.elapsed().as_nanos() as u64);
                page += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(2));
    let r = phase();
    stop.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    let hist = Arc::try_unwrap(hist).unwrap_or_default();
    (r, hist)
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
    if !args.json {
        println!(
            "{:>8} {:>11} {:>12} {:>14} {:>9} {:>15} {:>18} {:>16}",
            "size",
            "entries",
            "gen_ns",
            "walk_ns",
            "walk/gen",
            "reclaim p99.9",
            "fault max reclaim",
            "fault max walk"
        );
    }
    for size in sizes {
        let m = Mmu::new(Config {
            lock: args.lock,
            reclaim_batch: args.reclaim_batch,
            ..Config::default()
        })
        .unwrap();
        m.add_region(RegionSpec {
            name: "probe".into(),
            gpa: PROBE_GPA,
            size: PROBE_PAGES * PAGE_SIZE,
            hva: HVA,
        })
        .unwrap();
        m.add_region(RegionSpec {
            name: "ram".into(),
            gpa: BASE,
            size,
            hva: HVA + BASE,
        })
        .unwrap();
        let counter = Arc::new(Counter(AtomicU64::new(0)));
        m.register_mirror(counter.clone());
        let reps = args.reps.max(1);
        let (mut gen_ns, mut walk_ns) = (Vec::new(), Vec::new());
        let reclaim_hold = Histogram::new();
        let (mut fault_max_reclaim, mut fault_max_walk) = (0u64, 0u64);
        let mut evict = vec![0u8; 128 << 20];
        for _ in 0..reps {
            fill(&m, size);
            m.stats().reset_histograms();
            evict_caches(&mut evict);
            gen_ns.push(m.teardown_all().unwrap().ns);
            let ((), probe) = with_prober(&m, || {
                // The background reclaimer frees the old generation while
                // the prober keeps faulting.
                while m.reclaim_pending() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            fault_max_reclaim = fault_max_reclaim.max(probe.summary().max);
            reclaim_hold.merge_from(m.stats().reclaim_holds());
            fill(&m, size);
            evict_caches(&mut evict);
            let ((), probe) = with_prober(&m, || {
                walk_ns.push(m.teardown_all_by_walk().unwrap().ns);
            });
            fault_max_walk = fault_max_walk.max(probe.summary().max);
            while m.reclaim_pending() {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let entries = size / PAGE_SIZE;
        let samples = gen_ns.clone();
        let (g, w) = (median(&mut gen_ns), median(&mut walk_ns));
        let r = reclaim_hold.summary();
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "size_bytes": size,
                    "entries": entries,
                    "gen_teardown_ns": g,
                    "gen_teardown_ns_samples": samples,
                    "walk_teardown_ns": w,
                    "walk_over_gen": w as f64 / g.max(1) as f64,
                    "reclaim_hold_ns_p999": r.p999,
                    "reclaim_hold_ns_max": r.max,
                    "reclaim_holds": r.count,
                    "fault_ns_max_during_reclaim": fault_max_reclaim,
                    "fault_ns_max_during_walk": fault_max_walk,
                    "mirror_notices": counter.0.load(Ordering::Relaxed),
                    "reps": reps,
                    "lock": args.lock.as_str(),
                })
            );
        } else {
            println!(
                "{:>8} {:>11} {:>12} {:>14} {:>9.0} {:>15} {:>18} {:>16}",
                human(size),
                entries,
                g,
                w,
                w as f64 / g.max(1) as f64,
                r.p999,
                fault_max_reclaim,
                fault_max_walk
            );
        }
    }
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{}G", b >> 30)
    } else {
        format!("{}M", b >> 20)
    }
}
