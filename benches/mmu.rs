//! Criterion benchmarks of the mmu protocol: teardown by generation against
//! the O(n) walk (one counting mirror subscribed, as in the `mmu` teardown
//! example; here with warm caches, right after the fill), and the fault
//! path under each lock policy with a concurrent invalidator.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use odpvm::mmu::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const GIB: u64 = 1 << 30;

/// Counts notices: O(1) per notice, like a generation-stamped device table.
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

fn filled(size: u64) -> Arc<Mmu> {
    let m = Mmu::new(Config::default()).unwrap();
    m.add_region(RegionSpec {
        name: "ram".into(),
        gpa: 0,
        size,
        hva: 1 << 40,
    })
    .unwrap();
    m.register_mirror(Arc::new(Counter(AtomicU64::new(0))));
    let mut gpa = 0;
    let mut out = Vec::with_capacity(512);
    while gpa < size {
        let t = m.read_begin(gpa, HUGE_PAGE_SIZE).unwrap();
        out.clear();
        out.extend((0..512).map(|i| {
            let g = gpa + i * PAGE_SIZE;
            Translation::small(g, t.host_addr(g).unwrap())
        }));
        m.install(&t, &out).unwrap();
        gpa += HUGE_PAGE_SIZE;
    }
    m
}

fn teardown(c: &mut Criterion) {
    let mut g = c.benchmark_group("teardown");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for size in [GIB / 4, GIB, 4 * GIB] {
        g.bench_with_input(
            BenchmarkId::new("generation", size >> 20),
            &size,
            |b, &size| {
                b.iter_batched(
                    || filled(size),
                    |m| {
                        m.teardown_all().unwrap();
                        m
                    },
                    BatchSize::PerIteration,
                )
            },
        );
        g.bench_with_input(BenchmarkId::new("walk", size >> 20), &size, |b, &size| {
            b.iter_batched(
                || filled(size),
                |m| {
                    m.teardown_all_by_walk().unwrap();
                    m
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn fault_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault_with_invalidator");
    for policy in [LockPolicy::Spin, LockPolicy::Mutex] {
        let m = Mmu::new(Config {
            lock: policy,
            ..Config::default()
        })
        .unwrap();
        m.add_region(RegionSpec {
            name: "ram".into(),
            gpa: 0,
            size: GIB,
            hva: 1 << 40,
        })
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let inv = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut page = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    m.invalidate((page % 4096) * 64 * PAGE_SIZE, 64 * PAGE_SIZE)
                        .unwrap();
                    page += 7;
                }
            })
        };
        let mut page = 0u64;
        g.bench_function(policy.as_str(), |b| {
            b.iter(|| {
                page = (page + 1) % (GIB / PAGE_SIZE);
                let gpa = page * PAGE_SIZE;
                m.fault_in(gpa, PAGE_SIZE, |t, out| {
                    out.push(Translation::small(gpa, t.host_addr(gpa).unwrap()));
                    Ok(())
                })
                .unwrap()
            })
        });
        stop.store(true, Ordering::Relaxed);
        inv.join().unwrap();
    }
    g.finish();
}

criterion_group!(benches, teardown, fault_path);
criterion_main!(benches);
