//! A pipeline's report: the figures as SVG and PNG files, `report.md`, and `report.ipynb`, a
//! Jupyter notebook (nbformat 4) whose outputs embed the PNGs, so it reads on GitHub or in
//! Jupyter without running anything.

mod plots;

use std::path::{Path, PathBuf};

use base64::Engine;

pub use plots::{Figure, Series, bar_chart, line_chart, scatter_chart};

#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct ReportError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// A training run's curves: `(step, loss)` points.
pub struct RunCurves {
    pub label: String,
    pub train: Vec<(f64, f64)>,
    pub validation: Vec<(f64, f64)>,
}

/// One evaluated model.
pub struct ModelSummary {
    pub label: String,
    pub bits_per_weight: f64,
    pub file_bytes: u64,
    pub perplexity: f64,
    pub decode_tokens_per_sec: f64,
}

pub struct Report {
    pub title: String,
    /// Markdown before the figures.
    pub introduction: String,
    pub runs: Vec<RunCurves>,
    pub models: Vec<ModelSummary>,
    /// Further Markdown sections, after the figures: `(heading, body)`.
    pub sections: Vec<(String, String)>,
}

/// A figure with the file stem it is saved under and the sentence that introduces it.
struct NamedFigure {
    stem: &'static str,
    caption: String,
    figure: Figure,
}

/// Steps averaged into each point of a training curve.
const TRAIN_WINDOW: usize = 20;

/// Each point's value averaged with the `window - 1` before it (fewer at the start).
fn moving_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(index, &(x, y))| {
            sum += y;
            if index >= window {
                sum -= points[index - window].1;
            }
            (x, sum / (index + 1).min(window) as f64)
        })
        .collect()
}

