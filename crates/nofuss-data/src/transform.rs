//! Per-image transforms of the photo pipeline: decode, RandomResizedCrop or resize +
//! center crop, horizontal flip and normalisation, fused into one resampling pass.
//!
//! The geometry follows torchvision (`RandomResizedCrop`, `Resize` + `CenterCrop`) and the
//! resampling follows Pillow's bilinear filter with antialiasing (the triangle filter's
//! support widens with the reduction factor), which is what torchvision does on PIL
//! images. The crop, the resize, the flip and the normalisation happen in one separable
//! pass from the decoded image straight into the `[3, S, S]` output: normalised f32, or
//! the 8-bit values in the network's channel order (a [`Texel`] of either kind), which
//! [`Normalization::normalize_bytes`] turns into the same f32 values on a device.
//!
//! [`load_transformed`] decodes a sequential JPEG (baseline or extended, all components in
//! one scan: what cameras and libjpeg write) only down to the rows its crop reads, with
//! the same output as decoding it whole: the crop is drawn from the frame header's size,
//! and a smaller height written into the header stops the decoder there. Other files
//! (progressive JPEGs, PNG) are decoded whole.

use std::path::Path;

use image::RgbImage;
use nofuss_tensor::{ChannelOrder, Normalization};
use rand::Rng;

use crate::{BBox, DataError, Result};

/// How an image becomes a network input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    /// torchvision's `RandomResizedCrop(size, scale, ratio)`, then a horizontal flip with
    /// probability 1/2 when `hflip`.
    Train {
        /// Output side (224 or 227 for BN-Inception).
        size: usize,
        /// Range of the crop's area as a fraction of the image's.
        scale: (f64, f64),
        /// Range of the crop's aspect ratio (width / height).
        ratio: (f64, f64),
        /// Random horizontal flip.
        hflip: bool,
    },
    /// `Resize(resize)` (shorter side) then `CenterCrop(size)`.
    Eval {
        /// Shorter side after resizing (256 for a 224 crop).
        resize: usize,
        /// Output side.
        size: usize,
    },
}

impl Transform {
    /// The usual training transform: scale 0.08-1, ratio 3/4-4/3, flip.
    pub fn train(size: usize) -> Self {
        Self::Train {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: true,
        }
    }

    /// The usual evaluation transform: shorter side to `size * 256 / 224`, center crop.
    pub fn eval(size: usize) -> Self {
        Self::Eval {
            resize: (size * 256).div_ceil(224),
            size,
        }
    }

    /// Output side.
    pub fn size(&self) -> usize {
        match *self {
            Self::Train { size, .. } | Self::Eval { size, .. } => size,
        }
    }

    /// Where to cut an image of `width` x `height`, drawing from `rng` for training.
    pub fn region(&self, width: u32, height: u32, rng: &mut impl Rng) -> Region {
        let (w, h) = (width as f64, height as f64);
        match *self {
            Self::Train {
                scale,
                ratio,
                hflip,
                ..
            } => {
                let flip = hflip && rng.gen::<bool>();
                let area = w * h;
                let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
                for _ in 0..10 {
                    let target = area * rng.gen_range(scale.0..=scale.1);
                    let aspect = rng.gen_range(lr0..=lr1).exp();
                    // Python's round: ties to even, as torchvision.
                    let cw = (target * aspect).sqrt().round_ties_even();
                    let ch = (target / aspect).sqrt().round_ties_even();
                    if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
                        let y = rng.gen_range(0..=(height - ch as u32));
                        let x = rng.gen_range(0..=(width - cw as u32));
                        return Region {
                            x: x as f64,
                            y: y as f64,
                            w: cw,
                            h: ch,
                            flip,
                            inside: true,
                        };
                    }
                }
                // Fallback of torchvision: a central crop with the ratio clamped.
                let in_ratio = w / h;
                let (cw, ch) = if in_ratio < ratio.0 {
                    (w, (w / ratio.0).round_ties_even())
                } else if in_ratio > ratio.1 {
                    ((h * ratio.1).round_ties_even(), h)
                } else {
                    (w, h)
                };
                Region {
                    x: ((w - cw) / 2.0).floor().max(0.0),
                    y: ((h - ch) / 2.0).floor().max(0.0),
                    w: cw,
                    h: ch,
                    flip,
                    inside: true,
                }
            }
            Self::Eval { resize, size } => {
                // Resize so the shorter side is `resize` (torchvision truncates the
                // longer one), then a centred `size` square of that, mapped back.
                let (rw, rh) = if w <= h {
                    (resize as f64, (resize as f64 * h / w).floor())
                } else {
                    ((resize as f64 * w / h).floor(), resize as f64)
                };
                let s = size as f64;
                let top = ((rh - s) / 2.0).round_ties_even();
                let left = ((rw - s) / 2.0).round_ties_even();
                let (sx, sy) = (w / rw, h / rh);
                Region {
                    x: left * sx,
                    y: top * sy,
                    w: s * sx,
                    h: s * sy,
                    flip: false,
                    inside: false,
                }
            }
        }
    }
}

/// A rectangle of the source image (pixels, may be fractional for evaluation crops)
/// that becomes the whole output, mirrored when `flip`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Region {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
    /// Mirror left-right.
    pub flip: bool,
    /// Filter taps stay inside the region, as when the region is cut out first and then
    /// resized (torchvision's `resized_crop`); otherwise they may reach the pixels around
    /// it (a crop of an image resized as a whole, as `Resize` + `CenterCrop`).
    pub inside: bool,
}

