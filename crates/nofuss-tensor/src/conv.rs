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
//! [`set_tf32`] turns that off for exact comparisons.
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

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

static TF32: AtomicBool = AtomicBool::new(true);

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
            .apply_op2(&w.contiguous()?, cpu_ops::Conv(g))?
    } else {
        x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?
    };
    match bias {
        None => Ok(y),
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
    }
}

/// The CPU convolution: im2col into a `[C_in K K, N OH OW]` matrix and one matrix
/// product forward; backward, one product for the weight gradient against the recomputed
/// columns and one for the column gradient, folded back by col2im. (candle 0.11's own CPU
/// backward computes the input gradient with a direct transposed convolution, several
/// times slower, and gives it the wrong width when a non-square input leaves different
/// remainders under the stride.)
mod cpu_ops {
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
    use candle_nn::Conv2dConfig;
    use rayon::prelude::*;

    use crate::cpu::slice;

    /// Sizes of one convolution (groups = 1).
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
    }

    impl Geom {
        pub(super) fn new(x: &Tensor, w: &Tensor, cfg: &Conv2dConfig) -> Result<Self> {
            let (n, c_in, h, wd) = x.dims4()?;
            let (c_out, c_w, k_h, k_w) = w.dims4()?;
            if c_w != c_in {
                candle_core::bail!("conv2d: input has {c_in} channels, weight {:?}", w.dims());
            }
            let out = |len, k| super::output_len(len, k, cfg);
            Ok(Self {
                n,
                c_in,
                h,
                w: wd,
                c_out,
                k_h,
                k_w,
                oh: out(h, k_h)?,
                ow: out(wd, k_w)?,
                stride: cfg.stride,
                pad: cfg.padding,
                dil: cfg.dilation,
            })
        }

        /// Rows of the column matrix: `C_in K_h K_w`, the weight's inner order.
        fn rows(&self) -> usize {
            self.c_in * self.k_h * self.k_w
        }

        /// Columns: every output position of every image.
        fn cols(&self) -> usize {
            self.n * self.oh * self.ow
        }

        /// Input row (or column) read by output `o` at kernel offset `k`, if inside.
        fn src(&self, o: usize, k: usize, len: usize) -> Option<usize> {
            let i = (o * self.stride + k * self.dil) as isize - self.pad as isize;
            (i >= 0 && (i as usize) < len).then_some(i as usize)
        }

        fn x_shape(&self) -> Shape {
            Shape::from((self.n, self.c_in, self.h, self.w))
        }

        fn y_shape(&self) -> Shape {
            Shape::from((self.n, self.c_out, self.oh, self.ow))
        }
    }

    fn im2col<T: WithDType>(g: &Geom, x: &[T]) -> Vec<T> {
        let (ohw, hw) = (g.oh * g.ow, g.h * g.w);
        let mut cols = vec![T::zero(); g.rows() * g.cols()];
        cols.par_chunks_mut(g.cols())
            .enumerate()
            .for_each(|(r, row)| {
                let (ci, kk) = (r / (g.k_h * g.k_w), r % (g.k_h * g.k_w));
                let (ky, kx) = (kk / g.k_w, kk % g.k_w);
                for b in 0..g.n {
                    let plane = &x[(b * g.c_in + ci) * hw..][..hw];
                    let out = &mut row[b * ohw..][..ohw];
                    for oy in 0..g.oh {
                        let Some(iy) = g.src(oy, ky, g.h) else {
                            continue;
                        };
                        let src = &plane[iy * g.w..][..g.w];
                        let dst = &mut out[oy * g.ow..][..g.ow];
                        for (ox, d) in dst.iter_mut().enumerate() {
                            if let Some(ix) = g.src(ox, kx, g.w) {
                                *d = src[ix];
                            }
                        }
                    }
                }
            });
        cols
    }

    fn col2im<T: WithDType>(g: &Geom, cols: &[T]) -> Vec<T> {
        let (ohw, hw, kk) = (g.oh * g.ow, g.h * g.w, g.k_h * g.k_w);
        let mut x = vec![T::zero(); g.n * g.c_in * hw];
        x.par_chunks_mut(hw).enumerate().for_each(|(p, plane)| {
            let (b, ci) = (p / g.c_in, p % g.c_in);
            for k in 0..kk {
                let (ky, kx) = (k / g.k_w, k % g.k_w);
                let row = &cols[(ci * kk + k) * g.cols() + b * ohw..][..ohw];
                for oy in 0..g.oh {
                    let Some(iy) = g.src(oy, ky, g.h) else {
                        continue;
                    };
                    let dst = &mut plane[iy * g.w..][..g.w];
                    for (ox, &v) in row[oy * g.ow..][..g.ow].iter().enumerate() {
                        if let Some(ix) = g.src(ox, kx, g.w) {
                            dst[ix] += v;
                        }
                    }
                }
            }
        });
        x
    }

    /// `[C_out, N, OH, OW]` (the product's layout) to `[N, C_out, OH, OW]`.
    fn to_nchw<T: WithDType>(g: &Geom, y: &[T]) -> Vec<T> {
        let ohw = g.oh * g.ow;
        let mut out = vec![T::zero(); y.len()];
        out.par_chunks_mut(ohw).enumerate().for_each(|(p, plane)| {
            let (b, co) = (p / g.c_out, p % g.c_out);
            plane.copy_from_slice(&y[(co * g.n + b) * ohw..][..ohw]);
        });
        out
    }

    /// `y = conv(x, w)`; inputs contiguous.
    pub(super) struct Conv(pub Geom);

    impl CustomOp2 for Conv {
        fn name(&self) -> &'static str {
            "nofuss-conv2d-cpu"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let g = self.0;
            let (rows, cols) = (g.rows(), g.cols());
            if !l2.is_contiguous() {
                candle_core::bail!("conv2d weight must be contiguous");
            }
            let w_layout = Layout::new(
                Shape::from((g.c_out, rows)),
                vec![rows, 1],
                l2.start_offset(),
            );
            let col_layout = Layout::contiguous((rows, cols));
            macro_rules! run {
                ($T:ty, $wrap:path) => {{
                    let x = slice::<$T>(s1, l1)?;
                    let col = $wrap(im2col(&g, x));
                    let y = s2.matmul(&col, (1, g.c_out, cols, rows), &w_layout, &col_layout)?;
                    let y = y.as_slice::<$T>()?;
                    Ok(($wrap(to_nchw(&g, y)), g.y_shape()))
                }};
            }
            match s1 {
                CpuStorage::F32(_) => run!(f32, CpuStorage::F32),
                CpuStorage::F64(_) => run!(f64, CpuStorage::F64),
                s => candle_core::bail!("CPU conv2d supports f32 and f64, not {:?}", s.dtype()),
            }
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let g = self.0;
            // [C_out, N OH OW], the product's layout.
            let dy = dy
                .transpose(0, 1)?
                .contiguous()?
                .reshape((g.c_out, g.cols()))?;
            // Only what the graph needs: the first layer's input (the images) takes no
            // gradient, frozen weights neither (PyTorch's `needs_input_grad`).
            let dw = if w.track_op() {
                let cols = x.apply_op1_no_bwd(&Im2Col(g))?;
                Some(dy.matmul(&cols.t()?)?.reshape(w.shape())?)
            } else {
                None
            };
            let dx = if x.track_op() {
                let dcols = w.reshape((g.c_out, g.rows()))?.t()?.matmul(&dy)?;
                Some(dcols.apply_op1_no_bwd(&Col2Im(g))?)
            } else {
                None
            };
            Ok((dx, dw))
        }
    }

    /// `x -> [C_in K K, N OH OW]`.
    struct Im2Col(Geom);

    impl CustomOp1 for Im2Col {
        fn name(&self) -> &'static str {
            "nofuss-im2col"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            let g = self.0;
            let shape = Shape::from((g.rows(), g.cols()));
            Ok(match s {
                CpuStorage::F32(_) => (CpuStorage::F32(im2col(&g, slice(s, l)?)), shape),
                CpuStorage::F64(_) => (CpuStorage::F64(im2col(&g, slice(s, l)?)), shape),
                s => candle_core::bail!("im2col supports f32 and f64, not {:?}", s.dtype()),
            })
        }
    }

    /// `[C_in K K, N OH OW] -> dx`, summing overlapping windows.
    struct Col2Im(Geom);

    impl CustomOp1 for Col2Im {
        fn name(&self) -> &'static str {
            "nofuss-col2im"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            let g = self.0;
            Ok(match s {
                CpuStorage::F32(_) => (CpuStorage::F32(col2im(&g, slice(s, l)?)), g.x_shape()),
                CpuStorage::F64(_) => (CpuStorage::F64(col2im(&g, slice(s, l)?)), g.x_shape()),
                s => candle_core::bail!("col2im supports f32 and f64, not {:?}", s.dtype()),
            })
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
    let key = crate::cuda::ConvKey {
        x: [i(n), i(c_in), i(h), i(wd)],
        w: [i(c_out), i(c_per_group), i(k_h), i(k_w)],
        y: [i(n), i(c_out), i(out(h, k_h)?), i(out(wd, k_w)?)],
        padding: i(cfg.padding),
        stride: i(cfg.stride),
        dilation: i(cfg.dilation),
        groups: i(cfg.groups),
        dtype: x.dtype(),
        tf32: tf32(),
    };
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        cudnn_ops::Cudnn(cudnn_ops::Pass::Forward, key),
    )
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
    use candle_core::{Device, Var};

    fn ramp(shape: (usize, usize, usize, usize), k: usize) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f64> = (0..n).map(|i| ((i * k) % 17) as f64 / 8.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
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
            let cfg = Conv2dConfig {
                padding,
                stride,
                dilation,
                groups: 1,
                cudnn_fwd_algo: None,
            };
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
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
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
