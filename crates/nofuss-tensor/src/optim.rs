//! Optimisers with parameter groups, learning-rate schedules and gradient clipping,
//! following PyTorch's update rules (`torch.optim.SGD`, `RMSprop`, `Adam`, `AdamW`) so
//! recipes carry over unchanged; RMSprop also has TensorFlow's variant, the one the
//! paper's Google recipe used.
//!
//! ```
//! use candle_core::{Device, Var};
//! use nofuss_tensor::optim::{Optimizer, OptimizerKind, ParamGroup};
//! let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
//! let mut opt = Optimizer::new(
//!     OptimizerKind::sgd(0.9, true),
//!     0.1,
//!     vec![ParamGroup::new("weights", vec![w.clone()])],
//! )?;
//! let loss = w.as_tensor().sqr()?.sum_all()?;
//! opt.step(&loss.backward()?)?;
//! assert!(w.as_tensor().to_vec1::<f32>()?[0] < 1.0);
//! # Ok::<(), nofuss_tensor::Error>(())
//! ```

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::fused_step::{StepArgs, UpdateBoth};
use crate::{Error, Result};

/// The update rule and its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OptimizerKind {
    /// `torch.optim.SGD`: momentum buffer starts at the first gradient; Nesterov's form
    /// steps along `g + momentum * buf`.
    Sgd {
        /// Momentum factor (0: plain SGD).
        momentum: f64,
        /// Dampening of the momentum buffer's new gradient.
        dampening: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// `torch.optim.RMSprop` (`tf_style: false`) or TensorFlow's `RMSPropOptimizer`
    /// (`tf_style: true`: mean square starts at 1, `eps` inside the square root, the
    /// learning rate inside the momentum buffer).
    RmsProp {
        /// Decay of the mean square (`alpha` in PyTorch, `decay` in TensorFlow).
        alpha: f64,
        /// Added to the denominator.
        eps: f64,
        /// Momentum factor.
        momentum: f64,
        /// Divide by the variance estimate instead of the mean square.
        centered: bool,
        /// TensorFlow's variant.
        tf_style: bool,
    },
    /// `torch.optim.Adam` (L2 weight decay added to the gradient).
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Added to the denominator.
        eps: f64,
    },
    /// `torch.optim.AdamW` (decoupled weight decay).
    AdamW {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Added to the denominator.
        eps: f64,
    },
}

impl OptimizerKind {
    /// SGD with `momentum`, no dampening.
    pub fn sgd(momentum: f64, nesterov: bool) -> Self {
        Self::Sgd {
            momentum,
            dampening: 0.0,
            nesterov,
        }
    }

    /// PyTorch's RMSprop defaults (alpha 0.99, eps 1e-8) with `momentum`.
    pub fn rmsprop(momentum: f64) -> Self {
        Self::RmsProp {
            alpha: 0.99,
            eps: 1e-8,
            momentum,
            centered: false,
            tf_style: false,
        }
    }

