//! Small PNG plots of training curves (loss and Recall@1 per epoch; several losses
//! against steps and time), drawn with `image` and an embedded font, so plotting needs
//! no system library.

use std::path::Path;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};

use crate::{Result, TrainError};

const W: u32 = 960;
const H: u32 = 400;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const GRAY: Rgb<u8> = Rgb([200, 200, 200]);
const BLACK: Rgb<u8> = Rgb([30, 30, 30]);
const BLUE: Rgb<u8> = Rgb([31, 119, 180]);
const ORANGE: Rgb<u8> = Rgb([255, 127, 14]);
/// Curve colours, in order (the first two are the single-curve panels' colours).
const PALETTE: [Rgb<u8>; 6] = [
    BLUE,
    ORANGE,
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
];

/// One panel: a title and (x, y) points.
pub struct Series<'a> {
    /// Panel title.
    pub title: &'a str,
    /// Points in drawing order; NaN y values are skipped.
    pub points: &'a [(f64, f64)],
}

/// One labelled curve of a [`Panel`].
pub struct Curve<'a> {
    /// Legend text (empty: no legend entry).
    pub label: &'a str,
    /// Points in drawing order; NaN y values are skipped.
    pub points: &'a [(f64, f64)],
}

/// A panel with several curves, each in its own colour, and its x-axis label.
pub struct Panel<'a> {
    /// Panel title.
    pub title: &'a str,
    /// The x-axis label.
    pub x_label: &'a str,
    /// The curves.
    pub curves: &'a [Curve<'a>],
}

/// Draws the panels side by side into a PNG at `path` (written atomically), one curve
/// each, the first blue, the second orange.
pub fn plot(path: &Path, x_label: &str, panels: &[Series]) -> Result<()> {
    let curves: Vec<[Curve; 1]> = panels
        .iter()
        .map(|s| {
            [Curve {
                label: "",
                points: s.points,
            }]
        })
        .collect();
    let panels: Vec<Panel> = panels
        .iter()
        .zip(&curves)
        .map(|(s, c)| Panel {
            title: s.title,
            x_label,
            curves: c,
        })
        .collect();
    draw(path, &panels, true)
}

/// Draws the panels side by side into a PNG at `path` (written atomically), curves in
/// the palette's order with a legend.
pub fn plot_panels(path: &Path, panels: &[Panel]) -> Result<()> {
    draw(path, panels, false)
}

fn draw(path: &Path, panels: &[Panel], colour_by_panel: bool) -> Result<()> {
    let font = FontRef::try_from_slice(nofuss_data::glyphs::FONTS[0].1)
        .map_err(|e| TrainError::Config(format!("plot font: {e}")))?;
    let mut img = RgbImage::from_pixel(W, H, WHITE);
    let pw = W / panels.len().max(1) as u32;
    for (i, p) in panels.iter().enumerate() {
        let first = if colour_by_panel { i } else { 0 };
        draw_panel(&mut img, &font, i as u32 * pw, pw, p, first);
    }
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| TrainError::Config(format!("encoding {}: {e}", path.display())))?;
    crate::run_dir::write_atomic(path, &bytes)
}

