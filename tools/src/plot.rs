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

/// The reference line: a tick more than this late is late to the ear, and `/healthz` counts it.
const REFERENCE_US: f64 = 1000.0;

/// The y axis (µs, log): from the decade at or below the lowest median of the lines (never below
/// 1 µs: the kernel's receive timestamps say nothing finer about a network), to half again
/// above the highest value, and always past the 1 ms reference line.
fn y_range(drawn: &[(&str, Vec<(f64, f64)>)]) -> (f64, f64) {
    let median_x = nines(0.5);
    let lowest_median = drawn
        .iter()
        .flat_map(|(_, s)| s.iter().filter(|p| p.0 >= median_x).map(|p| p.1).next())
        .fold(f64::MAX, f64::min);
    let lo = if lowest_median.is_finite() && lowest_median > 1.0 {
        10f64.powf(lowest_median.log10().floor())
    } else {
        1.0
    };
    let hi = drawn
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    (lo, (hi * 1.5).max(REFERENCE_US * 2.0))
}

/// Draws one line per named histogram (values in ns) into an SVG file: the lines on the left,
/// their legend in a column of its own on the right, where it can cover none of them.
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
    let (lo, hi) = y_range(&drawn);

    let (width, legend_width) = (960, 200);
    let root = SVGBackend::new(path, (width, 560)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let body = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let (plot_area, legend_area) = body.split_horizontally(width - legend_width);
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_x, (lo..hi).log_scale())
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

    let grey = RGBColor(110, 110, 110);
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, REFERENCE_US), (max_x, REFERENCE_US)],
            8,
            5,
            grey.stroke_width(1),
        ))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(std::iter::once(Text::new(
            "1 ms",
            // Text hangs below its anchor: anchor it far enough above the line to clear it.
            (0.02 * max_x, REFERENCE_US * 1.5),
            ("sans-serif", 14).into_font().color(&grey),
        )))
        .map_err(|e| err(&e))?;

    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN];
    let mut legend: Vec<(&str, ShapeStyle)> = Vec::new();
    for (i, (name, points)) in drawn.into_iter().enumerate() {
        let style = palette[i % palette.len()].stroke_width(2);
        // Below the axis is "at most this": keep the line on the chart.
        let points = points.into_iter().map(|(x, y)| (x, y.max(lo)));
        chart
            .draw_series(LineSeries::new(points, style))
            .map_err(|e| err(&e))?;
        legend.push((name, style));
    }
    legend.push(("1 ms", grey.stroke_width(1)));
    let last = legend.len() - 1;
    for (i, (name, style)) in legend.into_iter().enumerate() {
        let y = 40 + 26 * i as i32;
        // The reference line is dashed in the legend too.
        let segments: &[(i32, i32)] = if i == last {
            &[(8, 16), (21, 29), (34, 36)]
        } else {
            &[(8, 36)]
        };
        for &(from, to) in segments {
            legend_area
                .draw(&PathElement::new(vec![(from, y), (to, y)], style))
                .map_err(|e| err(&e))?;
        }
        legend_area
            .draw(&Text::new(
                name,
                (44, y - 8),
                ("sans-serif", 15).into_font(),
            ))
            .map_err(|e| err(&e))?;
    }
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

    /// A histogram (ns) with `n` samples spread evenly from `from_ns` to `to_ns`.
    fn spread(from_ns: u64, to_ns: u64, n: u64) -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        for i in 0..n {
            h.record(from_ns + (to_ns - from_ns) * i / n).unwrap();
        }
        h
    }

    fn render(lines: &[(&str, &Histogram<u64>)]) -> String {
        let path = std::env::temp_dir().join(format!(
            "probe-plot-{}-{}.svg",
            std::process::id(),
            lines.len()
        ));
        percentile_plot(&path, "test", lines).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(path).unwrap();
        svg
    }

    /// Every polyline: its stroke colour and its points.
    fn polylines(svg: &str) -> Vec<(String, Vec<(f64, f64)>)> {
        svg.split("<polyline")
            .skip(1)
            .map(|el| {
                let attr = |name: &str| {
                    el.split(&format!("{name}=\""))
                        .nth(1)
                        .and_then(|v| v.split('"').next())
                        .unwrap_or("")
                        .to_string()
                };
                let points = attr("points")
                    .split_whitespace()
                    .filter_map(|p| p.split_once(','))
                    .map(|(x, y)| (x.parse().unwrap(), y.parse().unwrap()))
                    .collect();
                (attr("stroke"), points)
            })
            .collect()
    }

    /// The x of each `<text>` element whose content is `content`.
    fn text_xs(svg: &str, content: &str) -> Vec<f64> {
        svg.split("<text ")
            .skip(1)
            .filter(|el| {
                el.split_once('>').is_some_and(|(_, rest)| {
                    rest.trim_start().starts_with(&format!("{content}\n"))
                        || rest.trim_start().starts_with(&format!("{content}<"))
                })
            })
            .map(|el| {
                el.split("x=\"")
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn the_legend_stands_beside_the_lines_not_over_them() {
        // Lines that reach the top left corner, where the legend used to be.
        let jitter = spread(1_000, 8_000_000, 10_000);
        let spread_ns = spread(2_000_000, 9_000_000, 10_000);
        let svg = render(&[("interval jitter", &jitter), ("fan-out spread", &spread_ns)]);
        let rightmost = polylines(&svg)
            .iter()
            .filter(|(_, points)| points.len() > 2)
            .flat_map(|(_, points)| points.iter().map(|p| p.0))
            .fold(0.0f64, f64::max);
        assert!(rightmost > 500.0, "no data lines found");
        for name in ["interval jitter", "fan-out spread"] {
            let xs = text_xs(&svg, name);
            assert_eq!(xs.len(), 1, "{name} in the legend once");
            assert!(
                xs[0] > rightmost,
                "{name} at x {} over lines reaching x {rightmost}",
                xs[0]
            );
        }
    }

    #[test]
    fn a_dashed_1_ms_reference_line_crosses_the_chart() {
        // Data far below 1 ms: the axis still reaches it, so the line is drawn.
        let svg = render(&[("interval jitter", &spread(1_000, 50_000, 1_000))]);
        let grey: Vec<_> = polylines(&svg)
            .into_iter()
            .filter(|(stroke, points)| stroke == "#6E6E6E" && points.len() == 2)
            .collect();
        // Dashes in the chart (and three in the legend), all level.
        assert!(grey.len() > 10, "{} grey segments", grey.len());
        let chart_y = grey[0].1[0].1;
        let in_chart: Vec<_> = grey.iter().filter(|(_, p)| p[0].1 == chart_y).collect();
        assert!(in_chart.len() > 10, "the dashes are not on one level");
        let left = in_chart
            .iter()
            .map(|(_, p)| p[0].0)
            .fold(f64::MAX, f64::min);
        let right = in_chart.iter().map(|(_, p)| p[1].0).fold(0.0f64, f64::max);
        assert!(right - left > 500.0, "the line spans {left}..{right} only");
        assert_eq!(
            text_xs(&svg, "1 ms").len(),
            2,
            "a label on the line and in the legend"
        );
    }

    #[test]
    fn the_axis_stops_at_1_us_or_the_decade_below_the_lowest_median() {
        let range = |h: &Histogram<u64>| y_range(&[("x", series(h))]);
        // Medians of a few ns: the axis does not go below 1 µs.
        assert_eq!(range(&spread(1, 20, 1_000)).0, 1.0);
        // Medians around 250 µs: from 100 µs.
        assert_eq!(range(&spread(200_000, 300_000, 1_000)).0, 100.0);
        // Always past 1 ms; otherwise half again above the highest value.
        assert_eq!(range(&spread(1_000, 50_000, 1_000)).1, 2_000.0);
        let (_, hi) = range(&spread(1_000, 20_000_000, 1_000));
        assert!((29_000.0..31_000.0).contains(&hi), "{hi}");

        let svg = render(&[("interval jitter", &spread(1, 1_500, 10_000))]);
        for tiny in ["0.1", "0.01"] {
            assert!(text_xs(&svg, tiny).is_empty(), "an axis label {tiny} µs");
        }
        assert_eq!(text_xs(&svg, "1").len(), 1, "the axis starts at 1 µs");
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