/// Decodes an image file by its content (JPEG, PNG; so SOP's `.JPG` works); errors name
/// the file.
pub(crate) fn open_image(path: &Path) -> Result<image::DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_bytes(path, &bytes)
}

/// Decodes the bytes of the image file `path` by their content; errors name the file.
fn decode_bytes(path: &Path, bytes: &[u8]) -> Result<image::DynamicImage> {
    let bad = |message: String| DataError::Image {
        path: path.to_path_buf(),
        message,
    };
    if jpeg_cut_short(bytes) {
        return Err(bad(
            "the JPEG stops before its end-of-image marker (the file is cut short)".into(),
        ));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    let img = reader.decode().map_err(|e| bad(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(bad("the image is empty".into()));
    }
    Ok(img)
}

/// The frame of a sequential JPEG whose first rows can be decoded alone: where its height
/// is written, its size, and the height of a row of its blocks (MCUs).
#[derive(Debug, Clone, Copy, PartialEq)]
struct JpegFrame {
    /// Byte offset of the frame header's 16-bit height.
    height_at: usize,
    width: u32,
    height: u32,
    /// Rows of pixels in a row of MCUs: 8 times the largest vertical sampling factor.
    mcu_height: u32,
}

/// The frame of `bytes` if they are a whole 8-bit sequential Huffman-coded JPEG (baseline or
/// extended: SOF0, SOF1) with all its components in one scan, ending in EOI: then the
/// scan's MCUs run in rows from the top, and writing a smaller height into the frame
/// header makes the decoder stop after that many rows, the rows above unchanged. `None`
/// for anything else (progressive, arithmetic-coded or lossless frames, a scan per
/// component, a height left for a DNL marker, bytes after EOI, not a JPEG, a damaged
/// header); those are decoded whole.
fn sequential_jpeg(bytes: &[u8]) -> Option<JpegFrame> {
    if !bytes.ends_with(&[0xFF, 0xD9]) {
        return None;
    }
    let header = jpeg_header(bytes)?;
    let (frame, components) = header.sequential?;
    (header.scan_components == components).then_some(frame)
}

/// Whether `bytes`, a JPEG by its header, stop before their end-of-image marker: no EOI
/// after the first scan's header (inside entropy-coded data a 0xFF byte is followed by 0
/// or a restart marker, so any EOI there is the image's). The decoder itself fills in
/// what is missing without a word.
fn jpeg_cut_short(bytes: &[u8]) -> bool {
    if bytes.ends_with(&[0xFF, 0xD9]) {
        return false;
    }
    jpeg_header(bytes).is_some_and(|h| !bytes[h.scan_data..].windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// What the marker segments of a JPEG before its first scan say.
struct JpegHeader {
    /// The frame and its component count, if the frame is 8-bit sequential Huffman-coded
    /// (SOF0, SOF1) with a height, and every segment before the scan one this module knows.
    sequential: Option<(JpegFrame, u8)>,
    /// Components in the first scan.
    scan_components: u8,
    /// Offset of the first scan's entropy-coded data.
    scan_data: usize,
}

/// Walks the marker segments of `bytes` from SOI to the first scan's header. `None` if
/// they do not start as a JPEG or a segment runs past the end before a scan.
fn jpeg_header(bytes: &[u8]) -> Option<JpegHeader> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    // `Some(None)`: a frame seen that is not decoded by rows, or an unknown segment.
    let mut sequential: Option<Option<(JpegFrame, u8)>> = None;
    let mut i = 2;
    loop {
        if *bytes.get(i)? != 0xFF {
            return None;
        }
        let code = *bytes.get(i + 1)?;
        if code == 0xFF {
            i += 1; // a fill byte
            continue;
        }
        let len = u16::from_be_bytes([*bytes.get(i + 2)?, *bytes.get(i + 3)?]) as usize;
        let segment = bytes.get(i + 4..(i + 2 + len).max(i + 4))?;
        match code {
            0xC0 | 0xC1 if sequential.is_none() => sequential = Some(sof_frame(segment, i + 5)),
            // Define-table and application segments, comments, restart interval.
            0xC4 | 0xCC | 0xDB | 0xDD | 0xE0..=0xEF | 0xFE => {}
            0xDA => {
                return Some(JpegHeader {
                    sequential: sequential.flatten(),
                    scan_components: *segment.first()?,
                    scan_data: i + 2 + len,
                })
            }
            // A second image or its end before any scan.
            0xD8 | 0xD9 => return None,
            // Other frame types, a second frame, anything else.
            _ => sequential = Some(None),
        }
        i += 2 + len;
    }
}

/// A SOF0/SOF1 segment (after its length; its height at `height_at` in the file) as a
/// frame decoded by rows, with its component count: 8-bit samples, a height, and
/// vertical sampling factors of 1 to 4.
fn sof_frame(segment: &[u8], height_at: usize) -> Option<(JpegFrame, u8)> {
    // Precision, height, width, component count, then 3 bytes a component (id, sampling
    // factors H << 4 | V, quantisation table).
    let [precision, h1, h0, w1, w0, n, ..] = *segment else {
        return None;
    };
    let components = segment.get(6..6 + 3 * n as usize)?;
    let v_max = components.chunks_exact(3).map(|c| c[1] & 0x0F).max()?;
    let (height, width) = (u16::from_be_bytes([h1, h0]), u16::from_be_bytes([w1, w0]));
    if precision != 8 || height == 0 || width == 0 || !(1..=4).contains(&v_max) {
        return None;
    }
    let frame = JpegFrame {
        height_at,
        width: width.into(),
        height: height.into(),
        mcu_height: 8 * u32::from(v_max),
    };
    Some((frame, n))
}

/// Decodes an image file (JPEG, PNG; by content, so SOP's `.JPG` works) to 8-bit RGB.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    Ok(open_image(path)?.into_rgb8())
}

/// Filter taps of one output coordinate: first source index and normalised weights.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// Pillow's bilinear taps for resampling `[offset, offset + len)` of an axis of
/// `in_size` pixels to `out` pixels: a triangle filter whose support grows with the
/// reduction factor (antialiasing), weights normalised to 1. With `inside`, the taps
/// stay within `[offset, offset + len)` (an integral crop resized on its own).
fn taps(offset: f64, len: f64, in_size: usize, out: usize, inside: bool) -> Vec<Taps> {
    if inside {
        let lo = (offset.max(0.0) as usize).min(in_size.saturating_sub(1));
        let n = (len.round() as usize).clamp(1, in_size - lo);
        let mut t = taps(0.0, n as f64, n, out, false);
        t.iter_mut().for_each(|t| t.start += lo);
        return t;
    }
    let scale = len / out as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1, widened
    (0..out)
        .map(|o| {
            let center = offset + (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(in_size);
            let lo = lo.min(hi.saturating_sub(1));
            let mut w: Vec<f64> = (lo..hi)
                .map(|i| {
                    let t = ((i as f64 - center + 0.5) / filterscale).abs();
                    (1.0 - t).max(0.0)
                })
                .collect();
            let total: f64 = w.iter().sum();
            if total > 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            } else {
                // Degenerate (a region narrower than a pixel at the border): nearest.
                w = vec![0.0; hi - lo];
                w[0] = 1.0;
            }
            Taps {
                start: lo,
                weights: w.into_iter().map(|v| v as f32).collect(),
            }
        })
        .collect()
}

/// What the pipeline writes per pixel and channel: `f32` (normalised network input) or
/// `u8` (the rounded 8-bit value, in the network's channel order, to normalise later,
/// e.g. on the GPU with [`Normalization::normalize_bytes`]).
pub trait Texel: Copy + Default + Send + Sync + sealed::Sealed {
    /// The output for the rounded 8-bit value `byte` (as f32) of a channel with
    /// coefficients `(mul, add)` ([`Normalization::coefficients`]).
    fn from_byte(byte: f32, mul: f32, add: f32) -> Self;
}

impl Texel for f32 {
    #[inline]
    fn from_byte(byte: f32, mul: f32, add: f32) -> Self {
        byte * mul + add
    }
}

impl Texel for u8 {
    #[inline]
    fn from_byte(byte: f32, _: f32, _: f32) -> Self {
        byte as u8
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u8 {}
}

/// Resamples `region` of `img` to `size` x `size`, flips it if asked, normalises it (or,
/// for u8 output, only orders the channels), and writes `[3, size, size]` into `out`
/// (the network's channel order).
pub fn resample_into<P: Texel>(
    img: &RgbImage,
    region: &Region,
    size: usize,
    norm: &Normalization,
    out: &mut [P],
) -> Result<()> {
    resample(img, region, size, norm, out, true)
}

/// [`resample_into`], its row loop compiled for AVX2 where the processor has it and `wide`
/// allows (the tests run both builds).
fn resample<P: Texel>(
    img: &RgbImage,
    region: &Region,
    size: usize,
    norm: &Normalization,
    out: &mut [P],
    wide: bool,
) -> Result<()> {
    if norm.channels() != 3 || out.len() != 3 * size * size {
        return Err(DataError::Config(format!(
            "photo pipeline: normalisation for {} channels, output of {} values for side {size}",
            norm.channels(),
            out.len()
        )));
    }
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let xt = taps(region.x, region.w, iw, size, region.inside);
    let yt = taps(region.y, region.h, ih, size, region.inside);
    // Horizontal taps padded to one width K so the inner loop has a fixed trip count.
    let k = xt
        .iter()
        .map(|t| t.weights.len())
        .max()
        .unwrap_or(1)
        .min(iw);
    let mut starts = Vec::with_capacity(size);
    let mut weights = vec![0f32; size * k];
    for (o, t) in xt.iter().enumerate() {
        let start = t.start.min(iw - k);
        let shift = t.start - start;
        let oc = if region.flip { size - 1 - o } else { o };
        starts.push(start * 3);
        weights[oc * k + shift..oc * k + shift + t.weights.len()].copy_from_slice(&t.weights);
    }
    if region.flip {
        starts.reverse();
    }
    // Only the columns the horizontal taps read are filtered vertically.
    let col_lo = starts.iter().copied().min().unwrap_or(0);
    let col_hi = starts.iter().map(|&s| s + 3 * k).max().unwrap_or(0);
    starts.iter_mut().for_each(|s| *s -= col_lo);
    let bgr = norm.order == ChannelOrder::Bgr;
    let plan = Plan {
        raw: img.as_raw(),
        row_len: iw * 3,
        yt: &yt,
        starts: &starts,
        weights: &weights,
        k,
        cols: (col_lo, col_hi),
        size,
        bgr,
        coef: &norm.coefficients(),
    };
    #[cfg(target_arch = "x86_64")]
    if wide && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the processor has AVX2 (checked just above), all `filter_avx2` asks.
        unsafe { filter_avx2(&plan, out) };
        return Ok(());
    }
    filter(&plan, out);
    Ok(())
}

/// What the row loop of [`resample_into`] needs: the image, the taps and the output's
/// layout.
struct Plan<'a> {
    /// The image's RGB bytes.
    raw: &'a [u8],
    /// Bytes per image row.
    row_len: usize,
    /// Vertical taps, one per output row.
    yt: &'a [Taps],
    /// Per output column: the first horizontal tap's offset in the filtered columns.
    starts: &'a [usize],
    /// Horizontal taps, `k` per output column (zero-padded).
    weights: &'a [f32],
    /// Horizontal taps per output column.
    k: usize,
    /// The byte columns `[lo, hi)` of a row that the horizontal taps read.
    cols: (usize, usize),
    /// Output side.
    size: usize,
    /// Output channels in BGR order.
    bgr: bool,
    /// Per output channel: `(mul, add)` of the normalisation.
    coef: &'a [(f32, f32)],
}

/// [`filter`] compiled for AVX2 (wider vectors for the same operations in the same order:
/// the same values as the portable build).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn filter_avx2<P: Texel>(plan: &Plan, out: &mut [P]) {
    filter(plan, out)
}

