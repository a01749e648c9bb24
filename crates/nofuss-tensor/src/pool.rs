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
//! Both are custom operations with their own kernels, forward and backward: direct loops
//! over the planes on the CPU (in parallel with rayon), and on CUDA the kernels of
//! `kernels/pool.cu` (one thread per output forward, one thread per input backward: a
//! gather, so no atomics and the same result every run). Max pooling keeps each window's
//! argmax (a `u32` per output, only when a gradient will be needed) and routes the
//! window's gradient there: the first maximum in row-major order (a NaN wins), as PyTorch
//! does; this also avoids candle 0.11's max-pool backward, which scales a unique maximum's
//! gradient by 1/k². Inputs may be f32, f64 or bf16 (f16 too on the CPU).
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

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

use crate::cpu::{slice, with_cpu_dtype};

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
}

/// Max pooling of `[N,C,H,W]` with PyTorch's `nn.MaxPool2d` semantics.
pub fn max_pool2d(x: &Tensor, p: &Pool2d) -> Result<Tensor> {
    Geom::new(x.dims(), p)?;
    let op = MaxPool {
        pool: *p,
        // Keep each window's argmax for the backward pass only when there will be one.
        saved: x.track_op().then(|| Arc::new(Mutex::new(None))),
    };
    x.contiguous()?.apply_op1(op)
}

/// The argmax positions a max pooling kept for its backward pass (see
/// [`max_pool2d_with_indices`]), with the pooling's sizes.
#[derive(Clone)]
pub struct MaxPoolIndices {
    geom: Geom,
    saved: SavedArgmax,
}

impl std::fmt::Debug for MaxPoolIndices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaxPoolIndices")
            .field("input", &self.geom.in_shape())
            .finish()
    }
}

/// [`max_pool2d`] outside candle's graph, keeping each window's argmax for
/// [`max_pool2d_backward`]: for a caller that keeps its own tape ([`crate::tape::Tape`]).
pub fn max_pool2d_with_indices(x: &Tensor, p: &Pool2d) -> Result<(Tensor, MaxPoolIndices)> {
    let geom = Geom::new(x.dims(), p)?;
    let saved: SavedArgmax = Arc::new(Mutex::new(None));
    let y = x.detach().contiguous()?.apply_op1_no_bwd(&MaxPool {
        pool: *p,
        saved: Some(saved.clone()),
    })?;
    Ok((y, MaxPoolIndices { geom, saved }))
}

/// The input gradient of a max pooling from its output gradient `dy`: each output's
/// gradient added at its window's argmax.
pub fn max_pool2d_backward(dy: &Tensor, indices: &MaxPoolIndices) -> Result<Tensor> {
    dy.detach().contiguous()?.apply_op1_no_bwd(&MaxPoolBwd {
        geom: indices.geom,
        saved: indices.saved.clone(),
    })
}

/// The input gradient of [`avg_pool2d`] of an input shaped `x_dims`, from its output
/// gradient `dy`, outside candle's graph.
pub fn avg_pool2d_backward(
    dy: &Tensor,
    x_dims: &[usize],
    p: &Pool2d,
    count_include_pad: bool,
) -> Result<Tensor> {
    dy.detach().contiguous()?.apply_op1_no_bwd(&AvgPoolBwd {
        geom: Geom::new(x_dims, p)?,
        include_pad: count_include_pad,
    })
}

/// Average pooling of `[N,C,H,W]` with PyTorch's `nn.AvgPool2d` semantics
/// (`count_include_pad` chooses whether padded zeros count in the divisor).
pub fn avg_pool2d(x: &Tensor, p: &Pool2d, count_include_pad: bool) -> Result<Tensor> {
    Geom::new(x.dims(), p)?;
    x.contiguous()?.apply_op1(AvgPool {
        pool: *p,
        include_pad: count_include_pad,
    })
}

/// A float's place in max pooling's comparisons as an integer: larger keys for larger
/// values, the same key for -0 and +0 (they compare equal), and `i64::MAX` for every NaN.
/// With it a window's scan is integer compares and conditional moves: compared as floats,
/// the running maximum's update compiled to a branch per comparison (x86-64's baseline
/// has no float select), and which element of a window is largest is a coin toss on real
/// activations.
pub(crate) trait MaxKey: WithDType {
    /// The key of `self`.
    fn max_key(self) -> i64;
}

