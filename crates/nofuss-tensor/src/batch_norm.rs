//! Batch normalisation of `[N,C,H,W]` (or `[N,C]`) with an optional fused ReLU, forward
//! and backward in one pass each.
//!
//! candle's `BatchNorm` runs training mode as a dozen generic operations (transpose, copy,
//! two means, broadcasts), each allocating a whole activation, and as many again backward.
//! Here a training step is a handful of kernels: per-channel statistics (mean, variance
//! and 1/σ; two-pass in f64 on the CPU, Welford partials merged in a fixed order on CUDA),
//! one fused normalise-scale-shift(-ReLU) pass, two in-place updates of the running
//! statistics, and for the gradient one reduction plus one pass
//! (`dx = γ σ⁻¹ (g - mean(g) - x̂ mean(g x̂))`, with `g` the output gradient masked where
//! the output is not positive). The backward pass reads the input and the output, which
//! the next layer keeps anyway. CPU kernels run over channels or planes with rayon; CUDA
//! kernels are in `kernels/batch_norm.cu`; the reductions' results do not depend on
//! thread timing.
//!
//! Semantics are PyTorch's `nn.BatchNorm2d`: biased variance to normalise, unbiased to
//! update the running variance, `running = (1 - momentum) running + momentum batch`.
//! Inputs may be f32, f64 or bf16; scale, shift and statistics stay in f32 (f64 for f64
//! inputs), as under PyTorch's autocast.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use nofuss_tensor::batch_norm::BatchNorm2d;
//!
//! let params = VarMap::new();
//! let vb = VarBuilder::from_varmap(&params, DType::F32, &Device::Cpu);
//! let bn = BatchNorm2d::new(3, 1e-5, 0.1, vb.pp("bn"))?;
//! let x = Tensor::randn(0f32, 1.0, (4, 3, 5, 5), &Device::Cpu)?;
//! let y = bn.forward_t(&x, true, true)?; // training mode, ReLU fused
//! assert!(y.flatten_all()?.min(0)?.to_scalar::<f32>()? >= 0.0);
//! // The running statistics moved 10 % of the way to the batch's.
//! assert!(bn.running_var().to_vec1::<f32>()?[0] != 1.0);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor,
    Var, WithDType,
};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use crate::cpu::{from_f64s, host_f64s, slice, to_f64s, with_cpu_dtype};