    /// Adam with PyTorch's defaults (0.9, 0.999, 1e-8).
    pub fn adam() -> Self {
        Self::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// AdamW with PyTorch's defaults (0.9, 0.999, 1e-8).
    pub fn adamw() -> Self {
        Self::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl OptimizerKind {
    /// Whether state row `row` (0 a, 1 b, 2 c) carries information for this optimiser.
    fn uses_row(&self, row: usize) -> bool {
        match *self {
            Self::Sgd { momentum, .. } => row == 0 && momentum != 0.0,
            Self::RmsProp {
                momentum,
                centered,
                tf_style,
                ..
            } => match row {
                0 => tf_style || momentum > 0.0,
                1 => true,
                _ => centered,
            },
            Self::Adam { .. } | Self::AdamW { .. } => row < 2,
        }
    }

    /// A parameter's state before its first step: zeros (TensorFlow's RMSprop starts its
    /// mean square at one).
    fn fresh_state(&self, p: &Tensor) -> Result<Tensor> {
        let n = p.elem_count();
        let zeros = Tensor::zeros((1, n), p.dtype(), p.device())?;
        let b = match self {
            Self::RmsProp { tf_style: true, .. } => Tensor::ones((1, n), p.dtype(), p.device())?,
            _ => zeros.clone(),
        };
        Ok(Tensor::cat(&[&zeros, &b, &zeros], 0)?.contiguous()?)
    }

    /// The kernels' arguments for one step `t` (1-based) at learning rate `lr`.
    fn args(&self, lr: f64, wd: f64, scale: f64, t: i32, first: bool) -> StepArgs {
        let mut a = StepArgs {
            lr,
            scale,
            first: first as i32,
            ..StepArgs::default()
        };
        match *self {
            Self::Sgd {
                momentum,
                dampening,
                nesterov,
            } => {
                a.kind = 0;
                a.wd_l2 = wd;
                a.momentum = momentum;
                a.dampening = dampening;
                a.nesterov = nesterov as i32;
            }
            Self::RmsProp {
                alpha,
                eps,
                momentum,
                centered,
                tf_style,
            } => {
                a.kind = 1;
                a.wd_l2 = wd;
                a.alpha = alpha;
                a.eps = eps;
                a.momentum = momentum;
                a.centered = centered as i32;
                a.tf_style = tf_style as i32;
            }
            Self::Adam { beta1, beta2, eps } | Self::AdamW { beta1, beta2, eps } => {
                a.kind = 2;
                if matches!(self, Self::AdamW { .. }) {
                    a.wd_decoupled = wd;
                } else {
                    a.wd_l2 = wd;
                }
                a.beta1 = beta1;
                a.beta2 = beta2;
                a.eps = eps;
                a.bc1 = 1.0 - beta1.powi(t);
                a.bc2 = 1.0 - beta2.powi(t);
            }
        }
        a
    }
}

/// Parameters that share a learning-rate factor and a weight decay.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// Name, for checkpoints and messages (`backbone`, `head`, `proxies`).
    pub name: String,
    /// The parameters.
    pub vars: Vec<Var>,
    /// This group's learning rate is the optimiser's times this factor.
    pub lr_scale: f64,
    /// Weight decay (L2 for SGD, RMSprop and Adam; decoupled for AdamW).
    pub weight_decay: f64,
}

impl ParamGroup {
    /// A group with factor 1 and no weight decay.
    pub fn new(name: impl Into<String>, vars: Vec<Var>) -> Self {
        Self {
            name: name.into(),
            vars,
            lr_scale: 1.0,
            weight_decay: 0.0,
        }
    }

    /// Sets the learning-rate factor.
    pub fn lr_scale(mut self, s: f64) -> Self {
        self.lr_scale = s;
        self
    }

    /// Sets the weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }
}

/// Per-parameter state: `[3, numel]`, rows a (momentum buffer, Adam's first moment), b
/// (mean square, Adam's second moment), c (mean gradient of centred RMSprop); checkpointed
/// as `<group>.<index>.{a,b,c}` with the parameter's shape.
#[derive(Debug, Clone, Default)]
struct Slots {
    packed: Option<Tensor>,
    /// Whether row a holds a momentum buffer yet (SGD starts it as the gradient).
    started: bool,
}

const ROWS: [&str; 3] = ["a", "b", "c"];
/// An optimiser over parameter groups.
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    lr: f64,
    groups: Vec<ParamGroup>,
    slots: Vec<Vec<Slots>>,
    steps: u64,
    clip_norm: Option<f64>,
    /// Per-step scalars read from the device ([`Optimizer::use_device_scalars`]).
    device_scalars: Option<DeviceScalars>,
}

/// How a step clips its gradients ([`Optimizer::with_clip_norm`]).
enum Clip {
    Off,
    /// By `scale`, from the global norm read on the host.
    Host {
        scale: f64,
        norm: f64,
    },
    /// By the update kernels, from the summed squares at `address` (kept alive in
    /// `_sumsq` until the step's kernels are queued).
    Device {
        _sumsq: Tensor,
        address: u64,
        max: f64,
    },
}

/// Each group's learning rate and the bias corrections of the next step, `[groups, 3]`
/// f64 on the parameters' device, which the update kernels read (a captured step takes
/// each replay's values from there), and whether [`Optimizer::advance`] has written the
/// step [`Optimizer::step`] takes next.
#[derive(Debug)]
struct DeviceScalars {
    values: Tensor,
    /// The device address of `values` (CUDA; 0 on the CPU, where `step` reads them).
    address: u64,
    advanced: bool,
}

/// Parameters waiting for their device step, all with the same arguments: `(parameter,
/// gradient, state)`, stepped together by [`DeviceBatch::flush`].
#[derive(Default)]
struct DeviceBatch {
    params: Vec<(Tensor, Tensor, Tensor)>,
    args: Option<StepArgs>,
}

impl DeviceBatch {
    /// Adds a parameter; a change of arguments or of dtype steps the ones before first.
    fn push(&mut self, p: Tensor, grad: Tensor, state: Tensor, args: StepArgs) -> Result<()> {
        let same_dtype = self
            .params
            .first()
            .is_none_or(|(q, _, _)| q.dtype() == p.dtype());
        if self.args != Some(args) || !same_dtype {
            self.flush()?;
        }
        self.args = Some(args);
        self.params.push((p, grad, state));
        Ok(())
    }