/// The key from a float's bits: `mag` the bits without the sign, `nan_above` the largest
/// non-NaN `mag` (infinity's), `negative` the sign.
#[inline(always)]
fn key_of(mag: i64, nan_above: i64, negative: bool) -> i64 {
    let s = -(negative as i64); // 0 or -1: negate negatives
    let key = (mag ^ s) - s;
    std::hint::select_unpredictable(mag > nan_above, i64::MAX, key)
}

impl MaxKey for f32 {
    #[inline(always)]
    fn max_key(self) -> i64 {
        let b = self.to_bits();
        key_of((b & 0x7fff_ffff) as i64, 0x7f80_0000, b >> 31 != 0)
    }
}

impl MaxKey for f64 {
    #[inline(always)]
    fn max_key(self) -> i64 {
        let b = self.to_bits();
        key_of((b & !(1 << 63)) as i64, 0x7ff0_0000_0000_0000, b >> 63 != 0)
    }
}

impl MaxKey for half::bf16 {
    #[inline(always)]
    fn max_key(self) -> i64 {
        let b = self.to_bits();
        key_of((b & 0x7fff) as i64, 0x7f80, b >> 15 != 0)
    }
}

impl MaxKey for half::f16 {
    #[inline(always)]
    fn max_key(self) -> i64 {
        let b = self.to_bits();
        key_of((b & 0x7fff) as i64, 0x7c00, b >> 15 != 0)
    }
}

/// The running maximum `(key, position)` of a window after meeting `v` at `pos`: `v`
/// replaces it when larger, or NaN (after a NaN only NaNs move it), so ties keep the first
/// maximum, as in PyTorch. No branch: conditional moves.
#[inline(always)]
fn keep_max<T: MaxKey>(best: (i64, usize), v: T, pos: usize) -> (i64, usize) {
    keep_key(best, v.max_key(), pos)
}

/// [`keep_max`] with the value's key already made.
#[inline(always)]
fn keep_key((m, at): (i64, usize), k: i64, pos: usize) -> (i64, usize) {
    let b = (k == i64::MAX) | (k > m);
    (
        std::hint::select_unpredictable(b, k, m),
        std::hint::select_unpredictable(b, pos, at),
    )
}