/// A batch-normalisation layer over channels (dimension 1) with PyTorch's parameter
/// names (`weight`, `bias`, `running_mean`, `running_var`) and initial values.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    /// Creates (or loads, through `vb`) the layer's four tensors.
    pub fn new(channels: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<Self> {
        if eps.is_nan() || eps < 0.0 || !(0.0..=1.0).contains(&momentum) {
            candle_core::bail!(
                "batch norm needs eps >= 0 and momentum in [0, 1] ({eps}, {momentum})"
            );
        }
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.))?;
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.))?,
            // Shares storage with the variable store's entry when `vb` holds variables.
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps,
            momentum,
        })
    }

    /// Training mode (`train`): normalises with the batch's statistics and updates the
    /// running ones. Otherwise normalises with the running statistics (scale and shift
    /// still receive gradients: "frozen" batch norm). `relu` applies a ReLU in the same pass.
    pub fn forward_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        self.forward_shifted_t(x, None, train, relu)
    }

    /// [`Self::forward_t`] of `x + shift` without forming the sum, for a per-channel
    /// `shift` (`[C]`) such as the bias of the convolution before the layer (BN-Inception
    /// has one on every convolution): the sum would cost a pass over the activation
    /// forward and several backward (its gradient, the bias's reduction) for a term that
    /// batch statistics remove again.
    ///
    /// - Training mode: the output, and the gradients of `x`, scale and shift (β), are
    ///   those of `forward_t(x + shift)`; `shift` only moves the running mean (by the
    ///   batch mean of `x + shift`, as PyTorch's). It gets no gradient: its exact gradient
    ///   is zero (PyTorch returns rounding noise), so an optimiser leaves it as it is.
    /// - Fixed statistics: `shift` enters as `γ σ⁻¹ shift` added to β, and gets its
    ///   gradient (and γ its share) through that.
    pub fn forward_shifted_t(
        &self,
        x: &Tensor,
        shift: Option<&Tensor>,
        train: bool,
        relu: bool,
    ) -> Result<Tensor> {
        let c = check_shift(x, shift)?;
        if !train {
            let (stats, beta, _) = self.fixed_parts(x, &self.weight, &self.bias, shift)?;
            return apply(&x.contiguous()?, &self.weight, &beta, stats, relu, false);
        }
        let out = batch_norm_train(x, &self.weight, &self.bias, self.eps, relu)?;
        self.update_running(&out, shift, x.elem_count() / c)?;
        Ok(out.y)
    }

    /// [`Self::forward_shifted_t`] outside candle's graph: the output (which tracks
    /// nothing, whatever tracks the inputs) and what [`batch_norm_backward`] needs for the
    /// gradients; in training mode the running statistics are updated as in the tracked
    /// form. For a caller that keeps its own tape ([`crate::tape::Tape`]).
    pub fn forward_saved(
        &self,
        x: &Tensor,
        shift: Option<&Tensor>,
        train: bool,
        relu: bool,
    ) -> Result<(Tensor, BatchNormSaved)> {
        let c = check_shift(x, shift)?;
        let (gamma, beta) = (self.weight.detach(), self.bias.detach());
        if !train {
            let shift = shift.map(Tensor::detach);
            let (stats, beta, fixed_shift) = self.fixed_parts(x, &gamma, &beta, shift.as_ref())?;
            let y = apply(
                &x.detach().contiguous()?,
                &gamma,
                &beta,
                stats.clone(),
                relu,
                false,
            )?;
            let saved = BatchNormSaved {
                stats,
                relu,
                batch_stats: false,
                fixed_shift,
            };
            return Ok((y, saved));
        }
        let (out, stats) = train_parts(&x.detach(), &gamma, &beta, self.eps, relu)?;
        self.update_running(&out, shift, x.elem_count() / c)?;
        let saved = BatchNormSaved {
            stats,
            relu,
            batch_stats: true,
            fixed_shift: None,
        };
        Ok((out.y, saved))
    }

    /// The running statistics as the kernels read them, and β with a `shift` taken in
    /// (`β + γ σ⁻¹ shift`, differentiable in whatever of γ, β and the shift is tracked),
    /// with σ⁻¹ and the shift for the shift's gradient on a tape.
    #[allow(clippy::type_complexity)]
    fn fixed_parts(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        shift: Option<&Tensor>,
    ) -> Result<(ChannelStats, Tensor, Option<(Tensor, Tensor)>)> {
        let g = Geom::of(x)?;
        let pdt = param_dtype(x.dtype());
        let (mean, invstd) = fixed_stats(
            self.running_mean.as_tensor(),
            self.running_var.as_tensor(),
            self.eps,
            pdt,
        )?;
        let (beta, shifted) = match shift {
            None => (beta.clone(), None),
            Some(s) => {
                let s = s.to_dtype(pdt)?;
                let term = (gamma.to_dtype(pdt)? * &invstd)?.mul(&s)?;
                ((beta.to_dtype(pdt)? + term)?, Some((invstd.clone(), s)))
            }
        };
        Ok((ChannelStats::new(mean, invstd, g.c, pdt)?, beta, shifted))
    }

    /// Moves the running statistics towards a training batch's (`count` values per
    /// channel); `shift` (see [`Self::forward_shifted_t`]) moves the mean.
    fn update_running(
        &self,
        out: &BatchNormOutput,
        shift: Option<&Tensor>,
        count: usize,
    ) -> Result<()> {
        let count = count as f64;
        // A shift (the mean's) is added in the same pass as the update.
        let update = |running: &Var, batch: &Tensor, shift: Option<&Tensor>, factor: f64| {
            let dt = running.dtype();
            let op = UpdateRunning {
                momentum: self.momentum,
                factor,
            };
            let batch = batch.to_dtype(dt)?;
            match shift {
                None => running.inplace_op2(&batch, &op),
                Some(s) => {
                    running.inplace_op3(&batch, &s.detach().to_dtype(dt)?.contiguous()?, &op)
                }
            }
        };
        update(&self.running_mean, &out.mean, shift, 1.0)?;
        // PyTorch keeps the unbiased variance.
        update(&self.running_var, &out.var, None, count / (count - 1.0))
    }

    /// Scale (γ).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Shift (β).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Running mean.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// Running (unbiased) variance.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Momentum of the running statistics (PyTorch's convention).
    pub fn momentum(&self) -> f64 {
        self.momentum
    }
}

/// The channels of `x` (`[N, C, ...]`), checking that a `shift` is `[C]`.
fn check_shift(x: &Tensor, shift: Option<&Tensor>) -> Result<usize> {
    let c = x.dim(1)?;
    if let Some(s) = shift {
        if s.dims() != [c] {
            candle_core::bail!(
                "batch norm input shift must have shape [{c}], got {:?}",
                s.dims()
            );
        }
    }
    Ok(c)
}

/// Result of [`batch_norm_train`].
#[derive(Debug, Clone)]
pub struct BatchNormOutput {
    /// The normalised (and possibly rectified) output, in the input's dtype.
    pub y: Tensor,
    /// Per-channel batch mean (no gradient).
    pub mean: Tensor,
    /// Per-channel biased batch variance (no gradient).
    pub var: Tensor,
}

/// Batch normalisation with the batch's statistics (training mode), differentiable with
/// respect to `x`, `gamma` and `beta` (including the statistics' dependence on `x`).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<BatchNormOutput> {
    Ok(train_parts(x, gamma, beta, eps, relu)?.0)
}