    /// Steps the parameters added so far.
    fn flush(&mut self) -> Result<()> {
        let params = std::mem::take(&mut self.params);
        // `args` is set exactly while parameters wait.
        let Some(args) = self.args.take() else {
            return Ok(());
        };
        #[cfg(feature = "cuda")]
        {
            let refs: Vec<_> = params.iter().map(|(p, g, s)| (p, g, s)).collect();
            crate::cuda::optim_step(&refs, &args)?;
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = args;
            Err(Error::Optim(format!(
                "the optimiser steps on the CPU or, built with the `cuda` feature, on CUDA; \
                 not on {:?}",
                params[0].0.device().location()
            )))
        }
    }
}

impl Optimizer {
    /// An optimiser with base learning rate `lr`.
    pub fn new(kind: OptimizerKind, lr: f64, groups: Vec<ParamGroup>) -> Result<Self> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::Optim(format!("learning rate {lr}")));
        }
        let slots = groups
            .iter()
            .map(|g| vec![Slots::default(); g.vars.len()])
            .collect();
        Ok(Self {
            kind,
            lr,
            groups,
            slots,
            steps: 0,
            clip_norm: None,
            device_scalars: None,
        })
    }

    /// Rescales all gradients together so their global L2 norm is at most `max_norm`
    /// before each step (`torch.nn.utils.clip_grad_norm_`). On a GPU the scale is
    /// computed by the update kernels from the norm on the device: nothing is read back,
    /// and a captured step ([`crate::graph`]) clips too.
    pub fn with_clip_norm(mut self, max_norm: f64) -> Self {
        self.clip_norm = Some(max_norm);
        self
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the base learning rate (a schedule's job).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Global L2 norm of the gradients of all parameters (missing gradients count 0).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        Ok(match self.sum_of_squares(grads)? {
            Some(s) => s.to_scalar::<f64>()?.sqrt(),
            None => 0.0,
        })
    }

    /// The gradients' summed squares as an f64 scalar on their device (`None` without
    /// any gradient), nothing read back (`crate::sumsq`: on a GPU a few launches for all
    /// of them).
    fn sum_of_squares(&self, grads: &GradStore) -> Result<Option<Tensor>> {
        let present: Vec<&Tensor> = self
            .groups
            .iter()
            .flat_map(|g| &g.vars)
            .filter_map(|v| grads.get(v.as_tensor()))
            .collect();
        crate::sumsq::sum_of_squares(&present)
    }

    /// How step `step` clips: not at all; by a scale from the norm read on the host (a
    /// non-finite norm refused); or, on a GPU, by the update kernels from the summed
    /// squares left on the device (nothing read back, so a step can be queued, or
    /// captured, without waiting for its gradients).
    fn clipping(&self, grads: &GradStore, step: u64) -> Result<Clip> {
        let Some(max) = self.clip_norm else {
            return Ok(Clip::Off);
        };
        let Some(sumsq) = self.sum_of_squares(grads)? else {
            return Ok(Clip::Host {
                scale: 1.0,
                norm: 0.0,
            });
        };
        let address = device_address(&sumsq)?; // 0 off CUDA
        if address != 0 {
            return Ok(Clip::Device {
                _sumsq: sumsq,
                address,
                max,
            });
        }
        let norm = sumsq.to_scalar::<f64>()?.sqrt();
        if !norm.is_finite() {
            return Err(Error::Optim(format!(
                "gradient norm is {norm} at step {step}"
            )));
        }
        Ok(Clip::Host {
            scale: (max / (norm + 1e-6)).min(1.0),
            norm,
        })
    }

    /// From now on the update kernels read each step's learning rates and bias
    /// corrections from device memory that [`Optimizer::advance`] writes, instead of
    /// taking them as launch arguments: a training step captured in a CUDA graph
    /// (`nofuss_tensor::graph`) then replays with each step's values. Each step becomes
    /// `advance`, then [`Optimizer::step`] (or a replay of a captured one), which no
    /// longer counts steps itself. Every parameter must have taken a step already (its
    /// state and SGD's momentum start are made then, and a capture would freeze them).
    /// Gradient clipping may be on: on a GPU it never reads the norm on the host.
    pub fn use_device_scalars(&mut self) -> Result<()> {
        let Some(dev) = self.groups.iter().flat_map(|g| g.vars.first()).next() else {
            return Err(Error::Optim(
                "device scalars of an optimiser without parameters".into(),
            ));
        };
        let dev = dev.device().clone();
        let values = Tensor::zeros((self.groups.len(), 3), candle_core::DType::F64, &dev)?;
        let address = device_address(&values)?;
        self.device_scalars = Some(DeviceScalars {
            values,
            address,
            advanced: false,
        });
        Ok(())
    }

    /// Whether the update kernels read their per-step scalars from the device
    /// ([`Optimizer::use_device_scalars`]).
    pub fn uses_device_scalars(&self) -> bool {
        self.device_scalars.is_some()
    }

    /// With [`Optimizer::use_device_scalars`]: counts the next step and writes its
    /// scalars (each group's learning rate at the current base rate, the bias
    /// corrections) to the device, for the [`Optimizer::step`] or replay that follows.
    /// It copies values that change every step from the host: call it outside a capture
    /// and outside [`crate::with_cached_layouts`] (whose cache would keep each copy).
    pub fn advance(&mut self) -> Result<()> {
        if self.device_scalars.is_none() {
            return Err(Error::Optim(
                "advance needs device scalars (use_device_scalars)".into(),
            ));
        }
        let t = (self.steps + 1) as i32;
        let host: Vec<f64> = self
            .groups
            .iter()
            .flat_map(|g| {
                let a = self.kind.args(self.lr * g.lr_scale, 0.0, 1.0, t, false);
                [a.lr, a.bc1, a.bc2]
            })
            .collect();
        let host = Tensor::from_vec(host, (self.groups.len(), 3), &candle_core::Device::Cpu)?;
        if let Some(ds) = self.device_scalars.as_mut() {
            ds.values
                .slice_set(&host.to_device(ds.values.device())?, 0, 0)?;
            ds.advanced = true;
        }
        self.steps += 1;
        Ok(())
    }

    /// One update of every parameter that has a gradient in `grads`. Returns the global
    /// gradient norm before clipping when clipping is on and reads it on the host (the
    /// CPU; else `None`). With device scalars ([`Optimizer::use_device_scalars`]) it
    /// takes the step [`Optimizer::advance`] counted and wrote.
    ///
    /// On a GPU, clipping takes its scale from the norm on the device, as
    /// `torch.nn.utils.clip_grad_norm_` does: a non-finite norm is not refused here
    /// (the parameters become non-finite, and so the next loss); on the CPU it is.
    pub fn step(&mut self, grads: &GradStore) -> Result<Option<f64>> {
        let live = match self.device_scalars.as_mut() {
            // The step `advance` counted: each group's row of scalars, read here on the
            // CPU, at its device address on CUDA.
            Some(ds) => {
                if !std::mem::take(&mut ds.advanced) {
                    return Err(Error::Optim(
                        "with device scalars, call advance() before each step".into(),
                    ));
                }
                Some(if ds.address == 0 {
                    Live::Rows(ds.values.to_vec2::<f64>()?)
                } else {
                    Live::At(ds.address)
                })
            }
            None => None,
        };
        let step = if live.is_some() {
            self.steps
        } else {
            self.steps + 1
        };
        let clip = self.clipping(grads, step)?;
        self.steps = step;
        let (scale, norm) = match clip {
            Clip::Host { scale, norm } => (scale, Some(norm)),
            Clip::Off | Clip::Device { .. } => (1.0, None),
        };
        let t = self.steps as i32;
        // Off the CPU: runs of parameters with the same arguments, each stepped by one
        // launch per `TABLE_TENSORS` of them (`crate::cuda::optim_step`).
        let mut batch = DeviceBatch::default();
        for (gi, (g, slots)) in self.groups.iter().zip(&mut self.slots).enumerate() {
            let lr = self.lr * g.lr_scale;
            for (vi, (v, s)) in g.vars.iter().zip(slots.iter_mut()).enumerate() {
                let Some(grad) = grads.get(v.as_tensor()) else {
                    continue;
                };
                if live.is_some() && !(s.started && s.packed.is_some()) {
                    return Err(Error::Optim(format!(
                        "parameter {vi} of group {} has taken no step yet: with device \
                         scalars every parameter needs one ordinary step first",
                        g.name
                    )));
                }
                // Detached and in place: the update and the state it leaves record no
                // computation graph.
                let grad = grad.detach().contiguous()?;
                let p = v.as_tensor();
                let packed = match &s.packed {
                    Some(t) => t.clone(),
                    None => {
                        let t = self.kind.fresh_state(p)?;
                        s.packed = Some(t.clone());
                        t
                    }
                };
                if p.elem_count() == 0 {
                    // Nothing to update (and candle refuses in-place writes to a state
                    // of no elements).
                    s.started = true;
                    continue;
                }
                let mut args = self.kind.args(lr, g.weight_decay, scale, t, !s.started);
                match &live {
                    None => {}
                    Some(Live::Rows(r)) => {
                        (args.lr, args.bc1, args.bc2) = (r[gi][0], r[gi][1], r[gi][2]);
                    }
                    Some(Live::At(a)) => args.live = a + (gi * 3 * size_of::<f64>()) as u64,
                }
                if let Clip::Device { address, max, .. } = clip {
                    (args.sumsq_at, args.max_norm) = (address, max);
                }
                if p.device().is_cpu() {
                    // One pass over gradient, parameter and state.
                    p.inplace_op2(
                        &grad,
                        &UpdateBoth {
                            state: packed,
                            args,
                        },
                    )?;
                } else {
                    batch.push(p.clone(), grad, packed, args)?;
                }
                s.started = true;
            }
        }
        batch.flush()?;
        Ok(norm)
    }

    /// The optimiser's state as named tensors (`<group>.<index>.{a,b,c}` and `steps`), for
    /// checkpoints; [`Optimizer::load_state`] restores it.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        let dev = self
            .groups
            .iter()
            .flat_map(|g| g.vars.first())
            .next()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        m.insert(
            "steps".to_string(),
            Tensor::new(&[self.steps as f64], &dev)?,
        );
        for (g, slots) in self.groups.iter().zip(&self.slots) {
            for (i, (s, v)) in slots.iter().zip(&g.vars).enumerate() {
                let Some(packed) = &s.packed else { continue };
                for (row, k) in ROWS.iter().enumerate() {
                    if self.kind.uses_row(row) {
                        let t = packed.get(row)?.reshape(v.dims())?;
                        m.insert(format!("{}.{i}.{k}", g.name), t);
                    }
                }
            }
        }
        Ok(m)
    }

    /// Restores [`Optimizer::state`]; a slot missing from `state` starts fresh, a slot
    /// of the wrong shape is an error.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(s) = state.get("steps") {
            self.steps = s
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?
                .first()
                .copied()
                .unwrap_or(0.0) as u64;
        }
        for (g, slots) in self.groups.iter().zip(&mut self.slots) {
            for (i, (s, v)) in slots.iter_mut().zip(&g.vars).enumerate() {
                let mut saved = Vec::with_capacity(ROWS.len());
                for k in ROWS {
                    let key = format!("{}.{i}.{k}", g.name);
                    let t = state.get(&key);
                    if let Some(t) = t.filter(|t| t.dims() != v.dims()) {
                        return Err(Error::Optim(format!(
                            "optimiser state {key} has shape {:?}, the parameter {:?}",
                            t.dims(),
                            v.dims()
                        )));
                    }
                    saved.push(t);
                }
                if saved.iter().all(Option::is_none) {
                    continue;
                }
                // Rows the checkpoint lacks start as a fresh state's.
                let fresh = self.kind.fresh_state(v.as_tensor())?;
                let mut rows = Vec::with_capacity(ROWS.len());
                for (row, t) in saved.into_iter().enumerate() {
                    rows.push(match t {
                        Some(t) => {
                            let t = t.to_dtype(v.dtype())?.to_device(v.device())?;
                            t.flatten_all()?.unsqueeze(0)?
                        }
                        None => fresh.narrow(0, row, 1)?,
                    });
                }
                s.packed = Some(Tensor::cat(&rows, 0)?.contiguous()?);
                s.started = true;
            }
        }
        Ok(())
    }
}

