//! 2-D convolution that uses cuDNN on CUDA, forward and backward.
//!
//! candle 0.11 convolves through im2col + GEMM and computes the input gradient with a
//! naive transposed-convolution kernel; on CUDA that is 4-18x slower than cuDNN for the
//! convolutions of BN-Inception. [`conv2d`] runs the forward pass, the input gradient
//! (backward-data) and the weight gradient (backward-filter) through cuDNN when the
//! tensors live on a CUDA device (crate feature `cuda`), with cuDNN's heuristic choice of
//! algorithm cached per shape, and through candle's own convolution (and its autograd)
//! everywhere else, so code above it stays device-generic.
//!
//! f32 convolutions on CUDA may use TF32 tensor cores, as PyTorch's do by default;
//! [`set_tf32`] turns that off for exact comparisons. [`set_algo_search`] chooses how
//! cuDNN's algorithm for a shape is found: its heuristic (the default) or by timing them
//! all once ([`AlgoSearch::Benchmark`], PyTorch's `cudnn.benchmark = True`).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
//! use nofuss_tensor::conv::Conv2d;
//!
//! let params = VarMap::new();
//! let vb = VarBuilder::from_varmap(&params, DType::F32, &Device::Cpu);
//! let cfg = Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
//! let conv = Conv2d::new(3, 8, 3, cfg, true, vb.pp("conv"))?;
//! let y = conv.forward(&Tensor::zeros((2, 3, 9, 9), DType::F32, &Device::Cpu)?)?;
//! assert_eq!(y.dims(), &[2, 8, 5, 5]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Module, Result, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder};

static TF32: AtomicBool = AtomicBool::new(true);
static BENCHMARK: AtomicBool = AtomicBool::new(false);

/// How the cuDNN algorithm of a convolution shape and pass is chosen (on CUDA; the CPU
/// has one algorithm). The choice is made on a shape's first call and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlgoSearch {
    /// cuDNN's heuristic pick, at once (PyTorch's default, `cudnn.benchmark = False`).
    #[default]
    Heuristic,
    /// Every algorithm timed once by cuDNN and the fastest kept (PyTorch's
    /// `cudnn.benchmark = True`): a slower first step, and often faster ones after.
    Benchmark,
}

/// Sets how cuDNN algorithms are chosen for shapes not seen yet (process-wide).
pub fn set_algo_search(search: AlgoSearch) {
    BENCHMARK.store(search == AlgoSearch::Benchmark, Ordering::Relaxed);
}

/// How cuDNN algorithms are chosen for shapes not seen yet.
pub fn algo_search() -> AlgoSearch {
    if BENCHMARK.load(Ordering::Relaxed) {
        AlgoSearch::Benchmark
    } else {
        AlgoSearch::Heuristic
    }
}

/// Allows (the default) or forbids TF32 tensor-core arithmetic in f32 cuDNN convolutions.
pub fn set_tf32(allow: bool) {
    TF32.store(allow, Ordering::Relaxed);
}

/// Whether f32 cuDNN convolutions may use TF32.
pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// `conv2d(x, w) + bias` for `x: [N, C_in, H, W]`, `w: [C_out, C_in / groups, K, K]`,
/// `bias: [C_out]`, with `cfg`'s padding, stride, dilation and groups.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: &Conv2dConfig) -> Result<Tensor> {
    let y = if x.device().is_cuda() {
        cuda_conv(x, w, cfg)?
    } else if x.device().is_cpu()
        && cfg.groups == 1
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == w.dtype()
    {
        let g = cpu_ops::Geom::new(x, w, cfg)?;
        x.contiguous()?
            .apply_op2(&w.contiguous()?, cpu_ops::Conv(g, cpu_ops::Pass::Forward))?
    } else {
        x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?
    };
    match bias {
        None => Ok(y),
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
    }
}

/// The CPU convolution, a tile of images at a time: im2col of the tile into a
/// `[C_in K K, images OH OW]` matrix and one product with the weight, written straight
/// into the output's `[C_out, OH OW]` planes when the tile is one image; a 1x1
/// convolution with stride 1 multiplies the input planes themselves. Backward: the input
/// gradient is the weight's transpose times the output gradient, folded back by col2im
/// (or written straight into the input gradient for 1x1 stride 1); the weight gradient is
/// the output gradient times the recomputed columns, summed over the tiles in order.
/// Tiles are whole images, grouped until a tile's product is [`cpu_ops::TILE_COLUMNS`]
/// wide, so large maps never build a batch-sized column matrix (nor a batch-sized
/// transposed copy of the output or its gradient) and small maps still multiply wide
/// matrices. (candle 0.11's own CPU backward computes the input gradient with a direct
/// transposed convolution, several times slower, and gives it the wrong width when a
/// non-square input leaves different remainders under the stride.)
mod cpu_ops {
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
    use candle_nn::Conv2dConfig;
    use gemm::Parallelism;
    use rayon::prelude::*;

    use crate::cpu::{matmul, parallelism, slice, Mat};
    use std::ops::Range;

    /// Columns a tile's matrix product should reach: images are grouped into a tile until
    /// they have this many output positions (one image when it alone has them).
    pub(super) const TILE_COLUMNS: usize = 2048;