fn finite(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

fn figures(report: &Report) -> Vec<NamedFigure> {
    let mut series = Vec::new();
    for (index, run) in report.runs.iter().enumerate() {
        series.push(Series {
            label: format!("{} (validation)", run.label),
            points: finite(&run.validation),
            faint: false,
            color: index,
        });
        series.push(Series {
            label: format!("{} (training, {TRAIN_WINDOW}-step mean)", run.label),
            points: moving_mean(&finite(&run.train), TRAIN_WINDOW),
            faint: true,
            color: index,
        });
    }
    series.retain(|line| !line.points.is_empty());
    let models = &report.models;
    let mut named = Vec::new();
    if !series.is_empty() {
        named.push(NamedFigure {
            stem: "loss_curves",
            caption: "Validation (thick) and training (thin, a 20-step moving mean) \
                      cross-entropy of each run, on shared axes. A distilled student's training \
                      curve is its cross-entropy on the labels, comparable with the others."
                .into(),
            figure: line_chart(
                "Loss over training",
                "optimizer step",
                "cross-entropy (nats/token)",
                &series,
            ),
        });
    }
    if !models.is_empty() {
        let points: Vec<(String, f64, f64)> = models
            .iter()
            .map(|model| (model.label.clone(), model.bits_per_weight, model.perplexity))
            .filter(|point| point.1.is_finite() && point.2.is_finite())
            .collect();
        named.push(NamedFigure {
            stem: "perplexity_vs_bits",
            caption: "Validation perplexity against the stored bits per weight of each model \
                      (scales, zeros and group indices included)."
                .into(),
            figure: scatter_chart(
                "Perplexity against bits per weight",
                "stored bits per weight",
                "validation perplexity",
                &points,
            ),
        });
        let sizes: Vec<(String, f64)> = models
            .iter()
            .map(|model| (model.label.clone(), model.file_bytes as f64 / 1e6))
            .collect();
        named.push(NamedFigure {
            stem: "model_sizes",
            caption: "Size of each model's weights file.".into(),
            figure: bar_chart("Model size", "weights file (MB)", &sizes),
        });
        let speeds: Vec<(String, f64)> = models
            .iter()
            .map(|model| (model.label.clone(), model.decode_tokens_per_sec))
            .collect();
        named.push(NamedFigure {
            stem: "decode_speed",
            caption: "Greedy decoding speed with the KV cache on this machine.".into(),
            figure: bar_chart("Decoding speed", "tokens per second", &speeds),
        });
    }
    named
}

fn markdown_cell(id: usize, text: &str) -> serde_json::Value {
    serde_json::json!({
        "cell_type": "markdown",
        "id": format!("cell-{id}"),
        "metadata": {},
        "source": source_lines(text),
    })
}

/// Notebook sources are lists of lines, each but the last ending in a newline.
fn source_lines(text: &str) -> Vec<String> {
    text.split_inclusive('\n').map(str::to_string).collect()
}

fn figure_cell(id: usize, figure: &NamedFigure) -> serde_json::Value {
    serde_json::json!({
        "cell_type": "code",
        "id": format!("cell-{id}"),
        "metadata": {},
        "execution_count": null,
        "source": [format!("# {}: drawn by `distillery report` ({}.png, {}.svg)", figure.stem, figure.stem, figure.stem)],
        "outputs": [{
            "output_type": "display_data",
            "metadata": {},
            "data": {
                "image/png": base64::engine::general_purpose::STANDARD.encode(&figure.figure.png),
                "text/plain": [format!("<{} figure>", figure.stem)],
            },
        }],
    })
}

/// Writes the figures (`*.svg`, `*.png`), `report.md` and `report.ipynb` into `dir`; returns
/// the files written.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let figures = figures(report);
    let mut written = Vec::new();
    let mut markdown = format!("# {}\n\n{}\n", report.title, report.introduction.trim_end());
    let mut cells = vec![markdown_cell(
        0,
        &format!("# {}\n\n{}", report.title, report.introduction.trim_end()),
    )];
    for figure in &figures {
        for (extension, bytes) in [
            ("svg", figure.figure.svg.as_bytes()),
            ("png", &figure.figure.png[..]),
        ] {
            let path = dir.join(format!("{}.{extension}", figure.stem));
            std::fs::write(&path, bytes).map_err(io(&path))?;
            written.push(path);
        }
        markdown.push_str(&format!(
            "\n{}\n\n![{}]({}.png)\n",
            figure.caption, figure.stem, figure.stem
        ));
        cells.push(markdown_cell(cells.len(), &figure.caption));
        cells.push(figure_cell(cells.len(), figure));
    }
    for (heading, body) in &report.sections {
        let section = format!("## {heading}\n\n{}", body.trim_end());
        markdown.push_str(&format!("\n{section}\n"));
        cells.push(markdown_cell(cells.len(), &section));
    }
    let notebook = serde_json::json!({
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": cells,
    });
    for (name, bytes) in [
        ("report.md", markdown.into_bytes()),
        (
            "report.ipynb",
            serde_json::to_string_pretty(&notebook)
                .expect("json")
                .into_bytes(),
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            title: "A test".into(),
            introduction: "Two runs and two models.\n".into(),
            runs: vec![
                RunCurves {
                    label: "teacher".into(),
                    train: vec![(1.0, 7.0), (10.0, 5.0), (20.0, 4.0)],
                    validation: vec![(10.0, 5.5), (20.0, f64::NAN), (30.0, 4.5)],
                },
                RunCurves {
                    label: "student".into(),
                    train: vec![(1.0, 7.5), (20.0, 4.5)],
                    validation: vec![(20.0, 4.8)],
                },
            ],
            models: vec![
                ModelSummary {
                    label: "float".into(),
                    bits_per_weight: 32.0,
                    file_bytes: 3_700_000,
                    perplexity: 47.2,
                    decode_tokens_per_sec: 4000.0,
                },
                ModelSummary {
                    label: "4-bit".into(),
                    bits_per_weight: 4.26,
                    file_bytes: 500_000,
                    perplexity: 48.0,
                    decode_tokens_per_sec: 1600.0,
                },
            ],
            sections: vec![("Cost".into(), "| a | b |\n|---|---|\n| 1 | 2 |\n".into())],
        }
    }

    #[test]
    fn moving_mean_averages_the_window_before_each_point() {
        let points = [(1.0, 2.0), (2.0, 4.0), (3.0, 6.0), (4.0, 10.0)];
        assert_eq!(
            moving_mean(&points, 2),
            [(1.0, 2.0), (2.0, 3.0), (3.0, 5.0), (4.0, 8.0)]
        );
    }

    #[test]
    fn the_notebook_is_nbformat_4_with_every_figure_embedded_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let written = write(&report(), dir.path()).unwrap();
        assert_eq!(written.len(), 4 * 2 + 2);
        let notebook: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.ipynb")).unwrap())
                .unwrap();
        assert_eq!(notebook["nbformat"], 4);
        let cells = notebook["cells"].as_array().unwrap();
        let mut images = 0;
        for cell in cells {
            assert!(cell["id"].is_string() && cell["metadata"].is_object());
            assert!(cell["source"].is_array());
            match cell["cell_type"].as_str().unwrap() {
                "markdown" => {}
                "code" => {
                    let png = cell["outputs"][0]["data"]["image/png"].as_str().unwrap();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(png)
                        .unwrap();
                    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
                    images += 1;
                }
                other => panic!("cell type {other}"),
            }
        }
        assert_eq!(images, 4);
        let markdown = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(
            markdown.contains("![loss_curves](loss_curves.png)"),
            "{markdown}"
        );
        assert!(markdown.contains("## Cost"), "{markdown}");
    }

    #[test]
    fn figure_files_are_valid_svg_and_png_with_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        write(&report(), dir.path()).unwrap();
        for stem in [
            "loss_curves",
            "perplexity_vs_bits",
            "model_sizes",
            "decode_speed",
        ] {
            let png = std::fs::read(dir.path().join(format!("{stem}.png"))).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}");
            // PNG's first chunk is IHDR: width and height, big-endian.
            assert_eq!(&png[12..16], b"IHDR");
            assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 800);
            let svg = std::fs::read_to_string(dir.path().join(format!("{stem}.svg"))).unwrap();
            assert!(svg.starts_with("<svg"), "{stem}");
            assert!(svg.trim_end().ends_with("</svg>"), "{stem}");
        }
        let loss = std::fs::read_to_string(dir.path().join("loss_curves.svg")).unwrap();
        for label in [
            "optimizer step",
            "cross-entropy (nats/token)",
            "teacher (validation)",
        ] {
            assert!(loss.contains(label), "{label}");
        }
    }
}