/// The row loop of [`resample_into`]: per output row, the vertical filter over the needed
/// columns, then the horizontal one, then rounding to 8 bits and normalisation into the
/// planes.
#[inline(always)]
fn filter<P: Texel>(plan: &Plan, out: &mut [P]) {
    let &Plan {
        raw,
        row_len,
        yt,
        starts,
        weights,
        k,
        cols: (col_lo, col_hi),
        size,
        bgr,
        coef,
    } = plan;
    let plane = size * size;
    // The column holds one value more than the taps read: the horizontal pass loads four
    // lanes (RGB and the next pixel's red, unused) from each pixel.
    let width = col_hi - col_lo;
    let mut column = vec![0f32; width + 1];
    let mut rows: Vec<&[u8]> = Vec::new();
    // The horizontal pass's output as three planes of `size` (red, green, blue).
    let mut acc = vec![0f32; 3 * size];
    for (oy, t) in yt.iter().enumerate() {
        rows.clear();
        rows.extend((0..t.weights.len()).map(|j| {
            let r = (t.start + j) * row_len;
            &raw[r + col_lo..r + col_hi]
        }));
        vpass(&rows, &t.weights, &mut column[..width]);
        hpass_row(&column, starts, weights, k, &mut acc);
        // Round and clamp to 8 bits first, as PIL hands torchvision 8-bit pixels.
        for ch in 0..3 {
            let src = if bgr { 2 - ch } else { ch };
            let (mul, add) = coef[ch];
            let dst = &mut out[ch * plane + oy * size..ch * plane + (oy + 1) * size];
            for (d, &v) in dst.iter_mut().zip(&acc[src * size..(src + 1) * size]) {
                *d = P::from_byte(round_to_byte(v), mul, add);
            }
        }
    }
}