    /// Sizes of one convolution (groups = 1) and its tiling.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Geom {
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        k_h: usize,
        k_w: usize,
        oh: usize,
        ow: usize,
        stride: usize,
        pad: usize,
        dil: usize,
        /// Images per tile.
        tile: usize,
    }

    impl Geom {
        pub(super) fn new(x: &Tensor, w: &Tensor, cfg: &Conv2dConfig) -> Result<Self> {
            let (n, c_in, h, wd) = x.dims4()?;
            let (c_out, c_w, k_h, k_w) = w.dims4()?;
            if c_w != c_in {
                candle_core::bail!("conv2d: input has {c_in} channels, weight {:?}", w.dims());
            }
            let out = |len, k| super::output_len(len, k, cfg);
            let (oh, ow) = (out(h, k_h)?, out(wd, k_w)?);
            Ok(Self {
                n,
                c_in,
                h,
                w: wd,
                c_out,
                k_h,
                k_w,
                oh,
                ow,
                stride: cfg.stride,
                pad: cfg.padding,
                dil: cfg.dilation,
                tile: TILE_COLUMNS.div_ceil((oh * ow).max(1)).clamp(1, n.max(1)),
            })
        }

        /// The same convolution cut into tiles of `images` images.
        #[cfg(test)]
        pub(super) fn with_tile(mut self, images: usize) -> Self {
            self.tile = images.clamp(1, self.n.max(1));
            self
        }

        /// Rows of the column matrix: `C_in K_h K_w`, the weight's inner order.
        fn rows(&self) -> usize {
            self.c_in * self.k_h * self.k_w
        }

        fn hw(&self) -> usize {
            self.h * self.w
        }

        fn ohw(&self) -> usize {
            self.oh * self.ow
        }

        /// 1x1, stride 1, no padding: an image's column matrix is the image itself.
        fn pointwise(&self) -> bool {
            self.k_h == 1 && self.k_w == 1 && self.stride == 1 && self.pad == 0
        }

        /// `(first image, images)` of every tile, in order.
        fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
            let (n, t) = (self.n, self.tile);
            (0..n).step_by(t).map(move |b| (b, t.min(n - b)))
        }

        /// Input row (or column) read by output `o` at kernel offset `k`, if inside.
        pub(super) fn src(&self, o: usize, k: usize, len: usize) -> Option<usize> {
            let i = (o * self.stride + k * self.dil) as isize - self.pad as isize;
            (i >= 0 && (i as usize) < len).then_some(i as usize)
        }

        /// The outputs `o` in `0..outs` whose input `src(o, k, len)` is inside, a range
        /// (the inputs they read are `src(range.start)` on, every `stride`-th).
        pub(super) fn inside(&self, k: usize, len: usize, outs: usize) -> Range<usize> {
            let (s, off) = (
                self.stride as isize,
                (k * self.dil) as isize - self.pad as isize,
            );
            // o s + off >= 0 and o s + off < len, for o >= 0.
            let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
            let hi = (len as isize - off + s - 1).div_euclid(s).max(0);
            let (lo, hi) = (lo as usize, (hi as usize).min(outs));
            lo.min(hi)..hi
        }

        fn x_shape(&self) -> Shape {
            Shape::from((self.n, self.c_in, self.h, self.w))
        }

        fn y_shape(&self) -> Shape {
            Shape::from((self.n, self.c_out, self.oh, self.ow))
        }

        fn w_shape(&self) -> Shape {
            Shape::from((self.c_out, self.c_in, self.k_h, self.k_w))
        }
    }

    /// Scratch buffers of one worker: column matrix, and a product or gathered gradient.
    /// Taken from the thread's kept pair on creation and handed back on drop, so that a
    /// thread's next convolution (and the next step's) reuses them: made afresh for every
    /// call, each column matrix was new memory, zero-filled by `resize` after the kernel
    /// had zeroed its pages on first touch (about 5% of a small-CNN CPU step).
    struct Scratch<T: 'static>(Vec<T>, Vec<T>);

    thread_local! {
        /// Each thread's kept scratch buffers, at most one pair per element type.
        static KEPT: std::cell::RefCell<Vec<Box<dyn std::any::Any>>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    impl<T: WithDType + 'static> Scratch<T> {
        fn new() -> Self {
            let kept = KEPT.with(|k| {
                let mut k = k.borrow_mut();
                let at = k.iter().position(|b| b.is::<(Vec<T>, Vec<T>)>())?;
                k.swap_remove(at).downcast::<(Vec<T>, Vec<T>)>().ok()
            });
            let (a, b) = kept.map(|b| *b).unwrap_or_default();
            Self(a, b)
        }
    }

    impl<T: 'static> Drop for Scratch<T> {
        fn drop(&mut self) {
            let pair = (std::mem::take(&mut self.0), std::mem::take(&mut self.1));
            // A thread that already keeps a pair of this type (two scratches alive at
            // once, as when rayon runs another tile here) keeps the first one back.
            let _ = KEPT.try_with(|k| {
                if let Ok(mut k) = k.try_borrow_mut() {
                    if !k.iter().any(|b| b.is::<(Vec<T>, Vec<T>)>()) {
                        k.push(Box::new(pair));
                    }
                }
            });
        }
    }

    /// The first `len` values of `buf`, grown if needed (old values are left: callers
    /// overwrite all of them).
    fn scratch<T: WithDType>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
        if buf.len() < len {
            buf.resize(len, T::zero());
        }
        &mut buf[..len]
    }

    /// Runs `f(scratch, first image, images, out, parallelism)` for every tile, `out` being
    /// the tile's part of `out_all` (`per_image` values per image): tiles in parallel with
    /// single-threaded products when there are enough of them for every thread, else one
    /// after another with multi-threaded products. Each value of `out_all` is written by
    /// one tile, so the result does not depend on the order.
    fn for_tiles<T, F>(g: &Geom, out_all: &mut [T], per_image: usize, f: F)
    where
        T: WithDType,
        F: Fn(&mut Scratch<T>, usize, usize, &mut [T], Parallelism) + Send + Sync,
    {
        if out_all.is_empty() || per_image == 0 {
            return;
        }
        let chunk = g.tile * per_image;
        let tiles = g.n.div_ceil(g.tile);
        let threads = rayon::current_num_threads();
        if threads > 1 && tiles >= threads {
            out_all
                .par_chunks_mut(chunk)
                .enumerate()
                .for_each_init(Scratch::new, |s, (i, out)| {
                    f(s, i * g.tile, out.len() / per_image, out, Parallelism::None)
                });
        } else {
            let mut s = Scratch::new();
            for (i, out) in out_all.chunks_mut(chunk).enumerate() {
                f(
                    &mut s,
                    i * g.tile,
                    out.len() / per_image,
                    out,
                    parallelism(true),
                );
            }
        }
    }

    /// The column matrix `[C_in K K, images OH OW]` of images `first..first + images`.
    fn im2col<T: WithDType>(g: &Geom, x: &[T], first: usize, images: usize, cols: &mut [T]) {
        let (ohw, hw, kk) = (g.ohw(), g.hw(), g.k_h * g.k_w);
        let width = images * ohw;
        cols.par_chunks_mut(width.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let (ci, k) = (r / kk, r % kk);
                let (ky, kx) = (k / g.k_w, k % g.k_w);
                for j in 0..images {
                    let plane = &x[((first + j) * g.c_in + ci) * hw..][..hw];
                    let out = &mut row[j * ohw..][..ohw];
                    if g.pointwise() {
                        out.copy_from_slice(plane);
                        continue;
                    }
                    for (oy, dst) in out.chunks_mut(g.ow.max(1)).enumerate() {
                        let Some(iy) = g.src(oy, ky, g.h) else {
                            dst.fill(T::zero());
                            continue;
                        };
                        let src = &plane[iy * g.w..][..g.w];
                        let r = g.inside(kx, g.w, dst.len());
                        dst[..r.start].fill(T::zero());
                        dst[r.end..].fill(T::zero());
                        if let Some(ix) = g.src(r.start, kx, g.w).filter(|_| !r.is_empty()) {
                            let inner = &mut dst[r];
                            if g.stride == 1 {
                                inner.copy_from_slice(&src[ix..][..inner.len()]);
                            } else {
                                let read = src[ix..].iter().step_by(g.stride);
                                for (d, &v) in inner.iter_mut().zip(read) {
                                    *d = v;
                                }
                            }
                        }
                    }
                }
            });
    }

    /// Adds a tile's column gradient `[C_in K K, images OH OW]` into its images' input
    /// gradient `dx` (`[images, C_in, H, W]`), summing overlapping windows.
    fn col2im<T: WithDType>(g: &Geom, dcols: &[T], dx: &mut [T]) {
        let (ohw, hw, kk) = (g.ohw(), g.hw(), g.k_h * g.k_w);
        let width = dx.len() / (g.c_in * hw) * ohw;
        dx.par_chunks_mut(hw).enumerate().for_each(|(p, plane)| {
            let (j, ci) = (p / g.c_in, p % g.c_in);
            for k in 0..kk {
                let (ky, kx) = (k / g.k_w, k % g.k_w);
                let row = &dcols[(ci * kk + k) * width + j * ohw..][..ohw];
                for (oy, src) in row.chunks(g.ow.max(1)).enumerate() {
                    let Some(iy) = g.src(oy, ky, g.h) else {
                        continue;
                    };
                    let dst = &mut plane[iy * g.w..][..g.w];
                    let r = g.inside(kx, g.w, src.len());
                    if let Some(ix) = g.src(r.start, kx, g.w).filter(|_| !r.is_empty()) {
                        let read = &src[r];
                        if g.stride == 1 {
                            for (d, &v) in dst[ix..][..read.len()].iter_mut().zip(read) {
                                *d += v;
                            }
                        } else {
                            let written = dst[ix..].iter_mut().step_by(g.stride);
                            for (d, &v) in written.zip(read) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        });
    }

    /// A tile's output gradient as `[C_out, images OH OW]`: the image's own planes for a
    /// one-image tile, else gathered into `buf`.
    fn gradient_rows<'a, T: WithDType>(
        g: &Geom,
        dy: &'a [T],
        first: usize,
        images: usize,
        buf: &'a mut Vec<T>,
    ) -> Mat<'a, T> {
        let (ohw, per_image) = (g.ohw(), g.c_out * g.ohw());
        if images == 1 {
            return Mat::dense(&dy[first * per_image..][..per_image], g.c_out, ohw);
        }
        let width = images * ohw;
        let rows = scratch(buf, g.c_out * width);
        rows.par_chunks_mut(width.max(1))
            .enumerate()
            .for_each(|(co, row)| {
                for (j, dst) in row.chunks_mut(ohw.max(1)).enumerate() {
                    dst.copy_from_slice(&dy[((first + j) * g.c_out + co) * ohw..][..ohw]);
                }
            });
        Mat::dense(rows, g.c_out, width)
    }

    /// A tile's column matrix `[C_in K K, images OH OW]`: the image's own planes for a
    /// one-image tile of a 1x1 stride-1 convolution, else built by im2col into `buf`.
    fn columns<'a, T: WithDType>(
        g: &Geom,
        x: &'a [T],
        first: usize,
        images: usize,
        buf: &'a mut Vec<T>,
    ) -> Mat<'a, T> {
        let (rows, width) = (g.rows(), images * g.ohw());
        if g.pointwise() && images == 1 {
            return Mat::dense(&x[first * rows * width..][..rows * width], rows, width);
        }
        let cols = scratch(buf, rows * width);
        im2col(g, x, first, images, cols);
        Mat::dense(cols, rows, width)
    }

    fn forward<T: WithDType>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
        let ohw = g.ohw();
        let wm = Mat::dense(w, g.c_out, g.rows());
        let mut y = vec![T::zero(); g.n * g.c_out * ohw];
        for_tiles(g, &mut y, g.c_out * ohw, |s, first, images, out, par| {
            let cols = columns(g, x, first, images, &mut s.0);
            if images == 1 {
                return matmul(out, false, wm, cols, par);
            }
            // [C_out, images OH OW] -> the images' [C_out, OH OW] planes.
            let width = cols.cols;
            let prod = scratch(&mut s.1, g.c_out * width);
            matmul(prod, false, wm, cols, par);
            out.par_chunks_mut(ohw.max(1))
                .enumerate()
                .for_each(|(p, plane)| {
                    let (j, co) = (p / g.c_out, p % g.c_out);
                    plane.copy_from_slice(&prod[co * width + j * ohw..][..ohw]);
                });
        });
        y
    }

    fn grad_input<T: WithDType>(g: &Geom, dy: &[T], w: &[T]) -> Vec<T> {
        let (rows, hw) = (g.rows(), g.hw());
        let wt = Mat::dense(w, g.c_out, rows).t();
        let mut dx = vec![T::zero(); g.n * g.c_in * hw];
        for_tiles(g, &mut dx, g.c_in * hw, |s, first, images, out, par| {
            let dyt = gradient_rows(g, dy, first, images, &mut s.1);
            if g.pointwise() && images == 1 {
                return matmul(out, false, wt, dyt, par);
            }
            let dcols = scratch(&mut s.0, rows * dyt.cols);
            matmul(dcols, false, wt, dyt, par);
            col2im(g, dcols, out);
        });
        dx
    }

    /// Most partial sums the weight gradient is split into (see [`grad_weight`]).
    const WEIGHT_GROUPS: usize = 8;

    /// The weight gradient `dy colsᵀ`, summed over the tiles. Its product is small (`C_out
    /// x C_in K K`) and long (every output position of the batch), which a multi-threaded
    /// GEMM cannot share out, so the tiles are split into up to [`WEIGHT_GROUPS`] runs of
    /// consecutive tiles, each summed on one thread, and the runs' sums added in order:
    /// the grouping depends on the tile count only, so the result is the same on any
    /// number of threads. A single tile is one multi-threaded product.
    fn grad_weight<T: WithDType>(g: &Geom, x: &[T], dy: &[T]) -> Vec<T> {
        let (rows, len) = (g.rows(), g.c_out * g.rows());
        let tiles: Vec<(usize, usize)> = g.tiles().collect();
        let groups = tiles.len().clamp(1, WEIGHT_GROUPS);
        let per_group = tiles.len().div_ceil(groups).max(1);
        // Summed transposed, `[C_in K K, C_out]` = cols dyᵀ: gemm turns a row-major
        // product around to write column-major, so this way the column matrix (the larger
        // operand, `C_in K K` rows against `C_out`) is read in place and only the output
        // gradient's rows are packed; the other way round gemm copied the whole column
        // matrix into its packed layout first, most of this pass's time.
        let run = |tiles: &[(usize, usize)], par: Parallelism| -> Vec<T> {
            let mut dwt = vec![T::zero(); len];
            let mut s = Scratch::new();
            for (i, &(first, images)) in tiles.iter().enumerate() {
                let dyt = gradient_rows(g, dy, first, images, &mut s.1);
                let cols = columns(g, x, first, images, &mut s.0);
                matmul(&mut dwt, i > 0, cols, dyt.t(), par);
            }
            dwt
        };
        let dwt = if groups == 1 {
            run(&tiles, parallelism(true))
        } else {
            let partial: Vec<Vec<T>> = tiles
                .par_chunks(per_group)
                .map(|t| run(t, Parallelism::None))
                .collect();
            let mut parts = partial.into_iter();
            let mut dwt = parts.next().unwrap_or_else(|| vec![T::zero(); len]);
            for p in parts {
                for (d, v) in dwt.iter_mut().zip(p) {
                    *d += v;
                }
            }
            dwt
        };
        // `[C_in K K, C_out]` -> `[C_out, C_in K K]`.
        let mut dw = vec![T::zero(); len];
        for (r, row) in dwt.chunks_exact(g.c_out.max(1)).enumerate() {
            for (co, &v) in row.iter().enumerate() {
                dw[co * rows + r] = v;
            }
        }
        dw
    }

    /// Evaluates `$body` with `$T` the element type of an f32 or f64 storage and wraps
    /// the resulting vector in a storage of that type.
    macro_rules! float_op {
        ($s:expr, $what:expr, |$T:ident| $body:expr) => {
            match $s {
                CpuStorage::F32(_) => {
                    type $T = f32;
                    CpuStorage::F32($body)
                }
                CpuStorage::F64(_) => {
                    type $T = f64;
                    CpuStorage::F64($body)
                }
                s => candle_core::bail!("{} supports f32 and f64, not {:?}", $what, s.dtype()),
            }
        };
    }

    /// Which product a [`Conv`] op computes: `(x, w) -> y`, `(dy, w) -> dx` or
    /// `(x, dy) -> dw`.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Pass {
        Forward,
        GradInput,
        GradWeight,
    }

    /// One pass of the CPU convolution as a candle op (inputs contiguous); the forward
    /// pass's backward runs the other two.
    pub(super) struct Conv(pub Geom, pub Pass);

    impl CustomOp2 for Conv {
        fn name(&self) -> &'static str {
            match self.1 {
                Pass::Forward => "nofuss-conv2d-cpu",
                Pass::GradInput => "nofuss-conv2d-cpu-grad-input",
                Pass::GradWeight => "nofuss-conv2d-cpu-grad-weight",
            }
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let _timer = crate::profile::HostTimer::start(self.name());
            let Self(g, pass) = self;
            let out = float_op!(s1, self.name(), |T| {
                let (a, b) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
                match pass {
                    Pass::Forward => forward(g, a, b),
                    Pass::GradInput => grad_input(g, a, b),
                    Pass::GradWeight => grad_weight(g, a, b),
                }
            });
            let shape = match pass {
                Pass::Forward => g.y_shape(),
                Pass::GradInput => g.x_shape(),
                Pass::GradWeight => g.w_shape(),
            };
            Ok((out, shape))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            if !matches!(self.1, Pass::Forward) {
                return Err(candle_core::Error::BackwardNotSupported { op: self.name() });
            }
            let dy = dy.contiguous()?;
            // Only what the graph needs: the first layer's input (the images) takes no
            // gradient, frozen weights neither (PyTorch's `needs_input_grad`).
            let dw = w
                .track_op()
                .then(|| x.apply_op2_no_bwd(&dy, &Conv(self.0, Pass::GradWeight)))
                .transpose()?;
            let dx = x
                .track_op()
                .then(|| dy.apply_op2_no_bwd(w, &Conv(self.0, Pass::GradInput)))
                .transpose()?;
            Ok((dx, dw))
        }
    }
}

