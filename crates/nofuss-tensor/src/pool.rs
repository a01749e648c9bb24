//! 2-D max and average pooling with padding and ceil mode, differentiable on every device.
//!
//! candle's own pooling has no padding, no ceil mode and no backward pass when the
//! kernel differs from the stride; Inception-style networks need all three (3x3
//! stride-2 ceil-mode max pools, 3x3 stride-1 padded average pools). The functions
//! here follow PyTorch's `nn.MaxPool2d` / `nn.AvgPool2d` semantics exactly:
//!
//! - output size `floor((L + 2p - k) / s) + 1`, or with `ceil_mode` the ceiling, minus
//!   one when the last window would start in the right padding;
//! - max pooling pads with `-inf`, so padding never wins;
//! - average pooling divides by the window clipped to the padded input
//!   (`count_include_pad = true`) or to the input itself (`false`).
//!
//! They are built from candle operations that all have gradients (pad, reshape,
//! strided slices, element-wise maximum / sum), so they run and differentiate on CPU
//! and CUDA alike. When an average window tiles the input exactly (no padding, kernel
//! equal to stride) candle's native kernel is used. One difference from PyTorch's backward:
//! where two inputs of a max window are exactly equal, the gradient is shared between
//! them (candle's `maximum` rule) rather than routed to the first.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use nofuss_tensor::pool::{max_pool2d, Pool2d};
//!
//! let x = Tensor::arange(0f32, 25.0, &Device::Cpu)?.reshape((1, 1, 5, 5))?;
//! // 3x3, stride 2, ceil mode: 5 -> 2 in floor mode, 2 in ceil mode (last window starts inside).
//! let p = Pool2d { kernel: 3, stride: 2, padding: 0, ceil_mode: true };
//! assert_eq!(max_pool2d(&x, &p)?.flatten_all()?.to_vec1::<f32>()?, vec![12.0, 14.0, 22.0, 24.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use candle_core::{Result, Tensor};

/// A square pooling window: kernel size, stride, symmetric zero padding, ceil mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2d {
    /// Window side.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Implicit padding on every side (at most `kernel / 2`, as in PyTorch).
    pub padding: usize,
    /// Round the output size up instead of down.
    pub ceil_mode: bool,
}

impl Pool2d {
    /// A `kernel` x `kernel` window with stride `stride`, no padding, floor mode.
    pub fn new(kernel: usize, stride: usize) -> Self {
        Self {
            kernel,
            stride,
            padding: 0,
            ceil_mode: false,
        }
    }

    /// Output length along an axis of input length `len`, as PyTorch computes it.
    pub fn output_len(&self, len: usize) -> Result<usize> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if k == 0 || s == 0 {
            candle_core::bail!("pooling kernel and stride must be positive, got {self:?}");
        }
        if 2 * p > k {
            candle_core::bail!("pooling padding must be at most half the kernel, got {self:?}");
        }
        // PyTorch's formula, with floor division: a ceil-mode window may overhang the
        // input as long as it starts inside it (or inside the left padding).
        let extra = if self.ceil_mode { s - 1 } else { 0 };
        let span = (len + 2 * p + extra) as isize - k as isize;
        let mut out = span.div_euclid(s as isize) + 1;
        if self.ceil_mode && out > 0 && (out as usize - 1) * s >= len + p {
            out -= 1;
        }
        if out < 1 {
            candle_core::bail!(
                "pooling window {k} leaves no output of a length-{len} input ({self:?})"
            );
        }
        let out = out as usize;
        Ok(out)
    }

    fn tiles_exactly(&self, h: usize, w: usize) -> bool {
        self.padding == 0
            && self.kernel == self.stride
            && h % self.kernel == 0
            && w % self.kernel == 0
    }
}

