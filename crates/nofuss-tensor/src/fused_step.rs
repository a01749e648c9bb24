//! One optimiser step in place, with the formulas of `torch.optim`: per element the
//! state (`[3, numel]`: rows a, b, c) from the gradient and the parameter, then the
//! parameter from the gradient and the state. candle operations would take a dozen
//! launches and allocations per parameter (BN-Inception has about 280 parameter
//! tensors). On the CPU a parameter's step is one pass ([`UpdateBoth`]); on CUDA one
//! launch of `kernels/optim.cu`'s `optim_step` takes up to `TABLE_TENSORS` parameters of
//! a group ([`OptimTable`], `crate::cuda::optim_step`), as PyTorch's fused and foreach
//! optimisers do. `UpdateState` then `UpdateParam`, the same arithmetic in two passes, is
//! the tests' reference.

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
#[cfg(test)]
use candle_core::InplaceOp3;
use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

use crate::cpu::slice;
#[cfg(feature = "cuda")]
use crate::tables::TABLE_TENSORS;

/// Which update, with its constants (every field used by the kernels, `#[repr(C)]` for
/// CUDA).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct StepArgs {
    /// 0 SGD, 1 RMSprop, 2 Adam / AdamW.
    pub kind: i32,
    /// First step of SGD with momentum: the buffer starts as the gradient.
    pub first: i32,
    pub nesterov: i32,
    pub centered: i32,
    pub tf_style: i32,
    pub _pad: i32,
    /// Gradient scale (clipping).
    pub scale: f64,
    /// L2 weight decay added to the gradient.
    pub wd_l2: f64,
    /// Decoupled weight decay (AdamW): the parameter shrinks by `lr * wd` first.
    pub wd_decoupled: f64,
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub alpha: f64,
    pub eps: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Bias corrections `1 - beta^t`.
    pub bc1: f64,
    pub bc2: f64,
    /// CUDA only: the device address of three f64, `lr`, `bc1` and `bc2`, which the
    /// kernels read instead of the fields above (a step captured in a CUDA graph takes
    /// each replay's values from there); 0: the fields.
    pub live: u64,
    /// CUDA only: the device address of the gradients' summed squares (one f64); the
    /// kernels then scale the gradient by `min(1, max_norm / (norm + 1e-6))` instead of
    /// `scale` (clipping without reading the norm on the host). 0: `scale`.
    pub sumsq_at: u64,
    /// The clipping bound with `sumsq_at`.
    pub max_norm: f64,
}

impl StepArgs {
    /// The effective gradient at one element.
    #[inline]
    fn g(&self, grad: f64, p: f64) -> f64 {
        self.scale * grad + self.wd_l2 * p
    }

    /// RMSprop's `g / denominator` from the (updated) state.
    #[inline]
    fn rms_ratio(&self, g: f64, b: f64, c: f64) -> f64 {
        let var = if self.centered != 0 { b - c * c } else { b };
        if self.tf_style != 0 {
            g / (var + self.eps).sqrt()
        } else {
            g / (var.sqrt() + self.eps)
        }
    }

    /// New state `(a, b, c)` of one element.
    #[inline]
    fn state(&self, grad: f64, p: f64, (a, b, c): (f64, f64, f64)) -> (f64, f64, f64) {
        let g = self.g(grad, p);
        match self.kind {
            0 => {
                let a = if self.momentum == 0.0 {
                    a
                } else if self.first != 0 {
                    g
                } else {
                    self.momentum * a + (1.0 - self.dampening) * g
                };
                (a, b, c)
            }
            1 => {
                let b = self.alpha * b + (1.0 - self.alpha) * g * g;
                let c = if self.centered != 0 {
                    self.alpha * c + (1.0 - self.alpha) * g
                } else {
                    c
                };
                let ratio = self.rms_ratio(g, b, c);
                let a = if self.tf_style != 0 {
                    self.momentum * a + self.lr * ratio
                } else if self.momentum > 0.0 {
                    self.momentum * a + ratio
                } else {
                    a
                };
                (a, b, c)
            }
            _ => (
                self.beta1 * a + (1.0 - self.beta1) * g,
                self.beta2 * b + (1.0 - self.beta2) * g * g,
                c,
            ),
        }
    }

