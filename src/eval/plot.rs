//! The evaluation plot, as one SVG with two panels:
//! - left: τ per benchmark (and their average), one bar per run in each group;
//! - right: acceptance rate per draft position, pooled over every benchmark, one line per run.
//!
//! The SVG backend writes text as `<text>` elements, so no font files are needed.

use std::path::Path;

use plotters::prelude::*;

use super::runner::RunResult;

#[derive(Debug, thiserror::Error)]
#[error("drawing the plot {path}: {what}")]
pub struct PlotError {
    pub path: String,
    pub what: String,
}

/// Canvas size in pixels.
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 480;

/// Distinct colours for up to ten runs, then repeated.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Renders the plot of `runs` to an SVG string.
pub fn render_svg(runs: &[RunResult], title: &str) -> Result<String, PlotError> {
    let mut svg = String::new();
    draw(SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)), runs, title).map_err(|what| PlotError {
        path: "<svg string>".into(),
        what,
    })?;
    Ok(svg)
}

/// Writes the plot of `runs` to `path` (atomically, through [`super::report::write_atomic`]).
pub fn write_svg(path: &Path, runs: &[RunResult], title: &str) -> Result<(), PlotError> {
    let svg = render_svg(runs, title).map_err(|e| PlotError {
        path: path.display().to_string(),
        what: e.what,
    })?;
    super::report::write_atomic(path, svg.as_bytes()).map_err(|e| PlotError {
        path: path.display().to_string(),
        what: e.to_string(),
    })
}

fn draw<DB: DrawingBackend>(backend: DB, runs: &[RunResult], title: &str) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    draw_tau(&left, runs).map_err(err)?;
    draw_acceptance(&right, runs).map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Grouped bars: one group per benchmark plus "average", one bar per run.
fn draw_tau<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[RunResult],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut groups: Vec<String> = runs
        .first()
        .map(|r| r.benchmarks.iter().map(|(n, _)| n.to_string()).collect())
        .unwrap_or_default();
    groups.push("average".into());
    let value = |run: &RunResult, g: usize| -> f64 {
        match run.benchmarks.get(g) {
            Some((_, b)) => b.tau,
            None => run.average.tau,
        }
    };
    let top = runs
        .iter()
        .flat_map(|r| (0..groups.len()).map(move |g| value(r, g)))
        .fold(1.0f64, f64::max);
    let n = groups.len();
    // τ is at least 1 by definition (every cycle emits the target's own token), so the bars
    // start at 1 = "no gain"; the headroom above the tallest bar keeps the legend off the bars.
    let ymax = 1.0 + ((top - 1.0) * (1.25 + 0.07 * runs.len() as f64)).max(0.1);
    let mut chart = ChartBuilder::on(area)
        .caption("τ (average emitted length per cycle)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(44)
        .build_cartesian_2d(0.0..n as f64, 1.0..ymax)?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc("τ (1 = no draft accepted)").draw()?;
    // Group names under the axis, centred on their groups (a continuous axis cannot place its
    // own labels at the centres); drawn on the panel, which does not clip to the plotting area.
    let (bx, by) = area.get_base_pixel();
    for (i, name) in groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 1.0));
        let half = (name.chars().count() as i32 * 7) / 2;
        area.draw(&Text::new(
            name.clone(),
            (px - bx - half, py - by + 8),
            ("sans-serif", 13).into_font(),
        ))?;
    }
    let width = 0.8 / runs.len().max(1) as f64;
    for (j, run) in runs.iter().enumerate() {
        let c = color(j);
        let bars: Vec<(f64, f64, f64)> = (0..n).map(|g| (g as f64 + 0.1 + j as f64 * width, value(run, g), width)).collect();
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x, y, w)| Rectangle::new([(x, 1.0), (x + w * 0.92, y)], c.filled())),
            )?
            .label(format!("{} (B = {})", run.drafter, run.block_size))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        if runs.len() <= 4 {
            chart.draw_series(
                bars.iter()
                    .map(|&(x, y, w)| Text::new(format!("{y:.2}"), (x + w * 0.1, y + (ymax - 1.0) * 0.04), ("sans-serif", 11).into_font())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One line per run: acceptance rate at draft positions 1..B-1, pooled over benchmarks.
fn draw_acceptance<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[RunResult],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let positions = runs.iter().map(|r| r.average.accept_per_position.len()).max().unwrap_or(0).max(1);
    // Zoom on the rates that occur (weak drafters would be a flat line on a 0..1 axis), with
    // headroom for the legend.
    let top = runs.iter().flat_map(|r| r.average.accept_per_position.iter().copied()).filter(|a| a.is_finite()).fold(0.0f64, f64::max);
    let ymax = (top * (1.25 + 0.07 * runs.len() as f64)).clamp(0.05, 1.05);
    let mut chart = ChartBuilder::on(area)
        .caption("acceptance rate per draft position (all benchmarks)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(44)
        .build_cartesian_2d(0.5..positions as f64 + 0.5, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_labels(positions.min(16))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("draft position")
        .y_desc("accepted / drafted")
        .draw()?;
    let mut labelled = false;
    for (j, run) in runs.iter().enumerate() {
        let pts: Vec<(f64, f64)> = run
            .average
            .accept_per_position
            .iter()
            .enumerate()
            .map(|(i, &a)| (i as f64 + 1.0, a))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let c = color(j);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(run.drafter.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
        labelled = true;
    }
    if labelled {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    } else {
        // Plain AR drafts nothing: say so instead of leaving an empty panel unexplained.
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new(
            "no draft positions (AR only)",
            (w as i32 / 2 - 90, h as i32 / 2),
            ("sans-serif", 14).into_font(),
        ))?;
    }
    Ok(())
}