/// Output length along one axis of input length `len` under a `k`-wide kernel, or an
/// error when the kernel does not fit.
fn output_len(len: usize, k: usize, cfg: &Conv2dConfig) -> Result<usize> {
    let span = len + 2 * cfg.padding;
    let reach = cfg.dilation * (k - 1) + 1;
    if cfg.stride == 0 || span < reach {
        candle_core::bail!("conv2d: kernel {k} does not fit input {len} ({cfg:?})");
    }
    Ok((span - reach) / cfg.stride + 1)
}

#[cfg(not(feature = "cuda"))]
fn cuda_conv(x: &Tensor, w: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)
}

#[cfg(feature = "cuda")]
fn cuda_conv(x: &Tensor, w: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        cudnn_ops::Cudnn(cudnn_ops::Pass::Forward, cuda_key(x, w, cfg)?),
    )
}

/// The cuDNN description of convolving `x` with `w` under `cfg`, checked.
#[cfg(feature = "cuda")]
fn cuda_key(x: &Tensor, w: &Tensor, cfg: &Conv2dConfig) -> Result<crate::cuda::ConvKey> {
    let (n, c_in, h, wd) = x.dims4()?;
    let (c_out, c_per_group, k_h, k_w) = w.dims4()?;
    if x.dtype() != w.dtype() {
        candle_core::bail!(
            "conv2d: input {:?} and weight {:?} differ",
            x.dtype(),
            w.dtype()
        );
    }
    if cfg.groups == 0 || c_in != c_per_group * cfg.groups || c_out % cfg.groups != 0 {
        candle_core::bail!(
            "conv2d: {c_in} input channels do not fit a weight {:?} with {} groups",
            w.dims(),
            cfg.groups
        );
    }
    let out = |len, k| output_len(len, k, cfg);
    let i = |v: usize| v as i32;
    Ok(crate::cuda::ConvKey {
        x: [i(n), i(c_in), i(h), i(wd)],
        w: [i(c_out), i(c_per_group), i(k_h), i(k_w)],
        y: [i(n), i(c_out), i(out(h, k_h)?), i(out(wd, k_w)?)],
        padding: i(cfg.padding),
        stride: i(cfg.stride),
        dilation: i(cfg.dilation),
        groups: i(cfg.groups),
        dtype: x.dtype(),
        tf32: tf32(),
        benchmark: algo_search() == AlgoSearch::Benchmark,
    })
}