    /// New value of one parameter element from the updated state.
    #[inline]
    fn param(&self, grad: f64, p: f64, (a, b, c): (f64, f64, f64)) -> f64 {
        let g = self.g(grad, p);
        match self.kind {
            0 => {
                let d = if self.momentum == 0.0 {
                    g
                } else if self.nesterov != 0 {
                    g + self.momentum * a
                } else {
                    a
                };
                p - self.lr * d
            }
            1 => {
                if self.tf_style != 0 {
                    p - a
                } else if self.momentum > 0.0 {
                    p - self.lr * a
                } else {
                    p - self.lr * self.rms_ratio(g, b, c)
                }
            }
            _ => {
                let p = p * (1.0 - self.lr * self.wd_decoupled);
                let denom = (b / self.bc2).sqrt() + self.eps;
                p - (self.lr / self.bc1) * (a / denom)
            }
        }
    }
}

/// The parameters of one launch of `optim_step`, laid out as `OptimTable` in
/// `kernels/optim.cu`: each parameter's, gradient's and state's device address, its
/// length and its first block (`crate::tables`); the entries used and the grid.
#[cfg(feature = "cuda")]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct OptimTable {
    pub param: [u64; TABLE_TENSORS],
    pub grad: [u64; TABLE_TENSORS],
    pub state: [u64; TABLE_TENSORS],
    pub len: [i64; TABLE_TENSORS],
    pub first_block: [u32; TABLE_TENSORS],
    pub count: u32,
    pub blocks: u32,
}

// SAFETY: plain old data with the C layout the kernel declares.
#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for OptimTable {}

/// `state[3, n] <- f(grad, param, state)`, in place (CPU; the tests' two-pass reference).
#[cfg(test)]
pub(crate) struct UpdateState(pub StepArgs);
/// `param[n] <- f(grad, state, param)`, in place (CPU; the tests' two-pass reference).
#[cfg(test)]
pub(crate) struct UpdateParam(pub StepArgs);

fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("optimiser {what} must be contiguous")))
}

#[cfg(test)]
macro_rules! cpu_step {
    ($dst:expr, $range:expr, |$d:ident, $T:ident| $body:block) => {
        match $dst {
            CpuStorage::F32(v) => {
                type $T = f32;
                let $d = &mut v[$range];
                $body
            }
            CpuStorage::F64(v) => {
                type $T = f64;
                let $d = &mut v[$range];
                $body
            }
            s => candle_core::bail!("optimiser state must be f32 or f64, not {:?}", s.dtype()),
        }
    };
}

// The loops serve f32 and f64 storage alike: for f64 the casts are no-ops.
#[cfg(test)]
#[allow(clippy::unnecessary_cast)]
impl InplaceOp3 for UpdateState {
    fn name(&self) -> &'static str {
        "nofuss-optim-state"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<()> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let (a0, a1) = offsets(l, "state")?;
        let args = self.0;
        cpu_step!(s, a0..a1, |st, T| {
            let grad = slice::<T>(gs, gl)?;
            let p = slice::<T>(ps, pl)?;
            let n = p.len();
            let (ra, rest) = st.split_at_mut(n);
            let (rb, rc) = rest.split_at_mut(n);
            ra.par_iter_mut()
                .zip(rb.par_iter_mut())
                .zip(rc.par_iter_mut())
                .zip(grad.par_iter().zip(p.par_iter()))
                .for_each(|(((a, b), c), (&g, &p))| {
                    let (na, nb, nc) =
                        args.state(g as f64, p as f64, (*a as f64, *b as f64, *c as f64));
                    (*a, *b, *c) = (na as T, nb as T, nc as T);
                });
        });
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unnecessary_cast)]
impl InplaceOp3 for UpdateParam {
    fn name(&self) -> &'static str {
        "nofuss-optim-param"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let (p0, p1) = offsets(l, "parameter")?;
        let args = self.0;
        cpu_step!(p, p0..p1, |param, T| {
            let grad = slice::<T>(gs, gl)?;
            let st = slice::<T>(ss, sl)?;
            let n = param.len();
            let (ra, rest) = st.split_at(n);
            let (rb, rc) = rest.split_at(n);
            param
                .par_iter_mut()
                .zip(grad.par_iter())
                .zip(ra.par_iter().zip(rb.par_iter()).zip(rc.par_iter()))
                .for_each(|((p, &g), ((&a, &b), &c))| {
                    *p = args.param(g as f64, *p as f64, (a as f64, b as f64, c as f64)) as T;
                });
        });
        Ok(())
    }
}

