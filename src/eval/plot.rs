//! SVG figures for the eval report (plotters, SVG backend only): grouped bars
//! to compare models metric by metric, and latency distributions.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

#[derive(Debug, thiserror::Error)]
#[error("drawing {}: {msg}", path.display())]
pub struct PlotError {
    pub path: PathBuf,
    pub msg: String,
}

const SIZE: (u32, u32) = (720, 420);

fn color(i: usize) -> RGBColor {
    // Colour-blind-safe (Okabe–Ito).
    const C: [(u8, u8, u8); 7] = [
        (0, 114, 178),
        (230, 159, 0),
        (0, 158, 115),
        (204, 121, 167),
        (86, 180, 233),
        (213, 94, 0),
        (240, 228, 66),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

/// One group of bars per label in `groups`, one bar per model in each;
/// `series` is (model, one value per group). Non-finite values are left out.
/// The y axis runs to `y_max`, or a little above the largest value.
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    y_max: Option<f64>,
    groups: &[&str],
    series: &[(String, Vec<f64>)],
) -> Result<(), PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let y_max = y_max.unwrap_or(if max > 0.0 { max * 1.15 } else { 1.0 });
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..y_max)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_label)
        .draw()
        .map_err(|e| fail(&e))?;
    let width = 0.8 / series.len().max(1) as f64;
    for (m, (name, values)) in series.iter().enumerate() {
        let c = color(m);
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(g, &v)| {
                        let x0 = g as f64 + 0.1 + m as f64 * width;
                        Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], c.filled())
                    }),
            )
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| fail(&e))?;
    let style = TextStyle::from(("sans-serif", 14).into_font()).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Top,
        ),
    );
    for (g, label) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        root.draw(&Text::new(label.to_string(), (x, y + 8), style.clone()))
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}

/// Empirical distribution functions, one line per model: the share of
/// samples at or below each value.
pub fn distribution(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, Vec<f64>)],
) -> Result<(), PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let x_max = if max > 0.0 { max * 1.05 } else { 1.0 };
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..1.0)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("share of completions")
        .draw()
        .map_err(|e| fail(&e))?;
    for (m, (name, values)) in series.iter().enumerate() {
        let mut v: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        // A step function: up by 1/n at each sample.
        let mut points = vec![(0.0, 0.0)];
        for (i, &x) in v.iter().enumerate() {
            points.push((x, i as f64 / n));
            points.push((x, (i + 1) as f64 / n));
        }
        let c = color(m);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}
