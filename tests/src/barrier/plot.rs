//! The throughput-vs-flush-interval plot, as SVG.

use plotters::prelude::*;
use std::path::Path;

/// One line of the plot: `(writes per flush, writes per second)` points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// Why the plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("Could not draw the plot {path}: {message}")]
pub struct PlotError {
    /// The file.
    pub path: String,
    /// What plotters said (its error type is generic over the backend).
    pub message: String,
}

/// Draws `series` (log2 x axis: writes per flush; y: writes per second) into an
/// SVG file at `path`.
pub fn throughput_vs_interval(path: &Path, title: &str, series: &[Series]) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    }
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_max = xs.fold(1.0f64, f64::max).log2().ceil().max(1.0);
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("writes per flush (log2)")
        .y_desc("writes / s")
        .x_labels(series.iter().map(|s| s.points.len()).max().unwrap_or(2).max(2))
        // Ticks sit at whole powers of two; anything between stays unlabelled.
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{}", 2f64.powf(x.round()))
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (s, color) in series.iter().zip(colors.iter().cycle()) {
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x.max(1.0).log2(), y)).collect();
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