/// The CPU's step in one pass: `param[n]` and `state[3, n]` together, in place (the
/// parameter is this op's target, the state is updated through a nested in-place op on
/// its own tensor). The same arithmetic as [`UpdateState`] then [`UpdateParam`], to the
/// bit (the parameter's update reads the state as stored, rounded to its type), with
/// each element's gradient, parameter and state read once instead of twice, as
/// `optim_step` on CUDA.
pub(crate) struct UpdateBoth {
    /// The parameter's `[3, numel]` state (contiguous, the parameter's type).
    pub state: candle_core::Tensor,
    pub args: StepArgs,
}

/// The parameter and gradient slices [`UpdateBoth`] hands to its nested state update.
enum ParamSlices<'a> {
    F32(&'a mut [f32], &'a [f32]),
    F64(&'a mut [f64], &'a [f64]),
}

/// [`UpdateBoth`]'s nested op on the state: the parameter arrives through a `RefCell`
/// because an in-place op sees only `&self`.
struct StateAndParam<'a> {
    param: std::cell::RefCell<ParamSlices<'a>>,
    args: StepArgs,
}

impl candle_core::InplaceOp2 for UpdateBoth {
    fn name(&self) -> &'static str {
        "nofuss-optim-step"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, l: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<()> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let (p0, p1) = offsets(l, "parameter")?;
        let slices = match p {
            CpuStorage::F32(v) => ParamSlices::F32(&mut v[p0..p1], slice::<f32>(gs, gl)?),
            CpuStorage::F64(v) => ParamSlices::F64(&mut v[p0..p1], slice::<f64>(gs, gl)?),
            s => candle_core::bail!(
                "optimiser parameters must be f32 or f64, not {:?}",
                s.dtype()
            ),
        };
        self.state.inplace_op1(&StateAndParam {
            param: std::cell::RefCell::new(slices),
            args: self.args,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _p: &mut CudaStorage,
        _l: &Layout,
        _gs: &CudaStorage,
        _gl: &Layout,
    ) -> Result<()> {
        candle_core::bail!("the one-pass optimiser step is the CPU's; CUDA runs optim_step")
    }
}

// The loop serves f32 and f64 storage alike: for f64 the casts are no-ops.
#[allow(clippy::unnecessary_cast)]
impl candle_core::InplaceOp1 for StateAndParam<'_> {
    fn name(&self) -> &'static str {
        "nofuss-optim-step-state"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (s0, s1) = offsets(l, "state")?;
        let args = self.args;
        let mut param = self.param.borrow_mut();
        macro_rules! run {
            ($st:expr, $param:expr, $grad:expr, $T:ty) => {{
                let st = &mut $st[s0..s1];
                let n = $param.len();
                if st.len() != 3 * n || $grad.len() != n {
                    candle_core::bail!(
                        "optimiser state of {} values for a parameter of {n}",
                        st.len()
                    );
                }
                let (ra, rest) = st.split_at_mut(n);
                let (rb, rc) = rest.split_at_mut(n);
                const CH: usize = 8192;
                ra.par_chunks_mut(CH)
                    .zip(rb.par_chunks_mut(CH))
                    .zip(rc.par_chunks_mut(CH))
                    .zip($param.par_chunks_mut(CH).zip($grad.par_chunks(CH)))
                    .for_each(|(((ca, cb), cc), (cp, cg))| {
                        for i in 0..cp.len() {
                            // The new state, stored in its type, then the parameter from
                            // the state as stored (as the two-pass form reads it back).
                            let (g, old) = (cg[i] as f64, cp[i] as f64);
                            let (na, nb, nc) =
                                args.state(g, old, (ca[i] as f64, cb[i] as f64, cc[i] as f64));
                            (ca[i], cb[i], cc[i]) = (na as $T, nb as $T, nc as $T);
                            cp[i] = args.param(g, old, (ca[i] as f64, cb[i] as f64, cc[i] as f64))
                                as $T;
                        }
                    });
            }};
        }
        match (s, &mut *param) {
            (CpuStorage::F32(st), ParamSlices::F32(p, g)) => run!(st, p, g, f32),
            (CpuStorage::F64(st), ParamSlices::F64(p, g)) => run!(st, p, g, f64),
            (s, _) => candle_core::bail!(
                "optimiser state of type {:?} does not match its parameter",
                s.dtype()
            ),
        }
        Ok(())
    }
}