/// The gradients of `conv2d(x, w)` (no bias) for the output gradient `dy`: the input's
/// (only when `need_x`; the first layer's images need none) and the weight's, outside
/// candle's graph, for a caller that keeps its own tape ([`crate::tape::Tape`]). The same
/// passes as [`conv2d`]'s backward: cuDNN's backward-data and backward-filter on CUDA,
/// the tiled CPU products for f32 and f64 on the CPU, candle's autograd elsewhere.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    cfg: &Conv2dConfig,
    need_x: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let (x, w, dy) = (x.detach(), w.detach(), dy.detach().contiguous()?);
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let key = cuda_key(&x, &w, cfg)?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let dx = need_x
            .then(|| dy.apply_op2_no_bwd(&w, &cudnn_ops::Cudnn(cudnn_ops::Pass::BackwardData, key)))
            .transpose()?;
        let dw =
            x.apply_op2_no_bwd(&dy, &cudnn_ops::Cudnn(cudnn_ops::Pass::BackwardFilter, key))?;
        return Ok((dx, dw));
    }
    if x.device().is_cpu()
        && cfg.groups == 1
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == w.dtype()
    {
        let g = cpu_ops::Geom::new(&x, &w, cfg)?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let dx = need_x
            .then(|| dy.apply_op2_no_bwd(&w, &cpu_ops::Conv(g, cpu_ops::Pass::GradInput)))
            .transpose()?;
        let dw = x.apply_op2_no_bwd(&dy, &cpu_ops::Conv(g, cpu_ops::Pass::GradWeight))?;
        return Ok((dx, dw));
    }
    // Anything else (bf16 on the CPU, groups): candle's convolution and autograd, on a
    // graph of its own: d/dθ Σ conv(x, w) ⊙ dy.
    let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
    let y = xv.conv2d(&wv, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?;
    let grads = (y * dy.to_dtype(x.dtype())?)?.sum_all()?.backward()?;
    let missing = || candle_core::Error::Msg("conv2d_backward: no gradient".into());
    let dw = grads.get(wv.as_tensor()).ok_or_else(missing)?.clone();
    let dx = need_x
        .then(|| grads.get(xv.as_tensor()).cloned().ok_or_else(missing))
        .transpose()?;
    Ok((dx, dw))
}