/// Where one step's device scalars come from: the rows read to the host (CPU), or the
/// device address of row 0 (CUDA; the kernels read row `g` themselves).
enum Live {
    Rows(Vec<Vec<f64>>),
    At(u64),
}

/// The device address of a contiguous f64 tensor's first element on CUDA; 0 on the CPU.
fn device_address(t: &Tensor) -> Result<u64> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        return Ok(crate::cuda::device_address_f64(t)?);
    }
    let _ = t;
    Ok(0)
}

/// How the base learning rate changes over training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// The same rate throughout.
    Constant,
    /// Times `gamma` after every epoch (`ExponentialLR`; the paper's 0.94).
    Exponential {
        /// Factor per epoch.
        gamma: f64,
    },
    /// Times `gamma` every `every` epochs (`StepLR`).
    Step {
        /// Epochs between decays.
        every: usize,
        /// Factor.
        gamma: f64,
    },
    /// Cosine from the base rate down to `min_factor` times it over `epochs` epochs
    /// (`CosineAnnealingLR` evaluated per epoch).
    Cosine {
        /// Length of the cosine, in epochs.
        epochs: usize,
        /// Final rate as a fraction of the base rate.
        min_factor: f64,
    },
}

impl Schedule {
    /// The factor of epoch `epoch` (0-based: the first epoch trains at factor 1).
    pub fn factor(&self, epoch: usize) -> f64 {
        match *self {
            Self::Constant => 1.0,
            Self::Exponential { gamma } => gamma.powi(epoch as i32),
            Self::Step { every, gamma } => gamma.powi((epoch / every.max(1)) as i32),
            Self::Cosine { epochs, min_factor } => {
                let t = (epoch as f64 / epochs.max(1) as f64).min(1.0);
                min_factor + (1.0 - min_factor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// Linear warm-up: the factor of global step `step` (0-based) over `steps` steps, from
/// `1 / steps` up to 1 (1 when `steps` is 0).
pub fn warmup_factor(step: u64, steps: u64) -> f64 {
    if steps == 0 || step >= steps {
        1.0
    } else {
        (step + 1) as f64 / steps as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused_step::{UpdateParam, UpdateState};
    use candle_core::{DType, Device};

    #[test]
    fn the_cpu_one_pass_step_equals_the_two_passes_to_the_bit() {
        let kinds = [
            OptimizerKind::sgd(0.0, false),
            OptimizerKind::sgd(0.9, true),
            OptimizerKind::Sgd {
                momentum: 0.8,
                dampening: 0.1,
                nesterov: false,
            },
            OptimizerKind::RmsProp {
                alpha: 0.9,
                eps: 1e-3,
                momentum: 0.0,
                centered: true,
                tf_style: false,
            },
            OptimizerKind::RmsProp {
                alpha: 0.9,
                eps: 1e-3,
                momentum: 0.5,
                centered: false,
                tf_style: true,
            },
            OptimizerKind::adam(),
            OptimizerKind::adamw(),
        ];
        let dev = Device::Cpu;
        let n = 1000;
        let wave = |k: f64| (0..n).map(|i| ((i as f64) * k).sin()).collect::<Vec<_>>();
        for kind in kinds {
            for dt in [DType::F32, DType::F64] {
                let t = |v: Vec<f64>, shape: &[usize]| {
                    Tensor::from_vec(v, shape, &dev)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap()
                };
                let (p1, p2) = (t(wave(0.37), &[n]), t(wave(0.37), &[n]));
                let st = wave(0.11).into_iter().chain(wave(0.23)).chain(wave(0.31));
                let st: Vec<f64> = st.map(|v| v.abs()).collect();
                let (s1, s2) = (t(st.clone(), &[3, n]), t(st, &[3, n]));
                for step in 1..=3 {
                    let g = t(wave(0.5 + step as f64), &[n]);
                    let args = kind.args(0.01, 0.05, 0.7, step, step == 1);
                    s1.inplace_op3(&g, &p1, &UpdateState(args)).unwrap();
                    p1.inplace_op3(&g, &s1, &UpdateParam(args)).unwrap();
                    let both = UpdateBoth {
                        state: s2.clone(),
                        args,
                    };
                    p2.inplace_op2(&g, &both).unwrap();
                }
                let bits = |x: &Tensor| {
                    let v = x.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    v.to_vec1::<f64>()
                        .unwrap()
                        .iter()
                        .map(|f| f.to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(bits(&p1), bits(&p2), "{kind:?} {dt:?} parameter");
                assert_eq!(bits(&s1), bits(&s2), "{kind:?} {dt:?} state");
                assert_ne!(bits(&p1), bits(&t(wave(0.37), &[n])), "{kind:?} moved");
            }
        }
    }

    #[test]
    fn schedules() {
        assert_eq!(Schedule::Constant.factor(9), 1.0);
        assert!((Schedule::Exponential { gamma: 0.94 }.factor(2) - 0.8836).abs() < 1e-12);
        let s = Schedule::Step {
            every: 3,
            gamma: 0.1,
        };
        assert_eq!((s.factor(2), s.factor(3)), (1.0, 0.1));
        let c = Schedule::Cosine {
            epochs: 10,
            min_factor: 0.0,
        };
        assert!((c.factor(0) - 1.0).abs() < 1e-12);
        assert!((c.factor(5) - 0.5).abs() < 1e-12);
        assert!(c.factor(10).abs() < 1e-12 && c.factor(20).abs() < 1e-12);
        assert_eq!(warmup_factor(0, 4), 0.25);
        assert_eq!(warmup_factor(3, 4), 1.0);
        assert_eq!(warmup_factor(9, 0), 1.0);
    }

    #[test]
    fn state_records_no_graph() {
        // A state tensor that tracked its history would keep every earlier step alive.
        let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        for kind in [
            OptimizerKind::sgd(0.9, true),
            OptimizerKind::rmsprop(0.9),
            OptimizerKind::adamw(),
        ] {
            let mut opt = Optimizer::new(
                kind,
                0.01,
                vec![ParamGroup::new("w", vec![w.clone()]).weight_decay(0.1)],
            )
            .unwrap();
            for _ in 0..3 {
                let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            for (name, t) in opt.state().unwrap() {
                assert!(!t.track_op(), "{kind:?}: {name} records a graph");
            }
        }
    }

    /// Two groups (different rates and decays) of one optimiser kind, on fresh copies of
    /// the same starting values.
    fn two_groups(kind: OptimizerKind) -> (Optimizer, Vec<Var>) {
        let dev = Device::Cpu;
        let vars = vec![
            Var::new(&[1.0f64, -2.0, 0.5], &dev).unwrap(),
            Var::new(&[[0.3f64, -0.7], [1.1, 0.2]], &dev).unwrap(),
        ];
        let opt = Optimizer::new(
            kind,
            0.05,
            vec![
                ParamGroup::new("a", vec![vars[0].clone()]).weight_decay(0.01),
                ParamGroup::new("b", vec![vars[1].clone()])
                    .lr_scale(3.0)
                    .weight_decay(0.1),
            ],
        )
        .unwrap();
        (opt, vars)
    }

    /// A loss whose gradients change from step to step.
    fn grads_of(vars: &[Var], step: usize) -> GradStore {
        let k = 1.0 + step as f64;
        let a = (vars[0].as_tensor().sqr().unwrap() * k)
            .unwrap()
            .sum_all()
            .unwrap();
        let b = vars[1].as_tensor().powf(3.0).unwrap().sum_all().unwrap();
        (a + b).unwrap().backward().unwrap()
    }

    #[test]
    fn device_scalars_take_the_same_steps() {
        // Steps with the learning rate and bias corrections written by `advance` (as a
        // replayed CUDA graph reads them) equal ordinary steps bit for bit, with the base
        // rate changed between steps, unclipped and clipped.
        let kinds = [
            OptimizerKind::adam(),
            OptimizerKind::adamw(),
            OptimizerKind::sgd(0.9, true),
            OptimizerKind::RmsProp {
                alpha: 0.9,
                eps: 1e-3,
                momentum: 0.5,
                centered: true,
                tf_style: true,
            },
        ];
        for (kind, clip) in kinds.iter().flat_map(|&k| [(k, None), (k, Some(0.5))]) {
            let (mut plain, pv) = two_groups(kind);
            let (mut live, lv) = two_groups(kind);
            if let Some(c) = clip {
                plain = plain.with_clip_norm(c);
                live = live.with_clip_norm(c);
            }
            for step in 0..5 {
                let lr = 0.05 * (1.0 + 0.5 * step as f64);
                plain.set_lr(lr);
                live.set_lr(lr);
                let norm = plain.step(&grads_of(&pv, step)).unwrap();
                if clip.is_some() {
                    // The clip binds: the norm is above the bound.
                    assert!(norm.unwrap() > 0.5, "{kind:?}: {norm:?}");
                }
                if step == 1 {
                    live.use_device_scalars().unwrap();
                }
                if step >= 1 {
                    live.advance().unwrap();
                }
                live.step(&grads_of(&lv, step)).unwrap();
                assert_eq!(plain.steps(), live.steps(), "{kind:?}");
            }
            for (p, l) in pv.iter().zip(&lv) {
                let bits = |v: &Var| {
                    let v = v
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap();
                    v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(bits(p), bits(l), "{kind:?}");
            }
        }
    }

    #[test]
    fn device_scalars_refuse_what_a_capture_would_freeze() {
        let (mut opt, vars) = two_groups(OptimizerKind::adam());
        assert!(opt.advance().is_err(), "advance without device scalars");
        opt.use_device_scalars().unwrap();
        let e = opt.step(&grads_of(&vars, 0)).unwrap_err().to_string();
        assert!(e.contains("advance"), "{e}");
        opt.advance().unwrap();
        // No parameter has a state yet: a capture would allocate it inside the graph.
        let e = opt.step(&grads_of(&vars, 0)).unwrap_err().to_string();
        assert!(e.contains("group a") && e.contains("ordinary step"), "{e}");
    }

    #[test]
    fn clipping_bounds_the_step_and_state_round_trips() {
        let dev = Device::Cpu;
        let w = Var::new(&[3.0f64, 4.0], &dev).unwrap();
        let mut opt = Optimizer::new(
            OptimizerKind::sgd(0.0, false),
            1.0,
            vec![ParamGroup::new("w", vec![w.clone()])],
        )
        .unwrap()
        .with_clip_norm(1.0);
        // loss = 0.5 |w|^2: gradient w, norm 5, clipped to 1.
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let norm = opt.step(&loss.backward().unwrap()).unwrap();
        assert!((norm.unwrap() - 5.0).abs() < 1e-9);
        let now = w.as_tensor().to_vec1::<f64>().unwrap();
        assert!((now[0] - (3.0 - 0.6)).abs() < 1e-5 && (now[1] - (4.0 - 0.8)).abs() < 1e-5);

        let mut a = Optimizer::new(
            OptimizerKind::adam(),
            0.1,
            vec![ParamGroup::new("w", vec![w.clone()])],
        )
        .unwrap();
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        a.step(&loss.backward().unwrap()).unwrap();
        let st = a.state().unwrap();
        assert!(st.contains_key("w.0.a") && st.contains_key("w.0.b"));
        let mut b = Optimizer::new(
            OptimizerKind::adam(),
            0.1,
            vec![ParamGroup::new("w", vec![w.clone()])],
        )
        .unwrap();
        b.load_state(&st).unwrap();
        assert_eq!(b.steps(), 1);
        let bad: HashMap<String, Tensor> = [(
            "w.0.a".to_string(),
            Tensor::zeros(3, DType::F64, &dev).unwrap(),
        )]
        .into();
        assert!(b.load_state(&bad).is_err());
    }
}