/// Max pooling of `[N,C,H,W]` with PyTorch's `nn.MaxPool2d` semantics.
pub fn max_pool2d(x: &Tensor, p: &Pool2d) -> Result<Tensor> {
    // candle's native max pooling backward (0.11) scales the gradient of the maximum by
    // (number of maxima / window size) instead of dividing it among the maxima, so a
    // unique maximum gets 1/k^2 of its gradient. Where the window tiles the input, the
    // native forward is used through an expression with the right gradient:
    // max = avg(x * m) / avg(m), m = (x == max) without gradient, so ties share it.
    let (_, _, h, w) = x.dims4()?;
    if p.tiles_exactly(h, w) {
        let (k, s) = (p.kernel, p.stride);
        let y = x.detach().max_pool2d_with_stride(k, s)?;
        let m = x
            .detach()
            .eq(&y.upsample_nearest2d(h, w)?)?
            .to_dtype(x.dtype())?;
        let num = (x * &m)?.avg_pool2d_with_stride(k, s)?;
        let den = m.avg_pool2d_with_stride(k, s)?;
        return num.div(&den);
    }
    let windows = Windows::new(x, p, f64::NEG_INFINITY)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..p.kernel {
        for dx in 0..p.kernel {
            let win = windows.get(dy, dx)?;
            out = Some(match out {
                None => win,
                Some(acc) => acc.maximum(&win)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))
}

/// Average pooling of `[N,C,H,W]` with PyTorch's `nn.AvgPool2d` semantics
/// (`count_include_pad` chooses whether padded zeros count in the divisor).
pub fn avg_pool2d(x: &Tensor, p: &Pool2d, count_include_pad: bool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if p.tiles_exactly(h, w) {
        return x.avg_pool2d_with_stride(p.kernel, p.stride);
    }
    let windows = Windows::new(x, p, 0.0)?;
    let mut sum: Option<Tensor> = None;
    for dy in 0..p.kernel {
        for dx in 0..p.kernel {
            let win = windows.get(dy, dx)?;
            sum = Some(match sum {
                None => win,
                Some(acc) => (acc + win)?,
            });
        }
    }
    let sum = sum.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))?;
    let divisor = divisors(h, w, windows.out_h, windows.out_w, p, count_include_pad);
    let divisor = Tensor::from_vec(divisor, (1, 1, windows.out_h, windows.out_w), x.device())?
        .to_dtype(x.dtype())?;
    sum.broadcast_div(&divisor)
}

/// Per-output-position divisors of average pooling, as PyTorch computes them.
fn divisors(h: usize, w: usize, oh: usize, ow: usize, p: &Pool2d, include_pad: bool) -> Vec<f32> {
    let axis = |len: usize, o: usize| -> (usize, usize) {
        let start = (o * p.stride) as isize - p.padding as isize;
        let end = (start + p.kernel as isize).min((len + p.padding) as isize);
        let with_pad = (end - start) as usize;
        let clipped = (end.min(len as isize) - start.max(0)) as usize;
        (with_pad, clipped)
    };
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let (hy, cy) = axis(h, y);
        for x in 0..ow {
            let (wx, cx) = axis(w, x);
            out.push(if include_pad { hy * wx } else { cy * cx } as f32);
        }
    }
    out
}

/// The padded input, reshaped so that window element `(dy, dx)` of every output
/// position is one strided slice.
struct Windows {
    /// `[N, C, qh, s, qw, s]`.
    grid: Tensor,
    stride: usize,
    out_h: usize,
    out_w: usize,
    n: usize,
    c: usize,
}