/// `v` clamped to [0, 255] and rounded half up, as f32: `floor(clamp(v) + 0.5)`, the same
/// value as `(clamp(v) + 0.5) as u32 as f32`, in float operations only, so that a row of
/// them vectorises (no saturating conversion per value). A NaN becomes 0.
#[inline(always)]
fn round_to_byte(v: f32) -> f32 {
    // The comparisons are the processor's max and min.
    let c = if v > 0.0 { v } else { 0.0 };
    let y = if c < 255.0 { c } else { 255.0 } + 0.5;
    // Adding and subtracting 2^23 rounds y (in [0.5, 255.5]) to the nearest integer;
    // one less where that went above y gives the floor.
    const MAGIC: f32 = 8_388_608.0;
    let r = (y + MAGIC) - MAGIC;
    if r > y {
        r - 1.0
    } else {
        r
    }
}

/// The vertical pass of one output row: `dst[i] = sum_j weights[j] * rows[j][i]`, taps in
/// order (the same sums as one tap at a time over the whole row), a block of columns at a
/// time with its sums in registers.
#[inline(always)]
fn vpass(rows: &[&[u8]], weights: &[f32], dst: &mut [f32]) {
    const L: usize = 16;
    let n = dst.len();
    let full = n / L * L;
    for (c, block) in dst[..full].chunks_exact_mut(L).enumerate() {
        let mut a = [0f32; L];
        for (r, &w) in rows.iter().zip(weights) {
            let src = &r[c * L..c * L + L];
            for l in 0..L {
                a[l] += w * src[l] as f32;
            }
        }
        block.copy_from_slice(&a);
    }
    for (i, d) in dst.iter_mut().enumerate().skip(full) {
        let mut a = 0f32;
        for (r, &w) in rows.iter().zip(weights) {
            a += w * r[i] as f32;
        }
        *d = a;
    }
}

/// One row of the horizontal pass (see [`hpass`]), `k` taps per output pixel.
#[inline(always)]
fn hpass_row(src: &[f32], starts: &[usize], weights: &[f32], k: usize, dst: &mut [f32]) {
    match k {
        1 => hpass::<1>(src, starts, weights, dst),
        2 => hpass::<2>(src, starts, weights, dst),
        3 => hpass::<3>(src, starts, weights, dst),
        4 => hpass::<4>(src, starts, weights, dst),
        5 => hpass::<5>(src, starts, weights, dst),
        6 => hpass::<6>(src, starts, weights, dst),
        7 => hpass::<7>(src, starts, weights, dst),
        8 => hpass::<8>(src, starts, weights, dst),
        _ => hpass_any(src, starts, weights, k, dst),
    }
}