fn draw_panel(img: &mut RgbImage, font: &FontRef, x0: u32, w: u32, p: &Panel, first: usize) {
    let (left, right, top, bottom) = (x0 + 60, x0 + w - 20, 40u32, H - 50);
    text(
        img,
        font,
        p.title,
        (x0 + w / 2) as f32,
        22.0,
        18.0,
        Align::Centre,
    );
    text(
        img,
        font,
        p.x_label,
        ((left + right) / 2) as f32,
        (H - 12) as f32,
        14.0,
        Align::Centre,
    );
    let curves: Vec<Vec<(f64, f64)>> = p
        .curves
        .iter()
        .map(|c| {
            c.points
                .iter()
                .copied()
                .filter(|q| q.1.is_finite())
                .collect()
        })
        .collect();
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in curves.iter().flatten() {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if curves.iter().all(|c| c.is_empty()) {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    if xmax - xmin < 1e-9 {
        xmax = xmin + 1.0;
    }
    let pad = ((ymax - ymin) * 0.08).max(1e-3);
    let (ymin, ymax) = (ymin - pad, ymax + pad);
    let px = |x: f64| left as f64 + (x - xmin) / (xmax - xmin) * (right - left) as f64;
    let py = |y: f64| bottom as f64 - (y - ymin) / (ymax - ymin) * (bottom - top) as f64;
    for k in 0..=4 {
        let y = ymin + (ymax - ymin) * k as f64 / 4.0;
        line(img, left as f64, py(y), right as f64, py(y), GRAY, 1.0);
        text(
            img,
            font,
            &format!("{y:.3}"),
            (left - 6) as f32,
            py(y) as f32 + 4.0,
            12.0,
            Align::Right,
        );
    }
    let ticks = (xmax - xmin).round().clamp(1.0, 10.0) as usize;
    for k in 0..=ticks {
        let x = xmin + (xmax - xmin) * k as f64 / ticks as f64;
        text(
            img,
            font,
            &format!("{x:.0}"),
            px(x) as f32,
            (bottom + 18) as f32,
            12.0,
            Align::Centre,
        );
    }
    line(
        img,
        left as f64,
        bottom as f64,
        right as f64,
        bottom as f64,
        BLACK,
        1.0,
    );
    line(
        img,
        left as f64,
        top as f64,
        left as f64,
        bottom as f64,
        BLACK,
        1.0,
    );
    for (k, pts) in curves.iter().enumerate() {
        let colour = PALETTE[(first + k) % PALETTE.len()];
        for pair in pts.windows(2) {
            line(
                img,
                px(pair[0].0),
                py(pair[0].1),
                px(pair[1].0),
                py(pair[1].1),
                colour,
                2.5,
            );
        }
        for &(x, y) in pts {
            disc(img, px(x), py(y), 3.5, colour);
        }
        let label = p.curves[k].label;
        if !label.is_empty() {
            let y = (top + 14 + 18 * k as u32) as f64;
            line(
                img,
                (left + 10) as f64,
                y - 4.0,
                (left + 30) as f64,
                y - 4.0,
                colour,
                3.0,
            );
            text(
                img,
                font,
                label,
                (left + 36) as f32,
                y as f32,
                13.0,
                Align::Left,
            );
        }
    }
}

fn disc(img: &mut RgbImage, cx: f64, cy: f64, r: f64, c: Rgb<u8>) {
    let (x0, x1) = ((cx - r).floor() as i64, (cx + r).ceil() as i64);
    let (y0, y1) = ((cy - r).floor() as i64, (cy + r).ceil() as i64);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            blend(img, x, y, c, (r - d + 0.5).clamp(0.0, 1.0));
        }
    }
}

fn line(img: &mut RgbImage, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb<u8>, width: f64) {
    let len = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt();
    let steps = (len * 2.0).ceil().max(1.0) as usize;
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        disc(img, x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, width / 2.0, c);
    }
}

fn blend(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>, a: f64) {
    if a <= 0.0 || x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 {
        return;
    }
    let p = img.get_pixel_mut(x as u32, y as u32);
    for k in 0..3 {
        p.0[k] = (p.0[k] as f64 * (1.0 - a) + c.0[k] as f64 * a).round() as u8;
    }
}

/// Where text stands relative to its anchor.
#[derive(Clone, Copy)]
enum Align {
    /// Centred on the anchor.
    Centre,
    /// Ending at the anchor.
    Right,
    /// Starting at the anchor.
    Left,
}

/// Draws `s` with its baseline at `y`, aligned on `x`.
fn text(img: &mut RgbImage, font: &FontRef, s: &str, x: f32, y: f32, size: f32, align: Align) {
    let scaled = font.as_scaled(PxScale::from(size));
    let width: f32 = s.chars().map(|c| scaled.h_advance(font.glyph_id(c))).sum();
    let mut pen = match align {
        Align::Centre => x - width / 2.0,
        Align::Right => x - width,
        Align::Left => x,
    };
    for ch in s.chars() {
        let id = font.glyph_id(ch);
        let glyph = id.with_scale_and_position(PxScale::from(size), ab_glyph::point(pen, y));
        if let Some(o) = font.outline_glyph(glyph) {
            let b = o.px_bounds();
            o.draw(|gx, gy, a| {
                blend(
                    img,
                    b.min.x as i64 + gx as i64,
                    b.min.y as i64 + gy as i64,
                    BLACK,
                    a as f64,
                );
            });
        }
        pen += scaled.h_advance(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_curves() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.png");
        let loss = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.5)];
        let r1 = [(0.0, 0.2), (1.0, 0.5), (2.0, f64::NAN), (3.0, 0.8)];
        plot(
            &p,
            "epoch",
            &[
                Series {
                    title: "loss",
                    points: &loss,
                },
                Series {
                    title: "Recall@1",
                    points: &r1,
                },
            ],
        )
        .unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (W, H));
        let blue = img.pixels().filter(|p| **p == BLUE).count();
        let orange = img.pixels().filter(|p| **p == ORANGE).count();
        assert!(blue > 100 && orange > 100, "{blue} {orange}");
        // An empty series still draws axes without failing.
        plot(
            &p,
            "epoch",
            &[Series {
                title: "empty",
                points: &[],
            }],
        )
        .unwrap();
    }
}
