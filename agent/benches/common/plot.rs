//! Line charts as PNG for the report and soak benches (plotters' bitmap backend, no system libraries).
//! Text needs a TrueType/OpenType font, read at run time: BENCH_FONT, else a few usual paths, else
//! `fc-match`. Without one the chart is drawn without any text (and says so on stderr).

#![allow(dead_code)] // Each bench binary that includes this uses a part of it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

/// One line.
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
    /// Drawn against the right-hand axis.
    pub right: bool,
}

/// One chart, stacked under the previous one; all share the x axis.
pub struct Panel {
    pub title: String,
    pub y_desc: String,
    /// The right-hand axis, for series with `right`.
    pub y2_desc: Option<String>,
    pub series: Vec<Series>,
}

pub struct Figure {
    pub title: String,
    pub x_desc: String,
    /// x ranges shaded in every panel (an outage, a cut connection), with their legend entry.
    pub shaded: Vec<(f64, f64)>,
    pub shade_label: String,
    pub panels: Vec<Panel>,
    pub size: (u32, u32),
}

pub const TAB_BLUE: RGBColor = RGBColor(31, 119, 180);
pub const TAB_ORANGE: RGBColor = RGBColor(255, 127, 14);
pub const TAB_GREEN: RGBColor = RGBColor(44, 160, 44);
pub const TAB_PURPLE: RGBColor = RGBColor(148, 103, 189);
pub const TAB_RED: RGBColor = RGBColor(214, 39, 40);
const SHADE: RGBColor = RGBColor(255, 190, 190);

/// Draws `figure` into `path`. Returns whether text (titles, axis labels, legends) could be drawn.
pub fn draw(path: &Path, figure: &Figure) -> Result<bool, String> {
    let text = font_loaded();
    let root = BitMapBackend::new(path, figure.size).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = if text { root.titled(&figure.title, ("sans-serif", 24)).map_err(err)? } else { root };
    let areas = root.split_evenly((figure.panels.len().max(1), 1));
    let x_max = figure
        .panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|(x, _)| *x)))
        .fold(1.0, f64::max);
    for (panel, area) in figure.panels.iter().zip(&areas) {
        let top = |right: bool| {
            let max = panel
                .series
                .iter()
                .filter(|s| s.right == right)
                .flat_map(|s| s.points.iter().map(|(_, y)| *y))
                .filter(|y| y.is_finite())
                .fold(0.0, f64::max);
            if max > 0.0 {
                max * 1.1
            } else {
                1.0
            }
        };
        let (y_max, y2_max) = (top(false), top(true));
        let mut builder = ChartBuilder::on(area);
        builder.margin(12).x_label_area_size(if text { 45 } else { 8 }).y_label_area_size(if text { 90 } else { 8 });
        if panel.y2_desc.is_some() {
            builder.right_y_label_area_size(if text { 90 } else { 8 });
        }
        if text {
            builder.caption(&panel.title, ("sans-serif", 18));
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?
            .set_secondary_coord(0.0..x_max, 0.0..y2_max);
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc(&figure.x_desc)
                .y_desc(&panel.y_desc)
                .x_label_formatter(&|v| human(*v))
                .y_label_formatter(&|v| human(*v))
                .label_style(("sans-serif", 14))
                .axis_desc_style(("sans-serif", 15));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.light_line_style(RGBColor(235, 235, 235)).draw().map_err(err)?;
        if let Some(y2_desc) = &panel.y2_desc {
            let mut axes = chart.configure_secondary_axes();
            if text {
                axes.y_desc(y2_desc)
                    .y_label_formatter(&|v| human(*v))
                    .label_style(("sans-serif", 14))
                    .axis_desc_style(("sans-serif", 15));
            } else {
                axes.y_labels(0);
            }
            axes.draw().map_err(err)?;
        }
        for (i, (from, to)) in figure.shaded.iter().enumerate() {
            let shade = chart
                .draw_series(std::iter::once(Rectangle::new([(*from, 0.0), (*to, y_max)], SHADE.mix(0.45).filled())))
                .map_err(err)?;
            if i == 0 && text {
                shade
                    .label(&figure.shade_label)
                    .legend(|(x, y)| Rectangle::new([(x, y - 6), (x + 20, y + 6)], SHADE.mix(0.45).filled()));
            }
        }
        for series in &panel.series {
            let color = series.color;
            let line = LineSeries::new(series.points.iter().copied(), color.stroke_width(2));
            let anno = if series.right {
                chart.draw_secondary_series(line).map_err(err)?
            } else {
                chart.draw_series(line).map_err(err)?
            };
            if text {
                let label = if series.right { format!("{} (right axis)", series.label) } else { series.label.clone() };
                anno.label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
        if text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.5))
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(text)
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// 1500 -> "1.5k", 2000000 -> "2M", 0.25 -> "0.25".
pub fn human(v: f64) -> String {
    let trim = |x: f64, unit: &str| {
        let s = format!("{x:.2}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}{unit}")
    };
    match v.abs() {
        a if a >= 1e6 => trim(v / 1e6, "M"),
        a if a >= 1e3 => trim(v / 1e3, "k"),
        _ => trim(v, ""),
    }
}

/// Registers the first font that loads as "sans-serif"; false if none does.
fn font_loaded() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        for path in font_candidates() {
            let Ok(bytes) = std::fs::read(&path) else { continue };
            // plotters keeps a registered font for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
            eprintln!("plot: {} is not a usable font", path.display());
        }
        eprintln!(
            "plot: no TrueType font found (apt-get install fonts-dejavu-core, or set BENCH_FONT=/path/to/font.ttf); \
             drawing without titles, axis labels or legends"
        );
        false
    })
}

fn font_candidates() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::env::var_os("BENCH_FONT").map(PathBuf::from).into_iter().collect();
    paths.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
            "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
            "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
            "/usr/share/fonts/noto/NotoSans-Regular.ttf",
            "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
        ]
        .map(PathBuf::from),
    );
    // Whatever fontconfig picks, if it is installed.
    if let Ok(out) =
        std::process::Command::new("fc-match").args(["-f", "%{file}", "sans-serif:fontformat=TrueType"]).output()
    {
        let file = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !file.is_empty() {
            paths.push(PathBuf::from(file));
        }
    }
    paths
}
