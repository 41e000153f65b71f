//! The percentile-distribution plot, as HdrHistogram results are usually shown: latency up the
//! (log) y axis, percentile along an x axis stretched so that each "nine" gets the same width.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// x position of quantile `q`: the number of nines, log10(1 / (1 − q)).
fn nines(q: f64) -> f64 {
    (1.0 / (1.0 - q)).log10()
}

fn percentile_label(x: f64) -> String {
    let q = 1.0 - 10f64.powf(-x);
    let pct = q * 100.0;
    let decimals = (x - 2.0).ceil().max(0.0) as usize;
    format!("{pct:.decimals$}%")
}

/// Points (nines, µs) for one histogram, up to the five-nines where the data reaches.
fn series(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let max_x = nines(1.0 - 1.0 / h.len().max(2) as f64).min(5.0);
    (0..=(max_x * 20.0) as u32)
        .map(|i| {
            let x = f64::from(i) / 20.0;
            let q = 1.0 - 10f64.powf(-x);
            (x, (h.value_at_quantile(q).max(1) as f64) / 1000.0)
        })
        .collect()
}

/// Draws one line per named histogram (values in ns) into an SVG file.
pub fn percentile_plot(
    path: &Path,
    title: &str,
    lines: &[(&str, &Histogram<u64>)],
) -> Result<(), String> {
    let drawn: Vec<(&str, Vec<(f64, f64)>)> = lines
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(name, h)| (*name, series(h)))
        .collect();
    if drawn.is_empty() {
        return Err("nothing to plot: no samples".into());
    }
    let max_x = drawn
        .iter()
        .flat_map(|(_, s)| s.last().map(|p| p.0))
        .fold(1.0, f64::max);
    let (lo, hi) = drawn
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let y_range = (lo * 0.8).max(0.01)..(hi * 1.5).max(1.0);

    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_x, y_range.log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("µs (log)")
        .x_labels((max_x.ceil() as usize) + 1)
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|e| err(&e))?;
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (i, (name, points)) in drawn.into_iter().enumerate() {
        let color = palette[i % palette.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_count_nines() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(4.0), "99.99%");
    }

    #[test]
    fn writes_an_svg() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        for i in 1..10_000u64 {
            h.record(i * 100).unwrap();
        }
        let path = std::env::temp_dir().join(format!("probe-plot-{}.svg", std::process::id()));
        percentile_plot(&path, "test", &[("jitter", &h)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("99.9%"));
        std::fs::remove_file(path).unwrap();
    }
}