/// [`batch_norm_train`] with the statistics it normalised with.
fn train_parts(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(BatchNormOutput, ChannelStats)> {
    let g = Geom::of(x)?;
    if g.count() < 2 {
        candle_core::bail!(
            "batch norm in training mode needs more than one value per channel, got {:?}",
            x.dims()
        );
    }
    let x = x.contiguous()?;
    // Rows: mean, biased variance, 1/sqrt(variance + eps).
    let stats = x.apply_op1_no_bwd(&Stats { eps })?;
    let (mean, var, invstd) = (stats.get(0)?, stats.get(1)?, stats.get(2)?);
    let stats = ChannelStats::new(mean.clone(), invstd, g.c, param_dtype(x.dtype()))?;
    let y = apply(&x, gamma, beta, stats.clone(), relu, true)?;
    Ok((BatchNormOutput { y, mean, var }, stats))
}

/// What the backward pass of a batch norm needs besides its input, output and output
/// gradient: the statistics it normalised with, whether they were the batch's own, and
/// whether a ReLU followed. Made by [`BatchNorm2d::forward_saved`].
#[derive(Debug, Clone)]
pub struct BatchNormSaved {
    stats: ChannelStats,
    relu: bool,
    batch_stats: bool,
    /// With fixed statistics and a shift: 1/σ and the shift, for the shift's gradient.
    fixed_shift: Option<(Tensor, Tensor)>,
}

/// Gradients of a batch norm's input (when asked for), scale and shift; scale and shift
/// in f32 (f64 for f64 inputs).
#[derive(Debug, Clone)]
pub struct BatchNormGrads {
    /// `d loss / d x`, in the input's dtype.
    pub x: Option<Tensor>,
    /// `d loss / d γ`.
    pub gamma: Tensor,
    /// `d loss / d β`.
    pub beta: Tensor,
    /// `d loss / d shift` of a batch norm with fixed statistics that was given a shift
    /// ([`BatchNorm2d::forward_saved`]); `None` otherwise (with batch statistics the
    /// shift's gradient is exactly zero).
    pub shift: Option<Tensor>,
}

/// The gradients of a batch norm from its input `x`, output `y`, the output's gradient
/// `dy`, its scale `gamma` and what its forward pass saved: one reduction and, when
/// `need_x`, one pass for the input gradient.
pub fn batch_norm_backward(
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    saved: &BatchNormSaved,
    need_x: bool,
) -> Result<BatchNormGrads> {
    let dy = dy.contiguous()?;
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let sums = x.apply_op3_no_bwd(
        &dy,
        &y,
        &GradSums {
            stats: saved.stats.clone(),
            relu: saved.relu,
        },
    )?;
    let dx = need_x
        .then(|| {
            x.apply_op3_no_bwd(
                &dy,
                &y,
                &GradInput {
                    stats: saved.stats.clone(),
                    gamma: gamma.detach().to_dtype(param_dtype(x.dtype()))?,
                    sums: sums.clone(),
                    relu: saved.relu,
                    batch_stats: saved.batch_stats,
                },
            )
        })
        .transpose()?;
    let (sum_g, mut dgamma) = (sums.get(0)?, sums.get(1)?);
    // The shift entered as γ σ⁻¹ s added to β: it takes γ σ⁻¹ Σg, and γ takes σ⁻¹ s Σg.
    let mut dshift = None;
    if let Some((invstd, s)) = &saved.fixed_shift {
        let k = (invstd * &sum_g)?;
        dgamma = (dgamma + (&k * s)?)?;
        dshift = Some((gamma.detach().to_dtype(k.dtype())? * k)?);
    }
    Ok(BatchNormGrads {
        x: dx,
        gamma: dgamma,
        beta: sum_g,
        shift: dshift,
    })
}

/// Batch normalisation with given statistics (evaluation, or frozen batch norm in
/// training), differentiable with respect to `x`, `gamma` and `beta`.
pub fn batch_norm_fixed(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let g = Geom::of(x)?;
    let pdt = param_dtype(x.dtype());
    let (mean, invstd) = fixed_stats(mean, var, eps, pdt)?;
    let stats = ChannelStats::new(mean, invstd, g.c, pdt)?;
    apply(&x.contiguous()?, gamma, beta, stats, relu, false)
}

/// Given statistics as constants in the parameter dtype `pdt`: the mean and
/// `1/sqrt(var + eps)`.
fn fixed_stats(mean: &Tensor, var: &Tensor, eps: f64, pdt: DType) -> Result<(Tensor, Tensor)> {
    let invstd = (var.detach().to_dtype(pdt)? + eps)?.sqrt()?.recip()?;
    Ok((mean.detach().to_dtype(pdt)?.contiguous()?, invstd))
}

fn param_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// A per-channel vector as the kernels read it: `[c]`, contiguous, in `pdt`.
fn channel_param(t: &Tensor, c: usize, pdt: DType, what: &str) -> Result<Tensor> {
    if t.dims() != [c] {
        candle_core::bail!(
            "batch norm {what} must have shape [{c}], got {:?}",
            t.dims()
        );
    }
    t.to_dtype(pdt)?.contiguous()
}

fn apply(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: ChannelStats,
    relu: bool,
    batch_stats: bool,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let pdt = param_dtype(x.dtype());
    let gamma = channel_param(gamma, c, pdt, "scale")?;
    let beta = channel_param(beta, c, pdt, "shift")?;
    x.apply_op3(
        &gamma,
        &beta,
        Apply {
            stats,
            relu,
            batch_stats,
        },
    )
}

/// Sizes: `n` samples, `c` channels, planes of `hw` elements.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    hw: usize,
}

impl Geom {
    fn of(x: &Tensor) -> Result<Self> {
        Self::from_dims(x.dims())
    }

    fn from_dims(d: &[usize]) -> Result<Self> {
        if d.len() < 2 {
            candle_core::bail!("batch norm expects [N,C,...], got {d:?}");
        }
        Ok(Self {
            n: d[0],
            c: d[1],
            hw: d[2..].iter().product(),
        })
    }

    /// Values per channel.
    fn count(&self) -> usize {
        self.n * self.hw
    }