impl Windows {
    fn new(x: &Tensor, p: &Pool2d, fill: f64) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let (out_h, out_w) = (p.output_len(h)?, p.output_len(w)?);
        let s = p.stride;
        // Rows needed: every window inside, and a whole number of strides.
        let rows = |len: usize, out: usize| -> usize {
            let needed = (len + 2 * p.padding).max((out - 1) * s + p.kernel);
            let q = needed.div_ceil(s).max(out + (p.kernel - 1) / s);
            q * s
        };
        let (ph, pw) = (rows(h, out_h), rows(w, out_w));
        let x = pad_axis(x, 2, p.padding, ph - h - p.padding, fill)?;
        let x = pad_axis(&x, 3, p.padding, pw - w - p.padding, fill)?;
        let grid = x.reshape((n, c, ph / s, s, pw / s, s))?;
        Ok(Self {
            grid,
            stride: s,
            out_h,
            out_w,
            n,
            c,
        })
    }

    fn get(&self, dy: usize, dx: usize) -> Result<Tensor> {
        let s = self.stride;
        self.grid
            .narrow(2, dy / s, self.out_h)?
            .narrow(3, dy % s, 1)?
            .narrow(4, dx / s, self.out_w)?
            .narrow(5, dx % s, 1)?
            .reshape((self.n, self.c, self.out_h, self.out_w))
    }
}

