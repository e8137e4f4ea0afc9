//! The report's figures, drawn as SVG by plotters and rasterized to PNG by resvg with a bundled
//! font, so the PNGs look the same on every machine.

use plotters::prelude::*;

/// DejaVu Sans (Bitstream Vera license, `fonts/DejaVuSans-LICENSE`).
const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
const SIZE: (u32, u32) = (800, 480);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One line of a line chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn thin and pale (noisy training curves), else thick.
    pub faint: bool,
    /// Series with the same index share a color (one run's training and validation curves).
    pub color: usize,
}

/// A figure as SVG text and PNG bytes.
pub struct Figure {
    pub svg: String,
    pub png: Vec<u8>,
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

fn padded_range(values: impl Iterator<Item = f64> + Clone) -> std::ops::Range<f64> {
    let low = values.clone().fold(f64::INFINITY, f64::min);
    let high = values.fold(f64::NEG_INFINITY, f64::max);
    let pad = ((high - low) * 0.05).max(1e-9);
    (low - pad)..(high + pad)
}

/// Lines on shared axes.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Figure {
    figure(|root| {
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(padded_range(xs), padded_range(ys))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .light_line_style(WHITE)
            .draw()?;
        for line in series {
            let color = COLORS[line.color % COLORS.len()];
            let style = if line.faint {
                ShapeStyle::from(color.mix(0.45)).stroke_width(1)
            } else {
                ShapeStyle::from(color).stroke_width(3)
            };
            let drawn = chart.draw_series(LineSeries::new(line.points.iter().copied(), style))?;
            drawn
                .label(line.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
        Ok(())
    })
}

/// Labelled points, each a model: `(label, x, y)`.
pub fn scatter_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(String, f64, f64)],
) -> Figure {
    figure(|root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(
                padded_range(points.iter().map(|p| p.1).chain([0.0])),
                padded_range(points.iter().map(|p| p.2)),
            )?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .light_line_style(WHITE)
            .draw()?;
        for (index, (label, x, y)) in points.iter().enumerate() {
            let color = COLORS[index % COLORS.len()];
            chart.draw_series([Circle::new((*x, *y), 6, color.filled())])?;
            chart.draw_series([Text::new(
                label.clone(),
                (*x, *y),
                ("sans-serif", 14).into_font().color(&BLACK),
            )])?;
        }
        Ok(())
    })
}

/// One horizontal bar per model.
pub fn bar_chart(title: &str, value_label: &str, bars: &[(String, f64)]) -> Figure {
    figure(|root| {
        let high = bars.iter().map(|bar| bar.1).fold(0.0, f64::max) * 1.15;
        let count = bars.len() as u32;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(200)
            // A range of n segments ends at n - 1: one bar per segment, none empty.
            .build_cartesian_2d(
                0.0..high.max(1e-9),
                (0u32..count.saturating_sub(1)).into_segmented(),
            )?;
        let labels: Vec<String> = bars.iter().map(|bar| bar.0.clone()).collect();
        chart
            .configure_mesh()
            .x_desc(value_label)
            .y_labels(bars.len())
            .y_label_formatter(&|segment| match segment {
                SegmentValue::CenterOf(index) => {
                    labels.get(*index as usize).cloned().unwrap_or_default()
                }
                _ => String::new(),
            })
            .light_line_style(WHITE)
            .draw()?;
        for (index, (_, value)) in bars.iter().enumerate() {
            let color = COLORS[index % COLORS.len()];
            let row = index as u32;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row)),
                    (*value, SegmentValue::Exact(row + 1)),
                ],
                color.mix(0.8).filled(),
            );
            bar.set_margin(6, 6, 0, 0);
            chart.draw_series([bar])?;
            chart.draw_series([Text::new(
                if *value >= 100.0 {
                    format!(" {value:.0}")
                } else {
                    format!(" {value:.2}")
                },
                (*value, SegmentValue::CenterOf(row)),
                ("sans-serif", 14).into_font().color(&BLACK),
            )])?;
        }
        Ok(())
    })
}

fn figure(draw: impl FnOnce(&DrawingArea<SVGBackend, plotters::coord::Shift>) -> Drawn) -> Figure {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).expect("an SVG string accepts drawing");
        draw(&root).expect("charts of finite values draw");
        root.present().expect("an SVG string accepts drawing");
    }
    let png = rasterize(&svg);
    Figure { svg, png }
}

fn rasterize(svg: &str) -> Vec<u8> {
    let mut options = resvg::usvg::Options::default();
    options.fontdb_mut().load_font_data(FONT.to_vec());
    options.fontdb_mut().set_sans_serif_family("DejaVu Sans");
    options.font_family = "DejaVu Sans".into();
    let tree = resvg::usvg::Tree::from_str(svg, &options).expect("plotters writes valid SVG");
    let size = tree.size().to_int_size();
    let mut pixmap =
        resvg::tiny_skia::Pixmap::new(size.width(), size.height()).expect("the figure has a size");
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().expect("a pixmap encodes")
}