#[cfg(feature = "cuda")]
mod cudnn_ops {
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

    use crate::cuda::{cudnn_conv, ConvKey, ConvPass};

    /// Which cuDNN pass an op runs: `(x, w) -> y`, `(dy, w) -> dx` or `(x, dy) -> dw`.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Pass {
        Forward,
        BackwardData,
        BackwardFilter,
    }

    /// One cuDNN convolution pass as a candle op; the forward pass's backward runs the
    /// other two.
    pub(super) struct Cudnn(pub Pass, pub ConvKey);

    impl CustomOp2 for Cudnn {
        fn name(&self) -> &'static str {
            match self.0 {
                Pass::Forward => "nofuss-cudnn-conv2d",
                Pass::BackwardData => "nofuss-cudnn-conv2d-backward-data",
                Pass::BackwardFilter => "nofuss-cudnn-conv2d-backward-filter",
            }
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(
                "{} runs on CUDA only (CPU tensors use candle's convolution)",
                self.name()
            )
        }

        fn cuda_fwd(
            &self,
            a: &CudaStorage,
            al: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let key = self.1;
            let (pass, out) = match self.0 {
                Pass::Forward => (
                    ConvPass::Forward {
                        x: (a, al),
                        w: (b, bl),
                    },
                    key.y,
                ),
                Pass::BackwardData => (
                    ConvPass::BackwardData {
                        dy: (a, al),
                        w: (b, bl),
                    },
                    key.x,
                ),
                Pass::BackwardFilter => (
                    ConvPass::BackwardFilter {
                        x: (a, al),
                        dy: (b, bl),
                    },
                    key.w,
                ),
            };
            let y = cudnn_conv(pass, key)?;
            Ok((y, Shape::from(out.map(|d| d as usize).to_vec())))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            if !matches!(self.0, Pass::Forward) {
                return Err(candle_core::Error::BackwardNotSupported { op: self.name() });
            }
            let dy = dy.contiguous()?;
            // As on the CPU: no input gradient for the images, none for frozen weights.
            let dx = x
                .track_op()
                .then(|| dy.apply_op2_no_bwd(w, &Cudnn(Pass::BackwardData, self.1)))
                .transpose()?;
            let dw = w
                .track_op()
                .then(|| x.apply_op2_no_bwd(&dy, &Cudnn(Pass::BackwardFilter, self.1)))
                .transpose()?;
            Ok((dx, dw))
        }
    }
}