/// Sizes of one pooling: planes (N*C) of `h x w` into `oh x ow`.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl Geom {
    fn new(dims: &[usize], pool: &Pool2d) -> Result<Self> {
        let &[n, c, h, w] = dims else {
            candle_core::bail!("pooling expects [N,C,H,W], got {dims:?}");
        };
        Ok(Self {
            n,
            c,
            h,
            w,
            oh: pool.output_len(h)?,
            ow: pool.output_len(w)?,
            k: pool.kernel,
            s: pool.stride,
            p: pool.padding,
        })
    }

    fn in_plane(&self) -> usize {
        self.h * self.w
    }

    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }

    fn in_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.h, self.w))
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.oh, self.ow))
    }

    /// Rows `[start, end)` of input along one axis covered by output `o`, clipped.
    fn span(&self, o: usize, len: usize) -> (usize, usize) {
        let start = (o * self.s) as isize - self.p as isize;
        let end = (start + self.k as isize).min(len as isize);
        (start.max(0) as usize, end.max(0) as usize)
    }

    /// [`Self::span`] of every output `0..outs` along an axis of length `len`.
    fn spans(&self, outs: usize, len: usize) -> Vec<(usize, usize)> {
        (0..outs).map(|o| self.span(o, len)).collect()
    }

    /// [`Self::divisor`] of every output, row-major.
    fn divisors(&self, include_pad: bool) -> Vec<f64> {
        (0..self.oh)
            .flat_map(|y| (0..self.ow).map(move |x| self.divisor(y, x, include_pad)))
            .collect()
    }

    /// PyTorch's divisor of average pooling at output `(y, x)`.
    fn divisor(&self, y: usize, x: usize, include_pad: bool) -> f64 {
        if include_pad {
            let axis = |o: usize, len: usize| {
                let start = (o * self.s) as isize - self.p as isize;
                let end = (start + self.k as isize).min((len + self.p) as isize);
                (end - start) as f64
            };
            axis(y, self.h) * axis(x, self.w)
        } else {
            let (hs, he) = self.span(y, self.h);
            let (ws, we) = self.span(x, self.w);
            ((he - hs) * (we - ws)) as f64
        }
    }

    /// Position in the plane of the window's first maximum (a NaN wins, as in PyTorch;
    /// see [`keep_max`]).
    fn argmax<T: MaxKey>(&self, plane: &[T], y: usize, x: usize) -> usize {
        let (hs, he) = self.span(y, self.h);
        let (ws, we) = self.span(x, self.w);
        // Starting from the first element is PyTorch's -inf start: the first element wins
        // unless something is larger (or NaN, after which only NaNs move it).
        let first = hs * self.w + ws;
        let mut best = (plane[first].max_key(), first);
        for yy in hs..he {
            let start = yy * self.w + ws;
            for (i, &v) in plane[start..yy * self.w + we].iter().enumerate() {
                best = keep_max(best, v, start + i);
            }
        }
        best.1
    }

    /// Whether every window lies inside the plane (no padding, no ceil-mode overhang).
    fn windows_inside(&self) -> bool {
        self.oh > 0
            && self.ow > 0
            && self.inside(self.oh, self.h) == (0..self.oh)
            && self.inside(self.ow, self.w) == (0..self.ow)
    }

    /// [`Self::max_plane`] for 2x2 windows with stride 2 (VGG-style halving, the small
    /// CNN's pools): each output's four values are read once and compared in registers,
    /// in [`Self::argmax`]'s order, and the output and its argmax written once.
    fn max_2x2<T: MaxKey>(&self, plane: &[T], out: &mut [T], idx: &mut [u32]) {
        let w = self.w;
        for (yo, (out, idx)) in out
            .chunks_exact_mut(self.ow)
            .zip(idx.chunks_exact_mut(self.ow))
            .enumerate()
        {
            let top = 2 * yo * w;
            let (r0, r1) = (
                &plane[top..top + 2 * self.ow],
                &plane[top + w..top + w + 2 * self.ow],
            );
            for (xo, (o, i)) in out.iter_mut().zip(idx.iter_mut()).enumerate() {
                let x = 2 * xo;
                let mut best = (r0[x].max_key(), top + x);
                best = keep_max(best, r0[x + 1], top + x + 1);
                best = keep_max(best, r1[x], top + w + x);
                best = keep_max(best, r1[x + 1], top + w + x + 1);
                *o = plane[best.1];
                *i = best.1 as u32;
            }
        }
    }

    /// The outputs along an axis of input length `len` whose windows lie inside it (no
    /// padding, no ceil-mode overhang), out of `outs`: a range.
    fn inside(&self, outs: usize, len: usize) -> std::ops::Range<usize> {
        let lo = self.p.div_ceil(self.s).min(outs);
        let hi = match (len + self.p).checked_sub(self.k) {
            Some(room) => (room / self.s + 1).min(outs),
            None => 0,
        };
        lo..hi.max(lo)
    }

    /// Max pooling of one plane: outputs whose windows lie inside the plane read their
    /// window straight from the plane (no clipping), the border's (padding, ceil-mode
    /// overhang) go through [`Self::argmax`]. Window elements are visited in
    /// [`Self::argmax`]'s order, so ties and NaNs resolve the same way everywhere.
    fn max_plane<T: MaxKey>(&self, plane: &[T], out: &mut [T], idx: &mut [u32]) {
        /// Interior windows compared side by side.
        const LANES: usize = 4;
        let (w, s, k, p) = (self.w, self.s, self.k, self.p);
        // The plane's keys, made once for the interior windows (each element is in up to
        // k² of them).
        let mut keys: Option<Vec<i64>> = None;
        let (rows, cols) = (self.inside(self.oh, self.h), self.inside(self.ow, self.w));
        for (yo, (out, idx)) in out
            .chunks_exact_mut(self.ow)
            .zip(idx.chunks_exact_mut(self.ow))
            .enumerate()
        {
            let mut one = |xo: usize| {
                let a = self.argmax(plane, yo, xo);
                out[xo] = plane[a];
                idx[xo] = a as u32;
            };
            if !rows.contains(&yo) || cols.is_empty() {
                (0..self.ow).for_each(&mut one);
                continue;
            }
            (0..cols.start).chain(cols.end..self.ow).for_each(&mut one);
            // Window of output xo starts at column xo s - p of row yo s - p; its values
            // are compared in argmax's order and the result written once.
            let top = (yo * s - p) * w;
            let keys = keys.get_or_insert_with(|| plane.iter().map(|v| v.max_key()).collect());
            let mut xo = cols.start;
            // LANES windows side by side: independent chains of compares, which the
            // processor overlaps (one window's chain of k² dependent selects is latency).
            while xo + LANES <= cols.end {
                let base: [usize; LANES] = std::array::from_fn(|l| top + (xo + l) * s - p);
                let mut m: [i64; LANES] = std::array::from_fn(|l| keys[base[l]]);
                let mut at = base;
                for ky in 0..k {
                    for kx in 0..k {
                        let off = ky * w + kx;
                        for l in 0..LANES {
                            let pos = base[l] + off;
                            (m[l], at[l]) = keep_key((m[l], at[l]), keys[pos], pos);
                        }
                    }
                }
                for l in 0..LANES {
                    out[xo + l] = plane[at[l]];
                    idx[xo + l] = at[l] as u32;
                }
                xo += LANES;
            }
            for xo in xo..cols.end {
                let base = top + xo * s - p;
                let mut best = (keys[base], base);
                for ky in 0..k {
                    let start = base + ky * w;
                    for (kx, &key) in keys[start..start + k].iter().enumerate() {
                        best = keep_key(best, key, start + kx);
                    }
                }
                out[xo] = plane[best.1];
                idx[xo] = best.1 as u32;
            }
        }
    }

    /// The input gradient `[N, C, H, W]`, plane by plane: `scatter(plane, dy, acc)` adds
    /// plane `plane`'s output gradient `dy` into the plane's f64 accumulator `acc`.
    fn input_grad<T: WithDType>(
        &self,
        dy: &[T],
        scatter: impl Fn(usize, &[T], &mut [f64]) + Sync,
    ) -> (CpuStorage, Shape) {
        let mut dx = vec![T::from_f64(0.0); self.n * self.c * self.in_plane()];
        dx.par_chunks_mut(self.in_plane())
            .zip(dy.par_chunks(self.out_plane()))
            .enumerate()
            .for_each(|(plane, (dx, dy))| {
                let mut acc = vec![0f64; dx.len()];
                scatter(plane, dy, &mut acc);
                for (d, a) in dx.iter_mut().zip(acc) {
                    *d = T::from_f64(a);
                }
            });
        (T::to_cpu_storage_owned(dx), self.in_shape())
    }

    #[cfg(feature = "cuda")]
    fn device(&self) -> crate::cuda::PoolGeom {
        crate::cuda::PoolGeom::new(
            self.n * self.c,
            [self.h, self.w, self.oh, self.ow],
            [self.k, self.s, self.p],
        )
    }
}