/// One row of the horizontal pass with `K` taps per output pixel: `src` is an RGB row as
/// f32 (one value longer than the taps reach), `starts[o]` the first tap's offset in it,
/// `weights[o * K..]` the taps; `dst` three planes of the output row (red, green, blue).
/// Each tap adds four lanes (the pixel's RGB and one unused).
#[inline(always)]
fn hpass<const K: usize>(src: &[f32], starts: &[usize], weights: &[f32], dst: &mut [f32]) {
    let n = starts.len();
    let (r, gb) = dst.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    for (o, (&st, w)) in starts.iter().zip(weights.chunks_exact(K)).enumerate() {
        let taps = &src[st..st + 3 * K + 1];
        let mut a = [0f32; 4];
        for j in 0..K {
            let v = &taps[3 * j..3 * j + 4];
            for l in 0..4 {
                a[l] += w[j] * v[l];
            }
        }
        (r[o], g[o], b[o]) = (a[0], a[1], a[2]);
    }
}

/// [`hpass`] for any tap count.
#[inline(always)]
fn hpass_any(src: &[f32], starts: &[usize], weights: &[f32], k: usize, dst: &mut [f32]) {
    let n = starts.len();
    let (r, gb) = dst.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    for (o, (&st, w)) in starts.iter().zip(weights.chunks_exact(k)).enumerate() {
        let mut a = [0f32; 4];
        for (j, &wj) in w.iter().enumerate() {
            let v = &src[st + 3 * j..st + 3 * j + 4];
            for l in 0..4 {
                a[l] += wj * v[l];
            }
        }
        (r[o], g[o], b[o]) = (a[0], a[1], a[2]);
    }
}

/// Decodes `path` and applies `transform` with randomness from `rng` (a sequential JPEG
/// only down to the rows the crop reads: the same output as decoding it whole).
pub fn load_transformed<P: Texel>(
    path: &Path,
    transform: &Transform,
    norm: &Normalization,
    rng: &mut impl Rng,
    out: &mut [P],
) -> Result<()> {
    load_transformed_within(path, transform, norm, rng, None, out)
}

/// [`load_transformed`] on the part of the image inside `within` (a bounding box, clipped
/// to the image): the crop is drawn, or the evaluation crop centred, in the box.
pub fn load_transformed_within<P: Texel>(
    path: &Path,
    transform: &Transform,
    norm: &Normalization,
    rng: &mut impl Rng,
    within: Option<BBox>,
    out: &mut [P],
) -> Result<()> {
    let mut bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let draw = |width: u32, height: u32, rng: &mut _| {
        let (x0, y0, w, h) = match within {
            Some(b) => b.clip(width, height),
            None => (0, 0, width, height),
        };
        let mut region = transform.region(w, h, rng);
        region.x += x0 as f64;
        region.y += y0 as f64;
        region
    };
    // A sequential JPEG is decoded only down to the rows the crop reads: the region is
    // drawn from the frame header's size, then a smaller height written into the header.
    if let Some(frame) = sequential_jpeg(&bytes) {
        let region = draw(frame.width, frame.height, rng);
        let rows = rows_to_decode(&region, transform.size(), &frame);
        let img = decode_top_rows(path, &mut bytes, &frame, rows)?;
        return resample_into(&img, &region, transform.size(), norm, out);
    }
    let img = decode_bytes(path, &bytes)?.into_rgb8();
    let region = draw(img.width(), img.height(), rng);
    resample_into(&img, &region, transform.size(), norm, out)
}

/// The top `rows` of the sequential JPEG `bytes` (of the file `path`, whose frame is
/// `frame`), decoded by writing that height into its frame header.
fn decode_top_rows(
    path: &Path,
    bytes: &mut [u8],
    frame: &JpegFrame,
    rows: u32,
) -> Result<RgbImage> {
    let at = frame.height_at;
    let height = u16::try_from(rows.min(frame.height)).unwrap_or(u16::MAX);
    bytes[at..at + 2].copy_from_slice(&height.to_be_bytes());
    let img = decode_bytes(path, bytes)?.into_rgb8();
    if (img.width(), img.height()) != (frame.width, height.into()) {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            message: format!(
                "decoded {}x{} pixels where the JPEG frame header gave {}x{} (of {} rows)",
                img.width(),
                img.height(),
                frame.width,
                height,
                frame.height
            ),
        });
    }
    Ok(img)
}

