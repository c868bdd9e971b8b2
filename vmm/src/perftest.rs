//! perftest-style tables for the guest RDMA workloads, from what each vCPU
//! reported (message count and size, TSC cycles, latency samples).

use serde::Serialize;
use serde_json::Value;

/// One vCPU's figures.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Figures {
    pub vcpu: usize,
    pub bytes: u64,
    pub iterations: u64,
    pub seconds: f64,
    pub bw_avg_gbps: f64,
    pub msg_rate_mpps: f64,
    pub errors: u64,
    pub recoveries: u64,
    pub stale: u64,
    /// Latency (µs), when samples were taken.
    pub t_min_us: f64,
    pub t_max_us: f64,
    pub t_typical_us: f64,
    pub t_avg_us: f64,
    pub t_stdev_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

fn field(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// Figures from one vCPU report (see `Guest::report_fields`).
pub fn figures(vcpu: usize, report: &Value, samples: &[u32]) -> Figures {
    let cycles = field(report, "cycles_lo") | (field(report, "cycles_hi") << 32);
    let seconds = mmu::ticks_to_ns(cycles) as f64 / 1e9;
    let iterations = field(report, "msgs");
    let bytes = field(report, "msg_bytes");
    let mut f = Figures {
        vcpu,
        bytes,
        iterations,
        seconds,
        errors: field(report, "errors"),
        recoveries: field(report, "recoveries"),
        stale: field(report, "stale"),
        ..Default::default()
    };
    if seconds > 0.0 {
        f.bw_avg_gbps = (bytes * iterations) as f64 * 8.0 / seconds / 1e9;
        f.msg_rate_mpps = iterations as f64 / seconds / 1e6;
    }
    if !samples.is_empty() {
        let mut us: Vec<f64> = samples
            .iter()
            .map(|c| mmu::ticks_to_ns(u64::from(*c)) as f64 / 1e3)
            .collect();
        us.sort_by(|a, b| a.total_cmp(b));
        let n = us.len();
        let avg = us.iter().sum::<f64>() / n as f64;
        let var = us.iter().map(|x| (x - avg) * (x - avg)).sum::<f64>() / n as f64;
        let q = |p: f64| us[(((n as f64) * p).ceil() as usize).clamp(1, n) - 1];
        f.t_min_us = us[0];
        f.t_max_us = us[n - 1];
        f.t_typical_us = q(0.5);
        f.t_avg_us = avg;
        f.t_stdev_us = var.sqrt();
        f.p99_us = q(0.99);
        f.p999_us = q(0.999);
    }
    f
}

const RULE: &str =
    "---------------------------------------------------------------------------------------";

/// The table, as perftest prints it.
pub fn table(latency: bool, rows: &[Figures]) -> String {
    let mut s = String::new();
    s.push_str(RULE);
    s.push('\n');
    if latency {
        s.push_str(" #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec]\n");
        for f in rows {
            s.push_str(&format!(
                " {:<6} {:<10}      {:<10.2}     {:<10.2}   {:<10.2}         {:<10.2}     {:<10.2}      {:<10.2}             {:<10.2}\n",
                f.bytes, f.iterations, f.t_min_us, f.t_max_us, f.t_typical_us, f.t_avg_us,
                f.t_stdev_us, f.p99_us, f.p999_us
            ));
        }
    } else {
        s.push_str(
            " #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]\n",
        );
        for f in rows {
            // The guest times the whole run, so peak and average coincide.
            s.push_str(&format!(
                " {:<10} {:<10}     {:<18.2} {:<20.2} {:.6}\n",
                f.bytes, f.iterations, f.bw_avg_gbps, f.bw_avg_gbps, f.msg_rate_mpps
            ));
        }
    }
    s.push_str(RULE);
    s.push('\n');
    s
}