/// Each window's argmax (position in its plane), kept by the forward pass for the
/// backward pass, where the tensor was computed.
enum Argmax {
    Cpu(Vec<u32>),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>),
}

type SavedArgmax = Arc<Mutex<Option<Argmax>>>;

fn save(saved: &Option<SavedArgmax>, a: Argmax) {
    if let Some(slot) = saved {
        if let Ok(mut s) = slot.lock() {
            *s = Some(a);
        }
    }
}

struct MaxPool {
    pool: Pool2d,
    /// Where the forward pass leaves the argmax positions (`None`: no backward pass).
    saved: Option<SavedArgmax>,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "nofuss-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let g = Geom::new(l.dims(), &self.pool)?;
        with_cpu_dtype!(s.dtype(), T, {
            let x = slice::<T>(s, l)?;
            let mut y = vec![T::from_f64(0.0); g.n * g.c * g.out_plane()];
            let mut idx = vec![0u32; y.len()];
            let inside = g.windows_inside();
            y.par_chunks_mut(g.out_plane())
                .zip(idx.par_chunks_mut(g.out_plane()))
                .zip(x.par_chunks(g.in_plane()))
                .for_each(|((out, idx), plane)| {
                    if inside && g.k == 2 && g.s == 2 {
                        return g.max_2x2(plane, out, idx);
                    }
                    g.max_plane(plane, out, idx)
                });
            save(&self.saved, Argmax::Cpu(idx));
            Ok((T::to_cpu_storage_owned(y), g.out_shape()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = Geom::new(l.dims(), &self.pool)?;
        let len = g.n * g.c * g.out_plane();
        let (out, idx) = crate::cuda::max_pool_fwd(s, l, g.device(), len, self.saved.is_some())?;
        if let Some(idx) = idx {
            save(&self.saved, Argmax::Cuda(idx));
        }
        Ok((out, g.out_shape()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.clone().ok_or_else(|| {
            candle_core::Error::Msg("max pooling ran without gradient tracking".into())
        })?;
        let indices = MaxPoolIndices {
            geom: Geom::new(arg.dims(), &self.pool)?,
            saved,
        };
        Ok(Some(max_pool2d_backward(grad, &indices)?))
    }
}

/// Gradient of max pooling with respect to its input: `dy -> dx`, each output's
/// gradient routed to its window's saved argmax.
struct MaxPoolBwd {
    geom: Geom,
    saved: SavedArgmax,
}

impl MaxPoolBwd {
    fn missing() -> candle_core::Error {
        candle_core::Error::Msg("max pooling's argmax was not kept by its forward pass".into())
    }
}

impl CustomOp1 for MaxPoolBwd {
    fn name(&self) -> &'static str {
        "nofuss-max-pool2d-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let g = self.geom;
        let guard = self.saved.lock().map_err(|_| Self::missing())?;
        let Some(Argmax::Cpu(idx)) = guard.as_ref() else {
            return Err(Self::missing());
        };
        with_cpu_dtype!(s.dtype(), T, {
            let dy = slice::<T>(s, l)?;
            // Each output's gradient added at its argmax, in output order, in the
            // element type (f32 for bf16 and f16, rounded once at the end): PyTorch's
            // CPU scatter, and the sums the CUDA kernel gathers in the same order.
            let mut dx = vec![T::from_f64(0.0); g.n * g.c * g.in_plane()];
            let direct = matches!(T::DTYPE, DType::F32 | DType::F64);
            dx.par_chunks_mut(g.in_plane())
                .zip(dy.par_chunks(g.out_plane()))
                .zip(idx.par_chunks(g.out_plane()))
                .for_each(|((dx, dy), idx)| {
                    if direct {
                        for (&d, &i) in dy.iter().zip(idx) {
                            dx[i as usize] += d;
                        }
                        return;
                    }
                    let mut acc = vec![0f32; dx.len()];
                    for (&d, &i) in dy.iter().zip(idx) {
                        acc[i as usize] += d.to_f64() as f32;
                    }
                    for (o, a) in dx.iter_mut().zip(acc) {
                        *o = T::from_f64(a as f64);
                    }
                });
            Ok((T::to_cpu_storage_owned(dx), g.in_shape()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = self.geom;
        let guard = self.saved.lock().map_err(|_| Self::missing())?;
        let Some(Argmax::Cuda(idx)) = guard.as_ref() else {
            return Err(Self::missing());
        };
        let out = crate::cuda::max_pool_bwd(idx, s, l, g.device())?;
        Ok((out, g.in_shape()))
    }
}

struct AvgPool {
    pool: Pool2d,
    include_pad: bool,
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "nofuss-avg-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let g = Geom::new(l.dims(), &self.pool)?;
        with_cpu_dtype!(s.dtype(), T, {
            let x = slice::<T>(s, l)?;
            let mut y = vec![T::from_f64(0.0); g.n * g.c * g.out_plane()];
            let (rows, cols) = (g.spans(g.oh, g.h), g.spans(g.ow, g.w));
            let div = g.divisors(self.include_pad);
            // Separably: each input row's window sums, then each output's rows of them
            // added in order (the sums of the direct loop, in the same order).
            y.par_chunks_mut(g.out_plane())
                .zip(x.par_chunks(g.in_plane()))
                .for_each_init(Vec::new, |row_sums, (out, plane)| {
                    row_sums.clear();
                    for row in plane.chunks_exact(g.w) {
                        row_sums.extend(
                            cols.iter().map(|&(ws, we)| {
                                row[ws..we].iter().map(|v| v.to_f64()).sum::<f64>()
                            }),
                        );
                    }
                    for (yo, &(hs, he)) in rows.iter().enumerate() {
                        for xo in 0..g.ow {
                            let mut sum = 0f64;
                            for r in hs..he {
                                sum += row_sums[r * g.ow + xo];
                            }
                            out[yo * g.ow + xo] = T::from_f64(sum / div[yo * g.ow + xo]);
                        }
                    }
                });
            Ok((T::to_cpu_storage_owned(y), g.out_shape()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = Geom::new(l.dims(), &self.pool)?;
        let len = g.n * g.c * g.out_plane();
        let out = crate::cuda::avg_pool_fwd(s, l, g.device(), len, self.include_pad)?;
        Ok((out, g.out_shape()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(avg_pool2d_backward(
            grad,
            arg.dims(),
            &self.pool,
            self.include_pad,
        )?))
    }
}

/// Gradient of average pooling with respect to its input: `dy -> dx`.
struct AvgPoolBwd {
    geom: Geom,
    include_pad: bool,
}

impl CustomOp1 for AvgPoolBwd {
    fn name(&self) -> &'static str {
        "nofuss-avg-pool2d-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let g = self.geom;
        with_cpu_dtype!(s.dtype(), T, {
            let dy = slice::<T>(s, l)?;
            let (rows, cols) = (g.spans(g.oh, g.h), g.spans(g.ow, g.w));
            let div = g.divisors(self.include_pad);
            Ok(g.input_grad(dy, |_, dy, acc| {
                // Separably: each output's share added to the input rows its window
                // covers (per output column), then spread along each row.
                let mut col_sums = vec![0f64; g.h * g.ow];
                for (yo, &(hs, he)) in rows.iter().enumerate() {
                    for xo in 0..g.ow {
                        let v = dy[yo * g.ow + xo].to_f64() / div[yo * g.ow + xo];
                        for r in hs..he {
                            col_sums[r * g.ow + xo] += v;
                        }
                    }
                }
                for (row, sums) in acc.chunks_exact_mut(g.w).zip(col_sums.chunks_exact(g.ow)) {
                    for (&(ws, we), &v) in cols.iter().zip(sums) {
                        row[ws..we].iter_mut().for_each(|a| *a += v);
                    }
                }
            }))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = self.geom;
        let out = crate::cuda::avg_pool_bwd(s, l, g.device(), self.include_pad)?;
        Ok((out, g.in_shape()))
    }
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
    fn max_ties_route_to_the_first_and_nan_wins() {
        // PyTorch: the first maximum in row-major order takes the gradient; a NaN wins.
        let x = Var::new(&[[[[1f32, 1.0], [1.0, 0.0]]]], &Device::Cpu).unwrap();
        let y = max_pool2d(x.as_tensor(), &Pool2d::new(2, 2)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        assert_eq!(gx.to_vec1::<f32>().unwrap(), vec![1.0, 0.0, 0.0, 0.0]);
        let x = Tensor::new(&[[[[1f32, f32::NAN], [3.0, 0.0]]]], &Device::Cpu).unwrap();
        let y = max_pool2d(&x, &Pool2d::new(2, 2)).unwrap();
        assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
    }

    #[test]
    fn max_keys_order_like_the_floats() {
        // Every bf16 and f16 bit pattern, and f32 / f64 specials plus scattered patterns:
        // NaN <=> i64::MAX, and sorted by value, keys rise exactly where values do.
        fn check<T: MaxKey>(vals: Vec<T>) {
            let mut pairs: Vec<(f64, i64)> = Vec::new();
            for v in vals {
                let (f, k) = (v.to_f64(), v.max_key());
                assert_eq!(f.is_nan(), k == i64::MAX, "{f}");
                if !f.is_nan() {
                    pairs.push((f, k));
                }
            }
            pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
            for w in pairs.windows(2) {
                let ((a, ka), (b, kb)) = (w[0], w[1]);
                assert_eq!(a < b, ka < kb, "{a} {b}");
                assert_eq!(a == b, ka == kb, "{a} {b}");
            }
        }
        check((0..=u16::MAX).map(half::bf16::from_bits).collect());
        check((0..=u16::MAX).map(half::f16::from_bits).collect());
        let bits32 = (0..200_000u32).map(|i| i.wrapping_mul(2_654_435_761));
        let specials = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ];
        let mut f32s: Vec<f32> = bits32.clone().map(f32::from_bits).collect();
        f32s.extend(specials.iter().map(|&v| v as f32));
        f32s.extend([
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::MAX,
        ]);
        check(f32s);
        let mut f64s: Vec<f64> = bits32
            .map(|b| f64::from_bits((b as u64) << 32 | b.rotate_left(7) as u64))
            .collect();
        f64s.extend(specials);
        f64s.extend([f64::from_bits(1), -f64::from_bits(1), f64::MAX, f64::MIN]);
        check(f64s);
    }

    #[test]
    fn max_pool_ties_signed_zeros_and_nans_route_as_in_pytorch() {
        // Values drawn from a few (ties everywhere, -0 beside +0, NaNs): every path (2x2,
        // inside windows, border windows) against PyTorch's rule written out with float
        // compares, `v > m || isnan(v)` from the window's first element: the output's bits
        // and where each output's gradient lands.
        let pick = [-1.0, -0.0, 0.0, 0.5, 2.0, f64::NAN, 2.0, 0.5];
        for &(k, s, pad, ceil) in &[
            (2, 2, 0, false),
            (3, 2, 0, true),
            (3, 1, 1, true),
            (3, 2, 1, true),
        ] {
            let p = Pool2d {
                kernel: k,
                stride: s,
                padding: pad,
                ceil_mode: ceil,
            };
            // The wider planes have several groups of interior windows side by side and a
            // tail at every stride.
            for (dt, (h, w)) in [candle_core::DType::F32, candle_core::DType::F64]
                .into_iter()
                .flat_map(|dt| [(7, 8), (9, 23), (5, 40)].map(|hw| (dt, hw)))
            {
                let (n, c) = (2, 2);
                let vals: Vec<f64> = (0..n * c * h * w)
                    .map(|i| pick[((i * 2_654_435_761usize) >> 7) % pick.len()])
                    .collect();
                let x = Tensor::from_vec(vals.clone(), (n, c, h, w), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let (y, idx) = max_pool2d_with_indices(&x, &p).unwrap();
                let (oh, ow) = (p.output_len(h).unwrap(), p.output_len(w).unwrap());
                let dy = Tensor::arange(1f64, (n * c * oh * ow + 1) as f64, &Device::Cpu)
                    .unwrap()
                    .reshape((n, c, oh, ow))
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let gx = max_pool2d_backward(&dy, &idx).unwrap();
                let got_y = y.to_dtype(candle_core::DType::F64).unwrap();
                let got_y = got_y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let got_g = gx.to_dtype(candle_core::DType::F64).unwrap();
                let got_g = got_g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let mut want_g = vec![0f64; vals.len()];
                for plane in 0..n * c {
                    for yo in 0..oh {
                        for xo in 0..ow {
                            let lo = |o: usize| (o * s).saturating_sub(pad);
                            let hi = |o: usize, len: usize| (o * s + k - pad).min(len);
                            let base = plane * h * w;
                            let mut at = base + lo(yo) * w + lo(xo);
                            for yy in lo(yo)..hi(yo, h) {
                                for xx in lo(xo)..hi(xo, w) {
                                    let v = vals[base + yy * w + xx];
                                    if v > vals[at] || v.is_nan() {
                                        at = base + yy * w + xx;
                                    }
                                }
                            }
                            let o = (plane * oh + yo) * ow + xo;
                            let (a, b) = (got_y[o], vals[at]);
                            let what = format!("{p:?} {dt:?} output {o}");
                            assert!(
                                a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan(),
                                "{what}: {a} vs {b}"
                            );
                            want_g[at] += (o + 1) as f64;
                        }
                    }
                }
                assert_eq!(got_g, want_g, "{p:?} {dt:?}");
            }
        }
    }

    #[test]
    fn f64_and_bf16_agree_with_f32() {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 7.0 * 7.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 7, 7))
            .unwrap()
            .sin()
            .unwrap();
        let p = Pool2d {
            kernel: 3,
            stride: 2,
            padding: 1,
            ceil_mode: true,
        };
        for avg in [false, true] {
            let run = |dt: candle_core::DType| {
                let x = x.to_dtype(dt).unwrap();
                let y = if avg {
                    avg_pool2d(&x, &p, false).unwrap()
                } else {
                    max_pool2d(&x, &p).unwrap()
                };
                assert_eq!(y.dtype(), dt);
                y.to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let want = run(candle_core::DType::F32);
            for (dt, tol) in [
                (candle_core::DType::F64, 1e-6),
                (candle_core::DType::BF16, 1e-2),
            ] {
                for (a, b) in run(dt).iter().zip(&want) {
                    assert!((a - b).abs() < tol, "{dt:?} avg={avg}: {a} vs {b}");
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