/// How many rows from the top of a sequential JPEG to decode for resampling `region` to
/// `size`: every row a vertical tap can read (the region widened by the filter's
/// support) and at least one more, since the decoder's chroma upsampling reads the next
/// row's chroma and treats the last row decoded as the image's edge; rounded up to whole
/// rows of MCUs (the decoder decodes those whole anyway). At most the image's height.
fn rows_to_decode(region: &Region, size: usize, frame: &JpegFrame) -> u32 {
    let support = (region.h / size as f64).max(1.0);
    // The taps end before `y + h + support + 0.5`, so the row after the last tap row is
    // below this bound.
    let bottom = region.y + region.h + support + 2.0;
    let mcu = f64::from(frame.mcu_height);
    let rows = (bottom / mcu).ceil() * mcu;
    if rows.is_finite() && rows < f64::from(frame.height) {
        rows as u32
    } else {
        frame.height
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn random_resized_crops_stay_inside_and_follow_the_ranges() {
        let t = Transform::train(224);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut flips = 0;
        for _ in 0..2000 {
            let r = t.region(500, 375, &mut rng);
            assert!(r.x >= 0.0 && r.y >= 0.0 && r.x + r.w <= 500.0 && r.y + r.h <= 375.0);
            let frac = r.w * r.h / (500.0 * 375.0);
            assert!(frac <= 1.0 + 1e-9, "{r:?}");
            if frac > 0.09 && frac < 0.99 {
                let ratio = r.w / r.h;
                assert!(ratio > 0.74 && ratio < 1.35, "{r:?}");
            }
            flips += r.flip as usize;
        }
        assert!((800..1200).contains(&flips), "{flips}");
    }

    #[test]
    fn eval_crop_is_the_centre_of_the_resized_image() {
        let r = Transform::eval(224).region(500, 375, &mut rand::thread_rng());
        // Shorter side 375 -> 256 (x 0.6827), 500 -> 341; centre 224 crop.
        let s = 375.0 / 256.0;
        assert!((r.h - 224.0 * s).abs() < 1e-9);
        assert!((r.y - 16.0 * s).abs() < 1e-9, "{r:?}");
        assert!((r.x - 58.0 * (500.0 / 341.0)).abs() < 1e-9, "{r:?}");
        assert!(!r.flip);
    }

    /// [`resample_into`] one output value at a time: per channel, the horizontal taps
    /// over the vertical sums of the source pixels, each sum in tap order from zero (the
    /// order the row loop keeps), rounded to 8 bits, normalised.
    fn resample_naive(img: &RgbImage, r: &Region, size: usize, norm: &Normalization) -> Vec<f32> {
        let xt = taps(r.x, r.w, img.width() as usize, size, r.inside);
        let yt = taps(r.y, r.h, img.height() as usize, size, r.inside);
        let coef = norm.coefficients();
        let mut out = vec![0f32; 3 * size * size];
        for (oy, ty) in yt.iter().enumerate() {
            for (ox, tx) in xt.iter().enumerate() {
                let col = if r.flip { size - 1 - ox } else { ox };
                for ch in 0..3 {
                    let src = if norm.order == ChannelOrder::Bgr {
                        2 - ch
                    } else {
                        ch
                    };
                    let mut h = 0f32;
                    for (i, &wx) in tx.weights.iter().enumerate() {
                        let mut v = 0f32;
                        for (j, &wy) in ty.weights.iter().enumerate() {
                            let px = img.get_pixel((tx.start + i) as u32, (ty.start + j) as u32);
                            v += wy * px[src] as f32;
                        }
                        h += wx * v;
                    }
                    let byte = (h.clamp(0.0, 255.0) + 0.5) as u32 as f32;
                    out[(ch * size + oy) * size + col] = byte * coef[ch].0 + coef[ch].1;
                }
            }
        }
        out
    }

    #[test]
    fn the_row_loop_gives_the_bits_of_the_one_value_at_a_time_filter() {
        // Shrinking and enlarging crops, flips, both channel orders, both outputs; the
        // portable build of the row loop and (on an AVX2 machine) the AVX2 one.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let img = RgbImage::from_fn(157, 119, |x, y| {
            image::Rgb([
                (x * 7 + y * 3) as u8,
                ((y * 9) ^ x) as u8,
                ((x * y) % 251) as u8,
            ])
        });
        let norms = [
            Normalization::imagenet_rgb(),
            Normalization::bn_inception_bgr(),
        ];
        for (t, norm) in [
            (Transform::train(64), &norms[0]),
            (Transform::eval(48), &norms[1]),
            (Transform::train(300), &norms[1]),
        ] {
            for i in 0..80 {
                let wide = i % 2 == 0;
                let r = t.region(img.width(), img.height(), &mut rng);
                let want = resample_naive(&img, &r, t.size(), norm);
                let mut got = vec![0f32; want.len()];
                resample(&img, &r, t.size(), norm, &mut got, wide).unwrap();
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{r:?}");
                let mut bytes = vec![0u8; want.len()];
                resample(
                    &img,
                    &r,
                    t.size(),
                    &Normalization::symmetric(3),
                    &mut bytes,
                    wide,
                )
                .unwrap();
                let sym = Normalization::symmetric(3).coefficients()[0];
                let want_bytes = resample_naive(&img, &r, t.size(), &Normalization::symmetric(3));
                for (b, w) in bytes.iter().zip(&want_bytes) {
                    assert_eq!(*b as f32 * sym.0 + sym.1, *w, "{r:?}");
                }
            }
        }
    }

    #[test]
    fn every_horizontal_pass_gives_the_same_values() {
        // A row of 40 RGB pixels (+1 value), 9 outputs of k taps at scattered starts.
        let src: Vec<f32> = (0..121).map(|i| ((i * 37) % 251) as f32 * 0.731).collect();
        for k in 1..=10 {
            let starts: Vec<usize> = (0..9).map(|o| 3 * ((o * 7) % (41 - k))).collect();
            let weights: Vec<f32> = (0..9 * k).map(|i| ((i * 13) % 17) as f32 / 17.0).collect();
            let mut any = vec![0f32; 27];
            hpass_any(&src, &starts, &weights, k, &mut any);
            // The row loop's dispatch: `hpass::<K>` for k up to 8, `hpass_any` above.
            let mut fixed = vec![0f32; 27];
            hpass_row(&src, &starts, &weights, k, &mut fixed);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&any), bits(&fixed), "k {k}");
            // Against the sums written out: red of output 0.
            let want = (0..k).fold(0f32, |a, j| a + weights[j] * src[starts[0] + 3 * j]);
            assert_eq!(any[0].to_bits(), want.to_bits(), "k {k}");
        }
    }

    #[test]
    fn rounding_to_a_byte_is_clamped_truncation_of_half_up() {
        let mut v = -3.0f32;
        while v < 260.0 {
            let want = (v.clamp(0.0, 255.0) + 0.5) as u32 as f32;
            assert_eq!(round_to_byte(v), want, "{v}");
            v += 1.0 / 64.0; // every half and quarter exactly, and between
        }
        for v in [
            0.49999997f32,
            0.5,
            1.4999999,
            1.5,
            254.5,
            254.50002,
            f32::INFINITY,
        ] {
            assert_eq!(
                round_to_byte(v),
                (v.clamp(0.0, 255.0) + 0.5) as u32 as f32,
                "{v}"
            );
        }
        assert_eq!(round_to_byte(f32::NAN), 0.0);
        assert_eq!(round_to_byte(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn identity_resample_and_flip() {
        // A region equal to the image at the same size is the image itself.
        let img = RgbImage::from_fn(4, 4, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let unit = Normalization {
            scale: 1.0,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            order: ChannelOrder::Rgb,
        };
        let mut out = vec![0f32; 48];
        let mut region = Region {
            x: 0.0,
            y: 0.0,
            w: 4.0,
            h: 4.0,
            flip: false,
            inside: true,
        };
        resample_into(&img, &region, 4, &unit, &mut out).unwrap();
        assert_eq!(&out[..4], &[0.0, 10.0, 20.0, 30.0]);
        assert_eq!(out[16 + 4], 20.0); // green plane, row 1
        region.flip = true;
        resample_into(&img, &region, 4, &unit, &mut out).unwrap();
        assert_eq!(&out[..4], &[30.0, 20.0, 10.0, 0.0]);
        // BGR order swaps the planes.
        resample_into(
            &img,
            &region,
            4,
            &Normalization::bn_inception_bgr(),
            &mut out,
        )
        .unwrap();
        assert_eq!(out[0], 7.0 - 104.0);
    }

    #[test]
    fn bytes_then_normalisation_is_the_f32_output() {
        // A downscaling crop with a flip (fractional taps, rounding) in BGR and RGB.
        let img = RgbImage::from_fn(37, 29, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (y * 9) as u8, (x * y % 251) as u8])
        });
        let region = Region {
            x: 3.5,
            y: 1.25,
            w: 30.0,
            h: 25.5,
            flip: true,
            inside: true,
        };
        for norm in [
            Normalization::bn_inception_bgr(),
            Normalization::imagenet_rgb(),
        ] {
            let mut f = vec![0f32; 3 * 16 * 16];
            let mut b = vec![0u8; 3 * 16 * 16];
            resample_into(&img, &region, 16, &norm, &mut f).unwrap();
            resample_into(&img, &region, 16, &norm, &mut b).unwrap();
            let coef = norm.coefficients();
            for (i, (&x, &y)) in f.iter().zip(&b).enumerate() {
                let (mul, add) = coef[i / 256];
                assert_eq!(x.to_bits(), (y as f32 * mul + add).to_bits(), "{i}");
            }
        }
    }

    #[test]
    fn crops_stay_inside_the_bounding_box() {
        // Left half red, right half blue; a box over the right half gives only blue.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("two.png");
        RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        })
        .save(&p)
        .unwrap();
        let unit = Normalization {
            scale: 1.0,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            order: ChannelOrder::Rgb,
        };
        let b = BBox {
            x1: 22,
            y1: 1,
            x2: 40,
            y2: 20,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut out = vec![0f32; 3 * 8 * 8];
        for t in [Transform::train(8), Transform::eval(8)] {
            for _ in 0..20 {
                load_transformed_within(&p, &t, &unit, &mut rng, Some(b), &mut out).unwrap();
                assert!(out[..64].iter().all(|&r| r == 0.0), "red leaked in");
                assert!(out[128..].iter().all(|&v| v == 255.0));
            }
        }
        // A box outside the image falls back to the whole image.
        assert_eq!(
            BBox {
                x1: 50,
                y1: 50,
                x2: 60,
                y2: 60
            }
            .clip(40, 20),
            (0, 0, 40, 20)
        );
    }

    fn jpeg_fixture(name: &str) -> Vec<u8> {
        let dir = nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("jpeg");
        std::fs::read(dir.join(name)).unwrap()
    }

    #[test]
    fn sequential_jpegs_are_told_from_the_rest() {
        for (name, mcu) in [
            ("s420.jpg", 16),
            ("s420_optimized.jpg", 16),
            ("s420_restart_blocks.jpg", 16),
            ("s422.jpg", 8),
            ("s444.jpg", 8),
            ("gray.jpg", 8),
        ] {
            let bytes = jpeg_fixture(name);
            let f = sequential_jpeg(&bytes).unwrap_or_else(|| panic!("{name}"));
            assert_eq!((f.width, f.height, f.mcu_height), (157, 119, mcu), "{name}");
            assert_eq!(bytes[f.height_at..f.height_at + 2], 119u16.to_be_bytes());
        }
        let tall = sequential_jpeg(&jpeg_fixture("s420_tall.jpg")).unwrap();
        assert_eq!((tall.width, tall.height), (119, 301));
        assert_eq!(sequential_jpeg(&jpeg_fixture("progressive.jpg")), None);

        let good = jpeg_fixture("s444.jpg");
        let f = sequential_jpeg(&good).unwrap();
        let mut trailing = good.clone();
        trailing.push(0);
        let mut dnl = good.clone(); // height 0: given later by a DNL marker
        dnl[f.height_at..f.height_at + 2].copy_from_slice(&[0, 0]);
        // The first scan with one of the three components: a scan per component.
        let sos = (0..good.len() - 1)
            .find(|&i| good[i..i + 2] == [0xFF, 0xDA])
            .unwrap();
        let mut per_component = good.clone();
        per_component[sos + 4] = 1;
        let png = {
            let mut v = Vec::new();
            let img = RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]));
            img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
                .unwrap();
            v
        };
        let headless = [&good[..2], &good[good.len() - 2..]].concat();
        for (what, bytes) in [
            ("trailing bytes", trailing),
            ("DNL height", dnl),
            ("a scan per component", per_component),
            ("PNG", png),
            ("no segments", headless),
            ("cut short", good[..good.len() / 2].to_vec()),
            (
                "header cut",
                [&good[..30], &good[good.len() - 2..]].concat(),
            ),
        ] {
            assert_eq!(sequential_jpeg(&bytes), None, "{what}");
        }
    }

    #[test]
    fn jpegs_cut_short_are_told_from_whole_ones() {
        for name in [
            "s420.jpg",
            "progressive.jpg",
            "s420_restart_rows.jpg",
            "gray.jpg",
        ] {
            let bytes = jpeg_fixture(name);
            assert!(!jpeg_cut_short(&bytes), "{name}");
            assert!(
                !jpeg_cut_short(&[&bytes[..], &[0, 0, 0]].concat()),
                "{name}"
            );
            let scan = jpeg_header(&bytes).unwrap().scan_data;
            for keep in [scan, scan + 1, (scan + bytes.len()) / 2, bytes.len() - 1] {
                assert!(jpeg_cut_short(&bytes[..keep]), "{name} cut to {keep}");
            }
            // Cut inside the header: left to the decoder (which fails on it).
            assert!(!jpeg_cut_short(&bytes[..scan - 3]), "{name}");
        }
        assert!(!jpeg_cut_short(b"not a jpeg"));
    }

    #[test]
    fn rows_to_decode_cover_the_taps_and_the_row_after() {
        let f = JpegFrame {
            height_at: 0,
            width: 500,
            height: 375,
            mcu_height: 16,
        };
        let at = |y: f64, h: f64, inside: bool| Region {
            x: 0.0,
            y,
            w: 100.0,
            h,
            flip: false,
            inside,
        };
        // Rows [10, 110) to 224 rows (enlarged: support 1): taps and the row after them
        // below row 113, so 128 rows (8 rows of blocks).
        assert_eq!(rows_to_decode(&at(10.0, 100.0, true), 224, &f), 128);
        // Shrunk by 2 (support 2): below 10 + 200 + 2 + 2.
        assert_eq!(rows_to_decode(&at(10.0, 200.0, false), 100, &f), 224);
        // 363 rows: 23 rows of blocks; 373 rows: into the last, so the whole image.
        assert_eq!(rows_to_decode(&at(300.0, 60.0, true), 224, &f), 368);
        assert_eq!(rows_to_decode(&at(310.0, 60.0, true), 224, &f), 375);
        assert_eq!(rows_to_decode(&at(0.0, 375.0, true), 224, &f), 375);
    }

    #[test]
    fn cuts_at_rows_to_decode_change_no_output() {
        // Regions swept down a 4:2:0 image (its last row decoded differs from the whole
        // image's: chroma upsampling), enlarged and shrunk, taps inside the region and
        // around it: each cut image resamples as the whole one.
        let path = Path::new("s420.jpg");
        let bytes = jpeg_fixture("s420.jpg");
        let frame = sequential_jpeg(&bytes).unwrap();
        let whole = decode_bytes(path, &bytes).unwrap().into_rgb8();
        let mut cuts = std::collections::HashMap::new();
        let norm = Normalization::imagenet_rgb();
        let mut checked = 0;
        for (size, h) in [(64, 20.0), (24, 37.5), (7, 60.0), (5, 45.25)] {
            for inside in [true, false] {
                let mut y = 0.0;
                while y + h <= 119.0 {
                    let region = Region {
                        x: 3.0,
                        y,
                        w: 90.0,
                        h,
                        flip: false,
                        inside,
                    };
                    let rows = rows_to_decode(&region, size, &frame);
                    let cut = cuts.entry(rows).or_insert_with(|| {
                        decode_top_rows(path, &mut bytes.clone(), &frame, rows).unwrap()
                    });
                    let (mut a, mut b) = (vec![0u8; 3 * size * size], vec![0u8; 3 * size * size]);
                    resample_into(cut, &region, size, &norm, &mut a).unwrap();
                    resample_into(&whole, &region, size, &norm, &mut b).unwrap();
                    assert_eq!(a, b, "{region:?} to {size}: {rows} rows");
                    checked += usize::from(rows < 119);
                    y += 0.25;
                }
            }
        }
        assert!(checked > 1000, "{checked}");
        assert!(cuts.len() >= 6, "{:?}", cuts.keys());
    }

    #[test]
    fn damaged_images_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.jpg");
        let img = RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8, y as u8, 0]));
        img.save(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
        let e = decode_rgb(&p).unwrap_err().to_string();
        assert!(e.contains("broken.jpg"), "{e}");
        let e = decode_rgb(&dir.path().join("missing.JPG"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.JPG"), "{e}");
    }
}
