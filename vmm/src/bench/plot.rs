//! SVG plots of benchmark rows (plotters, SVG backend: no fonts or system
//! libraries needed).

use super::teardown::{Mirrors, Row};
use plotters::prelude::*;
use std::path::Path;

/// Which figure of a row a panel draws.
type Metric = fn(&Row) -> u64;

/// Two log-log panels, guest stall and completion (p50) against memory
/// size, one line per method, for the `kvm+rnic` rows (or the first mirror
/// set measured, if that one was not).
pub fn teardown_svg(path: &Path, rows: &[Row]) -> Result<(), String> {
    let mirrors = if rows.iter().any(|r| r.mirrors == Mirrors::KvmRnic) {
        Mirrors::KvmRnic
    } else {
        match rows.first() {
            Some(r) => r.mirrors,
            None => return Err("nothing measured to plot".into()),
        }
    };
    let rows: Vec<&Row> = rows.iter().filter(|r| r.mirrors == mirrors).collect();
    let mut methods = Vec::new();
    for r in &rows {
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let ms = |ns: u64| (ns as f64 / 1e6).max(1e-3);
    let (xmin, xmax) = rows.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
        (lo.min(gib(r.memory_bytes)), hi.max(gib(r.memory_bytes)))
    });
    let (xmin, xmax) = (xmin / 1.5, xmax * 1.5);
    let err = |e: &dyn std::fmt::Display| format!("plotting to {}: {e}", path.display());
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    let metrics: [(&str, Metric); 2] = [
        ("guest stall p50 (ms)", |r| r.stall_ns_p50),
        ("completion p50 (ms)", |r| r.complete_ns_p50),
    ];
    for (panel, (label, metric)) in panels.iter().zip(metrics) {
        let (ymin, ymax) = rows.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
            (lo.min(ms(metric(r))), hi.max(ms(metric(r))))
        });
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("teardown, mirrors {}: {label}", mirrors.name()),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (xmin..xmax).log_scale(),
                (ymin / 2.0..ymax * 2.0).log_scale(),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("guest memory (GiB)")
            .y_desc(label)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, m) in methods.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.method == *m)
                .map(|r| (gib(r.memory_bytes), ms(metric(r))))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(m.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