    /// Channel `ch`'s planes of a contiguous `[N,C,...]` buffer.
    fn planes<'a, T>(&self, x: &'a [T], ch: usize) -> impl Iterator<Item = &'a [T]> + 'a {
        let (c, hw) = (self.c, self.hw);
        (0..self.n).map(move |n| &x[(n * c + ch) * hw..(n * c + ch + 1) * hw])
    }

    #[cfg(feature = "cuda")]
    fn device(&self) -> crate::cuda::BnGeom {
        crate::cuda::BnGeom::new(self.n, self.c, self.hw)
    }
}

/// Per-channel values a kernel reads besides its inputs (`[C]`, contiguous, f32 or f64).
#[derive(Debug, Clone)]
struct ChannelStats {
    mean: Tensor,
    invstd: Tensor,
}

impl ChannelStats {
    fn new(mean: Tensor, invstd: Tensor, c: usize, pdt: DType) -> Result<Self> {
        Ok(Self {
            mean: channel_param(&mean, c, pdt, "mean")?,
            invstd: channel_param(&invstd, c, pdt, "inverse std")?,
        })
    }

    fn host(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        Ok((host_f64s(&self.mean)?, host_f64s(&self.invstd)?))
    }
}

/// `x -> [3, C]`: per-channel mean, biased variance and 1/sqrt(variance + eps), in f32
/// (f64 for f64 input).
struct Stats {
    eps: f64,
}

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "nofuss-batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let g = Geom::from_dims(l.dims())?;
        let stats: Vec<(f64, f64)> = with_cpu_dtype!(s.dtype(), T, {
            let x = slice::<T>(s, l)?;
            (0..g.c)
                .into_par_iter()
                .map(|ch| {
                    let m = g.count() as f64;
                    let mean = g
                        .planes(x, ch)
                        .map(|p| lane_sums(p, |v| [v.to_f64()])[0])
                        .sum::<f64>()
                        / m;
                    let var = g
                        .planes(x, ch)
                        .map(|p| lane_sums(p, |v| [(v.to_f64() - mean).powi(2)])[0])
                        .sum::<f64>()
                        / m;
                    (mean, var)
                })
                .collect()
        });
        let flat = stats
            .iter()
            .map(|s| s.0)
            .chain(stats.iter().map(|s| s.1))
            .chain(stats.iter().map(|s| 1.0 / (s.1 + self.eps).sqrt()));
        let out = from_f64s(param_dtype(s.dtype()), flat.collect());
        Ok((out, Shape::from((3, g.c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = Geom::from_dims(l.dims())?;
        let out = crate::cuda::bn_stats(s, l, g.device(), self.eps)?;
        Ok((out, Shape::from((3, g.c))))
    }
}

/// `(x, γ, β) -> y = relu?((x - mean) / σ γ + β)`.
struct Apply {
    stats: ChannelStats,
    relu: bool,
    /// Whether mean and 1/σ are the batch's own (their dependence on `x` enters the
    /// gradient) or constants.
    batch_stats: bool,
}

impl CustomOp3 for Apply {
    fn name(&self) -> &'static str {
        "nofuss-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let g = Geom::from_dims(l1.dims())?;
        let (gamma, beta) = (to_f64s(s2, l2)?, to_f64s(s3, l3)?);
        let (mean, invstd) = self.stats.host()?;
        let c = g.c;
        with_cpu_dtype!(s1.dtype(), T, {
            let x = slice::<T>(s1, l1)?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(g.hw.max(1))
                .zip(x.par_chunks(g.hw.max(1)))
                .enumerate()
                .for_each(|(i, (y, x))| {
                    let ch = i % c;
                    let a = invstd[ch] * gamma[ch];
                    let b = beta[ch] - mean[ch] * a;
                    for (o, v) in y.iter_mut().zip(x) {
                        let z = v.to_f64() * a + b;
                        // A NaN stays NaN, as in PyTorch.
                        *o = T::from_f64(if self.relu && z <= 0.0 { 0.0 } else { z });
                    }
                });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = Geom::from_dims(l1.dims())?;
        let y = crate::cuda::bn_apply(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            (&self.stats.mean, &self.stats.invstd),
            g.device(),
            self.relu,
        )?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A shift (fixed statistics) is already in β here: candle's graph differentiates it.
        let saved = BatchNormSaved {
            stats: self.stats.clone(),
            relu: self.relu,
            batch_stats: self.batch_stats,
            fixed_shift: None,
        };
        // Gradients only for inputs the graph tracks (frozen scale or shift take none).
        let g = batch_norm_backward(x, y, grad, gamma, &saved, x.track_op())?;
        let dgamma = gamma.track_op().then_some(g.gamma);
        let dbeta = beta.track_op().then_some(g.beta);
        Ok((g.x, dgamma, dbeta))
    }
}

/// Independent f64 accumulators per sum in [`lane_sums`] and [`grad_plane_sums`]: no addition
/// waits for the one before and the compiler vectorises the loop (a single running sum
/// is one dependent addition per element). Lanes are added up in a fixed order, so the
/// result is the same every run.
const LANES: usize = 8;

/// The `K` sums of `f` over `xs`, each in [`LANES`] interleaved partial sums.
#[inline(always)]
fn lane_sums<T: Copy, const K: usize>(xs: &[T], f: impl Fn(T) -> [f64; K]) -> [f64; K] {
    let mut acc = [[0f64; LANES]; K];
    let (chunks, rest) = xs.as_chunks::<LANES>();
    for c in chunks {
        for (j, &v) in c.iter().enumerate() {
            for (a, t) in acc.iter_mut().zip(f(v)) {
                a[j] += t;
            }
        }
    }
    finish_lanes(acc, rest.iter().map(|&v| f(v)))
}

/// Σg and Σg·x̂ over one plane (g: the output gradient `dy`, zero where the rectified
/// output `y` is not positive when `relu`), each in [`LANES`] interleaved sums. The terms
/// are made a block at a time in a plain element-wise loop (vectorised like
/// [`GradInput`]'s), then added into the lanes: with the ReLU mask inside the lane loop
/// itself the compiler loaded `dy` only where it is kept, one unpredictable branch per
/// element (half a ReLU's outputs are zero), five times slower than this.
fn grad_plane_sums<T: WithDType>(
    x: &[T],
    dy: &[T],
    y: &[T],
    mu: f64,
    is: f64,
    relu: bool,
) -> [f64; 2] {
    const BLOCK: usize = 32 * LANES;
    let term = |i: usize| {
        let d = masked(dy[i].to_f64(), y[i].to_f64(), relu);
        [d, d * (x[i].to_f64() - mu) * is]
    };
    let n = x.len().min(dy.len()).min(y.len());
    let full = n - n % LANES;
    let (mut acc, mut g, mut gx) = ([[0f64; LANES]; 2], [0f64; BLOCK], [0f64; BLOCK]);
    for start in (0..full).step_by(BLOCK) {
        let len = BLOCK.min(full - start);
        let (xb, db, yb) = (
            &x[start..start + len],
            &dy[start..start + len],
            &y[start..start + len],
        );
        let (g, gx) = (&mut g[..len], &mut gx[..len]);
        for i in 0..len {
            let d = masked(db[i].to_f64(), yb[i].to_f64(), relu);
            g[i] = d;
            gx[i] = d * (xb[i].to_f64() - mu) * is;
        }
        for (cg, cgx) in g
            .as_chunks::<LANES>()
            .0
            .iter()
            .zip(gx.as_chunks::<LANES>().0)
        {
            for j in 0..LANES {
                acc[0][j] += cg[j];
                acc[1][j] += cgx[j];
            }
        }
    }
    finish_lanes(acc, (full..n).map(term))
}

/// The lanes' totals (added in lane order), then the elements past the last full chunk.
#[inline(always)]
fn finish_lanes<const K: usize>(
    acc: [[f64; LANES]; K],
    rest: impl Iterator<Item = [f64; K]>,
) -> [f64; K] {
    let mut out = acc.map(|lanes| lanes.iter().sum::<f64>());
    for t in rest {
        for (o, v) in out.iter_mut().zip(t) {
            *o += v;
        }
    }
    out
}

/// The output gradient where the (rectified) output is positive, else zero: PyTorch's
/// ReLU gradient, also at NaN.
#[inline]
fn masked(d: f64, y: f64, relu: bool) -> f64 {
    if !relu || y > 0.0 {
        d
    } else {
        0.0
    }
}

/// `(x, dy, y) -> [2, C]`: per channel Σg (β's gradient) and Σg·x̂ (γ's).
struct GradSums {
    stats: ChannelStats,
    relu: bool,
}

impl CustomOp3 for GradSums {
    fn name(&self) -> &'static str {
        "nofuss-batch-norm-grad-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let g = Geom::from_dims(l1.dims())?;
        let (mean, invstd) = self.stats.host()?;
        let c = g.c;
        let sums: Vec<(f64, f64)> = with_cpu_dtype!(s1.dtype(), T, {
            let x = slice::<T>(s1, l1)?;
            let dy = slice::<T>(s2, l2)?;
            let y = slice::<T>(s3, l3)?;
            (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (mut sum, mut sum_xhat) = (0f64, 0f64);
                    let (mu, is, relu) = (mean[ch], invstd[ch], self.relu);
                    let planes = g.planes(x, ch).zip(g.planes(dy, ch)).zip(g.planes(y, ch));
                    for ((xp, dp), yp) in planes {
                        let [a, b] = grad_plane_sums(xp, dp, yp, mu, is, relu);
                        sum += a;
                        sum_xhat += b;
                    }
                    (sum, sum_xhat)
                })
                .collect()
        });
        let flat = sums.iter().map(|s| s.0).chain(sums.iter().map(|s| s.1));
        let out = from_f64s(self.stats.mean.dtype(), flat.collect());
        Ok((out, Shape::from((2, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = Geom::from_dims(l1.dims())?;
        let out = crate::cuda::bn_grad_sums(
            [(s1, l1), (s2, l2), (s3, l3)],
            (&self.stats.mean, &self.stats.invstd),
            g.device(),
            self.relu,
        )?;
        Ok((out, Shape::from((2, g.c))))
    }
}

/// `(x, dy, y) -> dx`.
struct GradInput {
    stats: ChannelStats,
    gamma: Tensor,
    /// `[2, C]`: Σg, Σg·x̂.
    sums: Tensor,
    relu: bool,
    batch_stats: bool,
}

impl CustomOp3 for GradInput {
    fn name(&self) -> &'static str {
        "nofuss-batch-norm-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let g = Geom::from_dims(l1.dims())?;
        let (mean, invstd) = self.stats.host()?;
        let gamma = host_f64s(&self.gamma)?;
        let sums = host_f64s(&self.sums)?;
        let c = g.c;
        let inv_m = 1.0 / g.count() as f64;
        with_cpu_dtype!(s1.dtype(), T, {
            let x = slice::<T>(s1, l1)?;
            let dy = slice::<T>(s2, l2)?;
            let y = slice::<T>(s3, l3)?;
            let mut dx = vec![T::from_f64(0.0); x.len()];
            let hw = g.hw.max(1);
            dx.par_chunks_mut(hw)
                .zip(
                    x.par_chunks(hw)
                        .zip(dy.par_chunks(hw))
                        .zip(y.par_chunks(hw)),
                )
                .enumerate()
                .for_each(|(i, (dx, ((x, dy), y)))| {
                    let ch = i % c;
                    let (mu, is) = (mean[ch], invstd[ch]);
                    let (sg, sgx) = if self.batch_stats {
                        (sums[ch] * inv_m, sums[c + ch] * inv_m)
                    } else {
                        (0.0, 0.0)
                    };
                    let (gm, relu) = (gamma[ch], self.relu);
                    let n = dx.len().min(x.len()).min(dy.len()).min(y.len());
                    let (x, dy, y) = (&x[..n], &dy[..n], &y[..n]);
                    for (i, o) in dx[..n].iter_mut().enumerate() {
                        let d = masked(dy[i].to_f64(), y[i].to_f64(), relu);
                        let xhat = (x[i].to_f64() - mu) * is;
                        *o = T::from_f64((d - sg - xhat * sgx) * gm * is);
                    }
                });
            Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = Geom::from_dims(l1.dims())?;
        let dx = crate::cuda::bn_grad_input(
            [(s1, l1), (s2, l2), (s3, l3)],
            [
                &self.gamma,
                &self.stats.mean,
                &self.stats.invstd,
                &self.sums,
            ],
            g.device(),
            self.relu,
            self.batch_stats,
        )?;
        Ok((dx, l1.shape().clone()))
    }
}

/// In place: `running = (1 - momentum) running + momentum factor batch`, or with a third
/// input `shift`, `... factor (batch + shift)`.
struct UpdateRunning {
    momentum: f64,
    factor: f64,
}

impl UpdateRunning {
    fn cpu(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        (s2, l2): (&CpuStorage, &Layout),
        shift: Option<(&CpuStorage, &Layout)>,
    ) -> Result<()> {
        let _timer = crate::profile::HostTimer::start("nofuss-batch-norm-running-update");
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("running statistics must be contiguous");
        };
        let mut batch = to_f64s(s2, l2)?;
        if let Some((s3, l3)) = shift {
            for (v, s) in batch.iter_mut().zip(to_f64s(s3, l3)?) {
                *v += s;
            }
        }
        let (m, f) = (self.momentum, self.factor);
        match s1 {
            CpuStorage::F32(v) => v[a..b]
                .iter_mut()
                .zip(&batch)
                .for_each(|(r, &x)| *r = ((1.0 - m) * *r as f64 + m * f * x) as f32),
            CpuStorage::F64(v) => v[a..b]
                .iter_mut()
                .zip(&batch)
                .for_each(|(r, &x)| *r = (1.0 - m) * *r + m * f * x),
            s => candle_core::bail!("running statistics must be f32 or f64, not {:?}", s.dtype()),
        }
        Ok(())
    }
}

impl InplaceOp2 for UpdateRunning {
    fn name(&self) -> &'static str {
        "nofuss-batch-norm-running-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        self.cpu(s1, l1, (s2, l2), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (m, f) = (self.momentum, self.factor);
        crate::cuda::bn_update_running((s1, l1), (s2, l2), None, m, f)
    }
}

impl InplaceOp3 for UpdateRunning {
    fn name(&self) -> &'static str {
        "nofuss-batch-norm-running-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        self.cpu(s1, l1, (s2, l2), Some((s3, l3)))
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (m, f) = (self.momentum, self.factor);
        crate::cuda::bn_update_running((s1, l1), (s2, l2), Some((s3, l3)), m, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::{ModuleT, VarMap};

    /// Inputs with a channel offset (so the mean matters) and some negatives (so the ReLU
    /// mask matters).
    fn input(shape: (usize, usize, usize, usize), dt: DType) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f64> = (0..n)
            .map(|i| {
                ((i * 7919) % 101) as f64 / 50.0 - 0.7 + (i / (shape.2 * shape.3) % shape.1) as f64
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    fn vec(t: &Tensor) -> Vec<f64> {
        crate::cpu::values(t)
    }

    fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Forward, running statistics and gradients against candle's composite batch norm.
    fn against_candle(train: bool, relu: bool, dt: DType, tol: f64) {
        let shape = (3, 4, 5, 6);
        let (mine, theirs) = (VarMap::new(), VarMap::new());
        let bn = BatchNorm2d::new(
            4,
            1e-5,
            0.1,
            VarBuilder::from_varmap(&mine, dt, &Device::Cpu),
        )
        .unwrap();
        let cfg = candle_nn::BatchNormConfig {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        };
        let reference =
            candle_nn::batch_norm(4, cfg, VarBuilder::from_varmap(&theirs, dt, &Device::Cpu))
                .unwrap();
        // Non-trivial scale, shift and running statistics on both sides.
        for vars in [&mine, &theirs] {
            for (name, v) in vars.data().lock().unwrap().iter() {
                let vals: Vec<f64> = (0..4)
                    .map(|i| match name.as_str() {
                        "weight" => 0.5 + i as f64 * 0.3,
                        "bias" => 0.2 - i as f64 * 0.15,
                        "running_mean" => i as f64 * 0.9,
                        _ => 0.5 + i as f64,
                    })
                    .collect();
                v.set(
                    &Tensor::new(vals, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap(),
                )
                .unwrap();
            }
        }
        let x = Var::from_tensor(&input(shape, dt)).unwrap();
        let g = input(shape, dt).sin().unwrap();
        let y = bn.forward_t(x.as_tensor(), train, relu).unwrap();
        let ry = reference.forward_t(x.as_tensor(), train).unwrap();
        let ry = if relu { ry.relu().unwrap() } else { ry };
        close(&vec(&y), &vec(&ry), tol, "y");
        close(
            &vec(bn.running_mean()),
            &vec(reference.running_mean()),
            tol,
            "running mean",
        );
        close(
            &vec(bn.running_var()),
            &vec(reference.running_var()),
            tol,
            "running var",
        );
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let rgrads = (&ry * &g).unwrap().sum_all().unwrap().backward().unwrap();
        close(
            &vec(grads.get(x.as_tensor()).unwrap()),
            &vec(rgrads.get(x.as_tensor()).unwrap()),
            tol,
            "dx",
        );
        let (rw, rb) = reference.weight_and_bias().unwrap();
        close(
            &vec(grads.get(bn.weight()).unwrap()),
            &vec(rgrads.get(rw).unwrap()),
            tol,
            "dgamma",
        );
        close(
            &vec(grads.get(bn.bias()).unwrap()),
            &vec(rgrads.get(rb).unwrap()),
            tol,
            "dbeta",
        );
    }

    #[test]
    fn plane_gradient_sums_add_each_lane_in_order_and_mask_exactly() {
        // Against the plain lane-by-lane sums (element i in lane i % LANES, lanes added in
        // order, the tail after them), bit for bit, across block boundaries and tails;
        // the ReLU mask zeroes infinite and NaN gradients too.
        for n in [0, 5, 8, 255, 256, 263, 600] {
            // Values whose sums round, so that a change of order shows.
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731).sin() * 3.0).collect();
            let clean: Vec<f32> = (0..n).map(|i| (i as f32 * 1.37).cos() * 1e3).collect();
            let mut dirty = clean.clone();
            let y: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => 0.0,
                    1 => f32::NAN,
                    2 => -1.0,
                    _ => 0.5 + i as f32,
                })
                .collect();
            // Infinite and NaN gradients only where the ReLU masks them.
            for (i, d) in dirty.iter_mut().enumerate() {
                if i % 5 < 3 && i % 2 == 0 {
                    *d = if i % 4 == 0 { f32::INFINITY } else { f32::NAN };
                }
            }
            let (mu, is) = (0.25, 1.5);
            for relu in [true, false] {
                let dy = if relu { &dirty } else { &clean };
                let term = |i: usize| {
                    let keep = !relu || y[i] as f64 > 0.0;
                    let d = if keep { dy[i] as f64 } else { 0.0 };
                    [d, d * (x[i] as f64 - mu) * is]
                };
                let full = n - n % LANES;
                let mut lanes = [[0f64; LANES]; 2];
                for i in 0..full {
                    let t = term(i);
                    lanes[0][i % LANES] += t[0];
                    lanes[1][i % LANES] += t[1];
                }
                let mut want = lanes.map(|l| l.iter().sum::<f64>());
                for i in full..n {
                    let t = term(i);
                    want[0] += t[0];
                    want[1] += t[1];
                }
                let got = grad_plane_sums(&x, dy, &y, mu, is, relu);
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "n {n} relu {relu}: {got:?}"
                );
                assert_eq!(
                    got.map(f64::to_bits),
                    want.map(f64::to_bits),
                    "n {n} relu {relu}"
                );
            }
        }
    }

    #[test]
    fn training_mode_matches_candle_forward_and_backward() {
        for relu in [false, true] {
            against_candle(true, relu, DType::F64, 1e-9);
            against_candle(true, relu, DType::F32, 2e-4);
        }
    }

    #[test]
    fn fixed_statistics_match_candle_eval() {
        for relu in [false, true] {
            against_candle(false, relu, DType::F64, 1e-9);
        }
    }

    #[test]
    fn shifted_input_matches_adding_the_shift() {
        let shape = (3, 4, 5, 6);
        for train in [true, false] {
            let layer = |vars: &VarMap| {
                let bn = BatchNorm2d::new(
                    4,
                    1e-5,
                    0.1,
                    VarBuilder::from_varmap(vars, DType::F64, &Device::Cpu),
                )
                .unwrap();
                bn.running_mean
                    .set(&Tensor::new(&[0.5f64, -1.0, 2.0, 0.0], &Device::Cpu).unwrap())
                    .unwrap();
                bn.running_var
                    .set(&Tensor::new(&[0.5f64, 2.0, 1.5, 3.0], &Device::Cpu).unwrap())
                    .unwrap();
                bn
            };
            let (va, vb) = (VarMap::new(), VarMap::new());
            let (a, b) = (layer(&va), layer(&vb));
            let x = Var::from_tensor(&input(shape, DType::F64)).unwrap();
            let shift = Var::new(&[0.3f64, -2.0, 0.0, 1.25], &Device::Cpu).unwrap();
            let g = input(shape, DType::F64).sin().unwrap();
            let ya = a
                .forward_shifted_t(x.as_tensor(), Some(shift.as_tensor()), train, true)
                .unwrap();
            let summed = x
                .as_tensor()
                .broadcast_add(&shift.as_tensor().reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let yb = b.forward_t(&summed, train, true).unwrap();
            let what = |s: &str| format!("train {train}: {s}");
            close(&vec(&ya), &vec(&yb), 1e-9, &what("y"));
            close(
                &vec(a.running_mean()),
                &vec(b.running_mean()),
                1e-9,
                &what("mean"),
            );
            close(
                &vec(a.running_var()),
                &vec(b.running_var()),
                1e-9,
                &what("var"),
            );
            let ga = (&ya * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&yb * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for (ta, tb, name) in [
                (x.as_tensor(), x.as_tensor(), "dx"),
                (a.weight(), b.weight(), "dgamma"),
                (a.bias(), b.bias(), "dbeta"),
            ] {
                let (da, db) = (ga.get(ta).unwrap(), gb.get(tb).unwrap());
                close(&vec(da), &vec(db), 1e-9, &what(name));
            }
            let dshift = gb.get(shift.as_tensor()).unwrap();
            match ga.get(shift.as_tensor()) {
                Some(d) => {
                    assert!(!train);
                    close(&vec(d), &vec(dshift), 1e-9, &what("dshift"));
                    assert!(vec(d).iter().any(|v| v.abs() > 1e-3));
                }
                // Batch statistics cancel the shift: the summed path's gradient is
                // rounding noise.
                None => {
                    assert!(train);
                    assert!(vec(dshift).iter().all(|v| v.abs() < 1e-9), "{dshift}");
                }
            }
        }
        let bn =
            BatchNorm2d::new(4, 1e-5, 0.1, VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap();
        let three = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let x = input(shape, DType::F32);
        let err = bn
            .forward_shifted_t(&x, Some(&three), true, false)
            .unwrap_err();
        assert!(
            err.to_string().contains("shift must have shape [4]"),
            "{err}"
        );
    }

    #[test]
    fn frozen_scale_and_shift_take_no_gradient() {
        let x = Var::from_tensor(&input((2, 3, 4, 4), DType::F64)).unwrap();
        let gamma = Tensor::new(&[1f64, 2.0, 0.5], &Device::Cpu).unwrap();
        let beta = Var::new(&[0f64, 0.1, -0.1], &Device::Cpu).unwrap();
        let g = input((2, 3, 4, 4), DType::F64).cos().unwrap();
        let grads = |gamma: &Tensor, beta: &Tensor| {
            let y = batch_norm_train(x.as_tensor(), gamma, beta, 1e-5, true)
                .unwrap()
                .y;
            (y * &g).unwrap().sum_all().unwrap().backward().unwrap()
        };
        let frozen = grads(&gamma, beta.as_tensor());
        assert!(frozen.get(&gamma).is_none());
        let tracked_gamma = Var::from_tensor(&gamma).unwrap();
        let all = grads(tracked_gamma.as_tensor(), beta.as_tensor());
        assert!(all.get(tracked_gamma.as_tensor()).is_some());
        for t in [x.as_tensor(), beta.as_tensor()] {
            assert_eq!(vec(frozen.get(t).unwrap()), vec(all.get(t).unwrap()));
        }
    }

    #[test]
    fn bf16_input_keeps_f32_statistics() {
        let x = input((2, 3, 4, 4), DType::F32);
        let gamma = Tensor::new(&[1f32, 2.0, 0.5], &Device::Cpu).unwrap();
        let beta = Tensor::new(&[0f32, 0.1, -0.1], &Device::Cpu).unwrap();
        let full = batch_norm_train(&x, &gamma, &beta, 1e-5, true).unwrap();
        let half =
            batch_norm_train(&x.to_dtype(DType::BF16).unwrap(), &gamma, &beta, 1e-5, true).unwrap();
        assert_eq!(half.y.dtype(), DType::BF16);
        assert_eq!(half.mean.dtype(), DType::F32);
        close(&vec(&half.y), &vec(&full.y), 3e-2, "bf16 y");
        close(&vec(&half.mean), &vec(&full.mean), 1e-2, "bf16 mean");
    }

    #[test]
    fn two_dimensional_input_and_bad_shapes() {
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 6.0]], &Device::Cpu).unwrap();
        let ones = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
        let zeros = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let out = batch_norm_train(&x, &ones, &zeros, 0.0, false).unwrap();
        assert_eq!(vec(&out.y), vec![-1.0, -1.0, 1.0, 1.0]);
        assert_eq!(vec(&out.var), vec![1.0, 4.0]);
        let one = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let err = batch_norm_train(&one, &ones, &zeros, 1e-5, false).unwrap_err();
        assert!(err.to_string().contains("more than one value"), "{err}");
        let three = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let err = batch_norm_train(&x, &three, &zeros, 1e-5, false).unwrap_err();
        assert!(
            err.to_string().contains("scale must have shape [2]"),
            "{err}"
        );
        let err = batch_norm_train(&ones, &ones, &zeros, 1e-5, false).unwrap_err();
        assert!(err.to_string().contains("[N,C"), "{err}");
    }
}
