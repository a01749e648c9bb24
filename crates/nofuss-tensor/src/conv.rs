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

use candle_core::{Module, Result, Tensor};
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
    } else {
        x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?
    };
    match bias {
        None => Ok(y),
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
    }
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
    let out = |len: usize, k: usize| -> Result<usize> {
        let span = len + 2 * cfg.padding;
        let reach = cfg.dilation * (k - 1) + 1;
        if cfg.stride == 0 || span < reach {
            candle_core::bail!("conv2d: kernel {k} does not fit input {len} ({cfg:?})");
        }
        Ok((span - reach) / cfg.stride + 1)
    };
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
    x.contiguous()?
        .apply_op2(&w.contiguous()?, cudnn_ops::Forward(key))
}

#[cfg(feature = "cuda")]
mod cudnn_ops {
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

    use crate::cuda::{cudnn_conv, ConvKey, ConvPass};

    fn shape(s: [i32; 4]) -> Shape {
        Shape::from(s.map(|d| d as usize).to_vec())
    }

    fn no_cpu(op: &str) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{op} runs on CUDA only (CPU tensors use candle's convolution)")
    }

    /// `(x, w) -> y`.
    pub(super) struct Forward(pub ConvKey);
    /// `(dy, w) -> dx`.
    struct BackwardData(ConvKey);
    /// `(x, dy) -> dw`.
    struct BackwardFilter(ConvKey);

    impl CustomOp2 for Forward {
        fn name(&self) -> &'static str {
            "nofuss-cudnn-conv2d"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let y = cudnn_conv(
                ConvPass::Forward {
                    x: (x, xl),
                    w: (w, wl),
                },
                self.0,
            )?;
            Ok((y, shape(self.0.y)))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let dy = dy.contiguous()?;
            let dx = dy.apply_op2_no_bwd(w, &BackwardData(self.0))?;
            let dw = x.apply_op2_no_bwd(&dy, &BackwardFilter(self.0))?;
            Ok((Some(dx), Some(dw)))
        }
    }

    impl CustomOp2 for BackwardData {
        fn name(&self) -> &'static str {
            "nofuss-cudnn-conv2d-backward-data"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }

        fn cuda_fwd(
            &self,
            dy: &CudaStorage,
            dyl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dx = cudnn_conv(
                ConvPass::BackwardData {
                    dy: (dy, dyl),
                    w: (w, wl),
                },
                self.0,
            )?;
            Ok((dx, shape(self.0.x)))
        }
    }

    impl CustomOp2 for BackwardFilter {
        fn name(&self) -> &'static str {
            "nofuss-cudnn-conv2d-backward-filter"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            dy: &CudaStorage,
            dyl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dw = cudnn_conv(
                ConvPass::BackwardFilter {
                    x: (x, xl),
                    dy: (dy, dyl),
                },
                self.0,
            )?;
            Ok((dw, shape(self.0.w)))
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
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Conv2d::forward(self, x)
    }
}