/// Pads `dim` of `x` with `before` and `after` copies of `fill`.
fn pad_axis(x: &Tensor, dim: usize, before: usize, after: usize, fill: f64) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let block = |len: usize| -> Result<Tensor> {
        let mut shape = x.dims().to_vec();
        shape[dim] = len;
        Tensor::full(fill, shape, x.device())?.to_dtype(x.dtype())
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(block(before)?);
    }
    parts.push(x.clone());
    if after > 0 {
        parts.push(block(after)?);
    }
    Tensor::cat(&parts, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Direct transcription of PyTorch's pooling loops.
    fn reference(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        p: &Pool2d,
        avg: Option<bool>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (oh, ow) = (p.output_len(h).unwrap(), p.output_len(w).unwrap());
        let mut out = vec![0f32; n * c * oh * ow];
        // Gradient of sum(out * g) with g[i] = i + 1, routing max ties to the first.
        let mut grad = vec![0f32; x.len()];
        for b in 0..n * c {
            let plane = &x[b * h * w..(b + 1) * h * w];
            for y in 0..oh {
                for xo in 0..ow {
                    let o = b * oh * ow + y * ow + xo;
                    let g = (o + 1) as f32;
                    let hs = (y * p.stride) as isize - p.padding as isize;
                    let ws = (xo * p.stride) as isize - p.padding as isize;
                    let he = (hs + p.kernel as isize).min((h + p.padding) as isize);
                    let we = (ws + p.kernel as isize).min((w + p.padding) as isize);
                    let pool = ((he - hs) * (we - ws)) as f32;
                    let (hs0, ws0) = (hs.max(0) as usize, ws.max(0) as usize);
                    let (he0, we0) = (he.min(h as isize) as usize, we.min(w as isize) as usize);
                    match avg {
                        None => {
                            let mut best = (f32::NEG_INFINITY, 0usize);
                            for yy in hs0..he0 {
                                for xx in ws0..we0 {
                                    if plane[yy * w + xx] > best.0 {
                                        best = (plane[yy * w + xx], yy * w + xx);
                                    }
                                }
                            }
                            out[o] = best.0;
                            grad[b * h * w + best.1] += g;
                        }
                        Some(include_pad) => {
                            let div = if include_pad {
                                pool
                            } else {
                                ((he0 - hs0) * (we0 - ws0)) as f32
                            };
                            let mut s = 0f32;
                            for yy in hs0..he0 {
                                for xx in ws0..we0 {
                                    s += plane[yy * w + xx];
                                    grad[b * h * w + yy * w + xx] += g / div;
                                }
                            }
                            out[o] = s / div;
                        }
                    }
                }
            }
        }
        (out, grad)
    }

    fn check(shape: (usize, usize, usize, usize), p: Pool2d, avg: Option<bool>) {
        let (n, c, h, w) = shape;
        if p.output_len(h).is_err() || p.output_len(w).is_err() {
            let x = Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
            assert!(max_pool2d(&x, &p).is_err() && avg_pool2d(&x, &p, true).is_err());
            return;
        }
        let len = n * c * h * w;
        // Distinct values (a permutation), so max pooling has no ties.
        let vals: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % len) as f32 / len as f32 - 0.5)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(vals.clone(), shape, &Device::Cpu).unwrap())
            .unwrap();
        let y = match avg {
            None => max_pool2d(x.as_tensor(), &p).unwrap(),
            Some(inc) => avg_pool2d(x.as_tensor(), &p, inc).unwrap(),
        };
        let (want, want_grad) = reference(&vals, shape, &p, avg);
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len(), "{p:?} {shape:?}");
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{p:?} {shape:?}: {a} vs {b}");
        }
        let g = Tensor::arange(1f32, (got.len() + 1) as f32, &Device::Cpu)
            .unwrap()
            .reshape(y.shape())
            .unwrap();
        let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        let gx = gx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in gx.iter().zip(&want_grad) {
            assert!(
                (a - b).abs() < 1e-3 * b.abs().max(1.0),
                "grad {p:?} {shape:?}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn output_lengths_match_pytorch() {
        let p = |k, s, pad, ceil| Pool2d {
            kernel: k,
            stride: s,
            padding: pad,
            ceil_mode: ceil,
        };
        // BN-Inception at 224: 112 -> 56 -> 28 -> 14 -> 7.
        assert_eq!(p(3, 2, 0, true).output_len(112).unwrap(), 56);
        assert_eq!(p(3, 2, 0, false).output_len(112).unwrap(), 55);
        assert_eq!(p(3, 2, 0, true).output_len(28).unwrap(), 14);
        assert_eq!(p(3, 1, 1, true).output_len(7).unwrap(), 7);
        // The last window may not start in the right padding.
        assert_eq!(p(2, 2, 1, true).output_len(4).unwrap(), 3);
        assert_eq!(p(3, 2, 1, true).output_len(5).unwrap(), 3);
        assert!(p(3, 2, 2, true).output_len(5).is_err());
        assert!(p(5, 1, 0, false).output_len(3).is_err());
        assert_eq!(p(3, 2, 0, true).output_len(2).unwrap(), 1);
        assert!(p(3, 2, 0, false).output_len(2).is_err());
        assert!(p(0, 1, 0, false).output_len(3).is_err());
    }

    #[test]
    fn max_pool_matches_reference_forward_and_backward() {
        for &(k, s, pad, ceil) in &[
            (3, 2, 0, true),
            (3, 2, 0, false),
            (3, 1, 1, true),
            (2, 2, 0, false),
            (2, 2, 1, true),
            (3, 3, 1, true),
            (5, 2, 2, false),
        ] {
            for &hw in &[(7, 7), (8, 5), (6, 9), (2, 2)] {
                let p = Pool2d {
                    kernel: k,
                    stride: s,
                    padding: pad,
                    ceil_mode: ceil,
                };
                check((2, 3, hw.0, hw.1), p, None);
            }
        }
    }

    #[test]
    fn avg_pool_matches_reference_forward_and_backward() {
        for &(k, s, pad, ceil) in &[
            (3, 1, 1, true),
            (3, 2, 1, true),
            (3, 2, 0, true),
            (2, 2, 0, false),
            (2, 2, 1, true),
            (4, 3, 2, true),
        ] {
            for &inc in &[true, false] {
                for &hw in &[(7, 7), (8, 5), (8, 6)] {
                    let p = Pool2d {
                        kernel: k,
                        stride: s,
                        padding: pad,
                        ceil_mode: ceil,
                    };
                    check((1, 2, hw.0, hw.1), p, Some(inc));
                }
            }
        }
    }

    #[test]
    fn padding_never_wins_a_max_window() {
        let x = Tensor::full(-5f32, (1, 1, 3, 3), &Device::Cpu).unwrap();
        let p = Pool2d {
            kernel: 3,
            stride: 1,
            padding: 1,
            ceil_mode: false,
        };
        let y = max_pool2d(&x, &p).unwrap().flatten_all().unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![-5f32; 9]);
    }
}