/// A convolution layer with candle-nn's parameter names (`weight`, `bias`) and
/// initialisation, run through [`conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

impl Conv2d {
    /// Creates (or loads, through `vb`) a `c_in -> c_out` convolution with a square
    /// `kernel`, with or without bias.
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let layer = if bias {
            candle_nn::conv2d(c_in, c_out, kernel, cfg, vb)?
        } else {
            candle_nn::conv2d_no_bias(c_in, c_out, kernel, cfg, vb)?
        };
        Ok(Self {
            weight: layer.weight().clone(),
            bias: layer.bias().cloned(),
            cfg,
        })
    }

    /// The weight, `[C_out, C_in / groups, K, K]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Padding, stride, dilation and groups.
    pub fn config(&self) -> &Conv2dConfig {
        &self.cfg
    }

    /// Runs the convolution with the weight (and bias) cast to `x`'s dtype, so a bf16
    /// input computes in bf16 while the parameters stay f32 (their gradients too).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let w = self.weight.to_dtype(dt)?;
        let b = self.bias.as_ref().map(|b| b.to_dtype(dt)).transpose()?;
        conv2d(x, &w, b.as_ref(), &self.cfg)
    }

    /// [`Self::forward`] without adding the bias, for a caller that folds the bias into
    /// what follows (see [`crate::batch_norm::BatchNorm2d::forward_shifted_t`]).
    pub fn forward_unbiased(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight.to_dtype(x.dtype())?, None, &self.cfg)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Conv2d::forward(self, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::values;
    use candle_core::{Device, Var};

    fn config(padding: usize, stride: usize, dilation: usize) -> Conv2dConfig {
        Conv2dConfig {
            padding,
            stride,
            dilation,
            groups: 1,
            cudnn_fwd_algo: None,
        }
    }

    fn ramp(shape: (usize, usize, usize, usize), k: usize) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f64> = (0..n).map(|i| ((i * k) % 17) as f64 / 8.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Scratch buffers kept from earlier convolutions never leak into later ones: after
    /// convolutions of NaN inputs of other shapes left NaNs in every thread's kept
    /// buffers, a padded, strided convolution and its gradients come out bit for bit as
    /// before them.
    #[test]
    fn kept_scratch_buffers_never_leak_into_results() {
        let run = || {
            let (x, w) = (
                Var::from_tensor(&ramp((3, 2, 9, 7), 5)).unwrap(),
                Var::from_tensor(&ramp((4, 2, 3, 3), 3)).unwrap(),
            );
            let y = conv2d(x.as_tensor(), w.as_tensor(), None, &config(2, 2, 1)).unwrap();
            let g = ramp(y.dims4().unwrap(), 7);
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            [
                y,
                grads.get(x.as_tensor()).unwrap().clone(),
                grads.get(w.as_tensor()).unwrap().clone(),
            ]
            .map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
        };
        let before = run();
        for (shape, k) in [((4, 3, 12, 11), 3), ((2, 5, 8, 8), 1), ((6, 2, 10, 9), 5)] {
            let x = Var::from_tensor(&(ramp(shape, 1) * f64::NAN).unwrap()).unwrap();
            let w = Var::from_tensor(&(ramp((3, shape.1, k, k), 2) * f64::NAN).unwrap()).unwrap();
            let y = conv2d(x.as_tensor(), w.as_tensor(), None, &config(1, 1, 1)).unwrap();
            let grads = y.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(w.as_tensor()).is_some());
        }
        let after = run();
        for (a, b) in after.iter().zip(&before) {
            assert!(a.iter().all(|v| v.is_finite()));
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    /// The range of outputs whose input is inside equals the outputs `src` finds inside,
    /// for every stride, padding (up to beyond the kernel's reach), dilation and offset.
    #[test]
    fn inside_ranges_are_exactly_the_outputs_that_read_inside() {
        let x = Tensor::zeros((1, 1, 9, 9), DType::F32, &Device::Cpu).unwrap();
        for k in [1usize, 2, 3, 5, 7] {
            let w = Tensor::zeros((1, 1, k, k), DType::F32, &Device::Cpu).unwrap();
            for (stride, padding, dilation) in
                (1..=3).flat_map(|s| (0..=4).flat_map(move |p| (1..=2).map(move |d| (s, p, d))))
            {
                let Ok(g) = cpu_ops::Geom::new(&x, &w, &config(padding, stride, dilation)) else {
                    continue; // a kernel wider than the padded input
                };
                for len in [1usize, 4, 9] {
                    for outs in [0usize, 1, 3, 6] {
                        for kk in 0..k {
                            let want: Vec<usize> =
                                (0..outs).filter(|&o| g.src(o, kk, len).is_some()).collect();
                            let got: Vec<usize> = g.inside(kk, len, outs).collect();
                            assert_eq!(got, want, "k{k} s{stride} p{padding} d{dilation} {kk}");
                        }
                    }
                }
            }
        }
    }

    /// The CPU op (im2col + products) against candle's own convolution, including
    /// dilation, which the PyTorch fixture does not cover; gradients against exact central
    /// differences (the loss is linear in each input). candle 0.11's own backward is not
    /// the reference: it pads the input gradient of a strided convolution by the height's
    /// remainder in both directions, so a 9 x 8 input with stride 2 gets a 9 x 7 gradient.
    #[test]
    fn cpu_op_matches_candle_with_stride_padding_dilation() {
        for &(k, stride, padding, dilation) in
            &[(3, 1, 1, 1), (3, 2, 2, 2), (1, 1, 0, 1), (5, 3, 1, 1)]
        {
            let (x0, w0) = (ramp((2, 3, 9, 8), 5), ramp((4, 3, k, k), 3));
            let cfg = config(padding, stride, dilation);
            let (x, w) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&w0).unwrap(),
            );
            let ours = conv2d(x.as_tensor(), w.as_tensor(), None, &cfg).unwrap();
            let theirs = x0.conv2d(&w0, padding, stride, dilation, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (&ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap();
            assert!(
                diff.max(0).unwrap().to_scalar::<f64>().unwrap() < 1e-12,
                "{cfg:?}"
            );
            let g = ramp(ours.dims4().unwrap(), 7);
            let loss = |x: &Tensor, w: &Tensor| -> f64 {
                let y = x.conv2d(w, padding, stride, dilation, 1).unwrap();
                (y * &g).unwrap().sum_all().unwrap().to_scalar().unwrap()
            };
            let grads = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for (v, is_x) in [(&x, true), (&w, false)] {
                let got = grads.get(v.as_tensor()).unwrap();
                assert_eq!(got.dims(), v.dims(), "{cfg:?}");
                let got = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let base = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                for i in (0..base.len()).step_by(if is_x { 5 } else { 1 }) {
                    let nudge = |h: f64| {
                        let mut b = base.clone();
                        b[i] += h;
                        let t = Tensor::from_vec(b, v.dims(), &Device::Cpu).unwrap();
                        if is_x {
                            loss(&t, &w0)
                        } else {
                            loss(&x0, &t)
                        }
                    };
                    let num = (nudge(0.5) - nudge(-0.5)) / 1.0;
                    assert!(
                        (got[i] - num).abs() < 1e-9,
                        "{cfg:?} x={is_x} [{i}]: {} vs {num}",
                        got[i]
                    );
                }
            }
        }
    }

    /// Output, input gradient and weight gradient of the CPU op cut into tiles of
    /// `tile` images (`None`: the default tiling).
    fn tiled(
        x0: &Tensor,
        w0: &Tensor,
        g: &Tensor,
        cfg: &Conv2dConfig,
        tile: Option<usize>,
    ) -> [Vec<f64>; 3] {
        let (x, w) = (Var::from_tensor(x0).unwrap(), Var::from_tensor(w0).unwrap());
        let mut geom = cpu_ops::Geom::new(x0, w0, cfg).unwrap();
        if let Some(t) = tile {
            geom = geom.with_tile(t);
        }
        let y = x
            .as_tensor()
            .apply_op2(w.as_tensor(), cpu_ops::Conv(geom, cpu_ops::Pass::Forward))
            .unwrap();
        let grads = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
        [
            values(&y),
            values(grads.get(x.as_tensor()).unwrap()),
            values(grads.get(w.as_tensor()).unwrap()),
        ]
    }

    /// Every tiling gives the default tiling's output and gradients (which the test above
    /// checks against candle and finite differences): one image per tile (the 1x1 case
    /// then multiplies the planes themselves), uneven tiles, one tile; in f64 and f32.
    /// And a one-thread pool (tiles one after another, single-threaded products) gives the
    /// same bits as the full pool.
    #[test]
    fn every_tiling_and_thread_count_gives_the_same_result() {
        for &(k, stride, padding) in &[(1, 1, 0), (3, 1, 1), (3, 2, 0), (1, 2, 0), (7, 2, 3)] {
            let cfg = Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            for dt in [DType::F64, DType::F32] {
                let x0 = ramp((5, 3, 11, 10), 5).to_dtype(dt).unwrap();
                let w0 = ramp((4, 3, k, k), 3).to_dtype(dt).unwrap();
                let y_dims = x0.conv2d(&w0, padding, stride, 1, 1).unwrap();
                let g = ramp(y_dims.dims4().unwrap(), 7).to_dtype(dt).unwrap();
                let want = tiled(&x0, &w0, &g, &cfg, None);
                let tol = if dt == DType::F64 { 1e-12 } else { 1e-4 };
                for tile in [1, 2, 3, 5] {
                    let got = tiled(&x0, &w0, &g, &cfg, Some(tile));
                    for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(want.iter().zip(&got)) {
                        let err = a
                            .iter()
                            .zip(b)
                            .map(|(p, q)| (p - q).abs())
                            .fold(0.0, f64::max);
                        assert!(
                            err <= tol,
                            "k{k} s{stride} p{padding} {dt:?} tile {tile} {what}: {err}"
                        );
                    }
                }
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                for tile in [1, 5] {
                    let one_thread = pool.install(|| tiled(&x0, &w0, &g, &cfg, Some(tile)));
                    assert_eq!(one_thread, tiled(&x0, &w0, &g, &cfg, Some(tile)));
                }
            }
        }
    }

    #[test]
    fn only_tracked_inputs_get_gradients() {
        // The images of a first layer and frozen weights take no gradient; what is
        // tracked gets the same gradient as when both are.
        let (x0, w0) = (ramp((2, 3, 7, 6), 5), ramp((4, 3, 3, 3), 3));
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let g = ramp((2, 4, 7, 6), 7);
        let (x, w) = (
            Var::from_tensor(&x0).unwrap(),
            Var::from_tensor(&w0).unwrap(),
        );
        let grads = |x: &Tensor, w: &Tensor| {
            (conv2d(x, w, None, &cfg).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let flat = values;
        let both = grads(x.as_tensor(), w.as_tensor());
        let images = grads(&x0, w.as_tensor());
        assert!(images.get(&x0).is_none());
        assert_eq!(
            flat(images.get(w.as_tensor()).unwrap()),
            flat(both.get(w.as_tensor()).unwrap())
        );
        let frozen = grads(x.as_tensor(), &w0);
        assert!(frozen.get(&w0).is_none());
        assert_eq!(
            flat(frozen.get(x.as_tensor()).unwrap()),
            flat(both.get(x.as_tensor()).unwrap())
        );
    }

    #[test]
    fn shape_errors_are_clear() {
        let x = ramp((1, 3, 5, 5), 1);
        let cfg = Conv2dConfig::default();
        let err = conv2d(&x, &ramp((2, 4, 3, 3), 1), None, &cfg).unwrap_err();
        assert!(err.to_string().contains("3 channels"), "{err}");
        let err = conv2d(&x, &ramp((2, 3, 7, 7), 1), None, &cfg).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
