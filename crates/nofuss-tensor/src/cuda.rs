//! Launch helpers of the crate's own CUDA kernels (`kernels/*.cu`, compiled to PTX by
//! `build.rs`) and the per-thread cuDNN handles.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys as cudnn_sys;
use candle_core::cuda_backend::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    CudnnError, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, DType, Device, Layout, Result, Storage, StorageRef, Tensor};

use crate::fast_div::fast_div_params;

/// PTX of `kernels/pool.cu`.
pub(crate) const POOL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/pool.ptx"));
/// PTX of `kernels/batch_norm.cu`.
pub(crate) const BN_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/batch_norm.ptx"));
/// PTX of `kernels/nca.cu`.
pub(crate) const NCA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nca.ptx"));
/// PTX of `kernels/optim.cu`.
pub(crate) const OPTIM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
/// PTX of `kernels/distance.cu`.
pub(crate) const DISTANCE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/distance.ptx"));
/// PTX of `kernels/normalize.cu`.
pub(crate) const NORMALIZE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/normalize.ptx"));
/// PTX of `kernels/select.cu`.
pub(crate) const SELECT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/select.ptx"));

/// Threads per block of the element-wise kernels (and the reductions' fixed block size).
pub(crate) const THREADS: u32 = 256;

/// Threads per block of the row-selection kernel (its shared arrays are sized for them).
pub(crate) const SELECT_THREADS: u32 = 256;

/// A grid-stride launch over `n` elements.
pub(crate) fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous part of a storage a layout describes.
pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("nofuss CUDA kernels need contiguous inputs"),
    }
}

/// A fresh `len`-element buffer on `dev` written by `fill` (a kernel launch that writes
/// every element), as a candle storage: the "allocate, launch, wrap" of every launcher.
fn filled<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    len: usize,
    fill: impl FnOnce(&mut CudaViewMut<T>) -> Result<()>,
) -> Result<CudaStorage> {
    let (out, ()) = fresh(dev, len, fill)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// [`filled`]'s buffer as a plain slice (scratch space, index outputs), with what `fill`
/// returns (a second output filled by the same launch).
fn fresh<T: DeviceRepr, R>(
    dev: &CudaDevice,
    len: usize,
    fill: impl FnOnce(&mut CudaViewMut<T>) -> Result<R>,
) -> Result<(CudaSlice<T>, R)> {
    // SAFETY: `fill` writes every element before anything reads the buffer.
    let mut out = unsafe { dev.alloc::<T>(len)? };
    let r = fill(&mut out.as_view_mut())?;
    Ok((out, r))
}

/// An element type the kernels are instantiated for, with its kernel-name suffix
/// (`max_pool_fwd_f32`, ...).
pub(crate) trait KernelDType: DeviceRepr {
    /// What `FOR_EACH_DTYPE` in `kernels/common.cuh` appends to the kernel names.
    const SUFFIX: &'static str;
}

impl KernelDType for f32 {
    const SUFFIX: &'static str = "f32";
}
impl KernelDType for f64 {
    const SUFFIX: &'static str = "f64";
}
impl KernelDType for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Device, module, kernel name and dtype suffix.
type KernelKey = (DeviceId, &'static str, &'static str, &'static str);

thread_local! {
    static KERNELS: RefCell<HashMap<KernelKey, CudaFunction>> = RefCell::new(HashMap::new());
}

/// The kernel `<base>_<suffix>` of a PTX module (name, source) on `dev`, looked up in the
/// driver once per thread and then kept (candle's lookup asks the driver at every call).
fn kernel_function(
    dev: &CudaDevice,
    (module, ptx): (&'static str, &'static str),
    base: &'static str,
    suffix: &'static str,
) -> Result<CudaFunction> {
    let key = (dev.id(), module, base, suffix);
    if let Some(f) = KERNELS.with(|m| m.borrow().get(&key).cloned()) {
        return Ok(f);
    }
    let f = dev
        .get_or_load_custom_func(&format!("{base}_{suffix}"), module, ptx)?
        .into_cuda_function();
    KERNELS.with(|m| m.borrow_mut().insert(key, f.clone()));
    Ok(f)
}

/// Declares typed launchers, one per kernel of a `.cu` file: the kernel named
/// `<name>_<suffix of the first type parameter>` in that file's PTX module, its
/// parameters in order, device pointers as `&CudaView` (`const X*`) or
/// `&mut CudaViewMut` (`X*`), scalars and structs by reference. So rustc checks every
/// call against the declaration, and `tests/kernel_signatures.rs` checks every
/// declaration against the `extern "C"` signature in the `.cu` file (and the shared
/// structs' fields), which cudarc's untyped argument lists cannot.
macro_rules! kernels {
    ($file:literal, $module:literal, $ptx:ident; $(
        $(#[$doc:meta])*
        fn $name:ident<$S:ident $(, $G:ident)*>($($arg:ident: $ty:ty),* $(,)?);
    )*) => {
        $(
            $(#[$doc])*
            #[allow(clippy::too_many_arguments)]
            pub(crate) fn $name<$S: KernelDType $(, $G: KernelDType)*>(
                dev: &CudaDevice,
                cfg: LaunchConfig,
                $($arg: $ty),*
            ) -> Result<()> {
                let f = kernel_function(dev, ($module, $ptx), stringify!($name), $S::SUFFIX)?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                $(b.arg($arg);)*
                let name = || format!(concat!(stringify!($name), "_{}"), $S::SUFFIX);
                crate::profile::timed(dev, name, || {
                    // SAFETY: the parameters are the kernel's, in its order and with its
                    // types (checked against the .cu file by tests/kernel_signatures.rs);
                    // the callers size the buffers for the launch.
                    unsafe { b.launch(cfg) }.w()?;
                    Ok(())
                })
            }
        )*
    };
}

/// The typed launchers of `kernels/*.cu`.
pub(crate) mod launch {
    use super::*;
    use crate::fused_step::{OptimTable, StepArgs};
    use crate::sumsq::SumsqTable;

    kernels! { "pool.cu", "nofuss_pool", POOL_PTX;
        fn max_pool_fwd<T>(x: &CudaView<T>, y: &mut CudaViewMut<T>, idx: &mut CudaViewMut<u32>, g: &PoolGeom);
        fn max_pool_bwd<T>(idx: &CudaView<u32>, dy: &CudaView<T>, dx: &mut CudaViewMut<T>, g: &PoolGeom);
        fn avg_pool_fwd<T>(x: &CudaView<T>, y: &mut CudaViewMut<T>, g: &PoolGeom, inc: &i32);
        fn avg_pool_bwd<T>(dy: &CudaView<T>, dx: &mut CudaViewMut<T>, g: &PoolGeom, inc: &i32);
    }

    kernels! { "batch_norm.cu", "nofuss_bn", BN_PTX;
        fn bn_stats<T, A>(
            x: &CudaView<T>,
            partial: &mut CudaViewMut<A>,
            out: &mut CudaViewMut<A>,
            done: &mut CudaViewMut<u32>,
            g: &BnGeom,
            eps: &f64,
        );
        fn bn_bwd_sums<T, A>(
            x: &CudaView<T>,
            dy: &CudaView<T>,
            y: &CudaView<T>,
            mean: &CudaView<A>,
            invstd: &CudaView<A>,
            partial: &mut CudaViewMut<A>,
            out: &mut CudaViewMut<A>,
            done: &mut CudaViewMut<u32>,
            g: &BnGeom,
            relu: &i32,
        );
        fn bn_stats_partial<T, A>(x: &CudaView<T>, partial: &mut CudaViewMut<A>, g: &BnGeom);
        fn bn_apply<T, A>(
            x: &CudaView<T>,
            gamma: &CudaView<A>,
            beta: &CudaView<A>,
            mean: &CudaView<A>,
            invstd: &CudaView<A>,
            y: &mut CudaViewMut<T>,
            g: &BnGeom,
            relu: &i32,
        );
        fn bn_bwd_partial<T, A>(
            x: &CudaView<T>,
            dy: &CudaView<T>,
            y: &CudaView<T>,
            mean: &CudaView<A>,
            invstd: &CudaView<A>,
            partial: &mut CudaViewMut<A>,
            g: &BnGeom,
            relu: &i32,
        );
        fn bn_bwd_data<T, A>(
            x: &CudaView<T>,
            dy: &CudaView<T>,
            y: &CudaView<T>,
            gamma: &CudaView<A>,
            mean: &CudaView<A>,
            invstd: &CudaView<A>,
            sums: &CudaView<A>,
            dx: &mut CudaViewMut<T>,
            g: &BnGeom,
            relu: &i32,
            batch_stats: &i32,
        );
        fn bn_stats_final<A>(p: &CudaView<A>, out: &mut CudaViewMut<A>, g: &BnGeom, eps: &f64);
        fn bn_bwd_final<A>(p: &CudaView<A>, out: &mut CudaViewMut<A>, g: &BnGeom);
        fn bn_update_running<A>(
            running: &mut CudaViewMut<A>,
            batch: &CudaView<A>,
            shift: &CudaView<A>,
            n: &i64,
            momentum: &f64,
            factor: &f64,
            has_shift: &i32,
        );
    }

    kernels! { "optim.cu", "nofuss_optim", OPTIM_PTX;
        fn optim_step<T>(t: &OptimTable, s: &StepArgs);
        fn sumsq_partial<T>(t: &SumsqTable, partial: &mut CudaViewMut<f64>);
        fn sumsq_total<A>(partial: &CudaView<A>, n: &i64, out: &mut CudaViewMut<A>);
    }

    kernels! { "nca.cu", "nofuss_nca", NCA_PTX;
        fn nca_fwd<T>(
            d: &CudaView<T>,
            labels: &CudaView<u32>,
            out: &mut CudaViewMut<T>,
            p: &i64,
            paper: &i32,
            smoothing: &f64,
        );
        fn nca_bwd<T>(
            d: &CudaView<T>,
            labels: &CudaView<u32>,
            res: &CudaView<T>,
            g: &CudaView<T>,
            dd: &mut CudaViewMut<T>,
            n: &i64,
            p: &i64,
            paper: &i32,
            smoothing: &f64,
        );
    }

    kernels! { "distance.cu", "nofuss_distance", DISTANCE_PTX;
        fn sqdist_fwd<T>(
            ab: &CudaView<T>,
            aa: &CudaView<T>,
            bb: &CudaView<T>,
            out: &mut CudaViewMut<T>,
            n: &i64,
            p: &i64,
        );
        fn sqdist_bwd<T>(g: &CudaView<T>, d: &CudaView<T>, dab: &mut CudaViewMut<T>, total: &i64);
    }

    kernels! { "normalize.cu", "nofuss_normalize", NORMALIZE_PTX;
        fn l2n_fwd<T>(x: &CudaView<T>, y: &mut CudaViewMut<T>, d: &i64, scale: &f64, eps: &f64);
        fn l2n_bwd<T>(
            x: &CudaView<T>,
            g: &CudaView<T>,
            dx: &mut CudaViewMut<T>,
            d: &i64,
            scale: &f64,
            eps: &f64,
        );
    }

    kernels! { "select.cu", "nofuss_select", SELECT_PTX;
        fn smallest_k<T>(
            x: &CudaView<T>,
            vals: &mut CudaViewMut<T>,
            idx: &mut CudaViewMut<u32>,
            cols: &i64,
            k: &i32,
            skip_offset: &i64,
            skip: &i32,
        );
    }
}

thread_local! {
    // cuDNN handles are neither Send nor Sync: one per thread and device.
    static CUDNN: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

/// This thread's cuDNN handle on `dev`, bound to the device's stream.
pub(crate) fn cudnn(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    CUDNN.with(|map| {
        if let Some(h) = map.borrow().get(&dev.id()) {
            return Ok(h.clone());
        }
        let h = Cudnn::new(dev.cuda_stream()).map_err(|e| {
            candle_core::Error::Msg(format!(
                "cuDNN could not start (is libcudnn.so.9 on the library path?): {e:?}"
            ))
        })?;
        map.borrow_mut().insert(dev.id(), h.clone());
        Ok(h)
    })
}

/// Dispatches on a dtype with `$T` bound to the element type (f32, f64, bf16) and `$A`
/// to its accumulator (f32 for f32 and bf16, f64 for f64).
macro_rules! with_cuda_dtype {
    ($dt:expr, $T:ident, $A:ident, $body:block) => {
        match $dt {
            candle_core::DType::F32 => {
                type $T = f32;
                #[allow(dead_code)]
                type $A = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                #[allow(dead_code)]
                type $A = f64;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                #[allow(dead_code)]
                type $A = f32;
                $body
            }
            dt => candle_core::bail!("nofuss CUDA kernels support f32, f64 and bf16, not {dt:?}"),
        }
    };
}

/// Geometry of a pooling, laid out as `PoolGeom` in `kernels/pool.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolGeom {
    pub planes: i64,
    pub h: i32,
    pub w: i32,
    pub oh: i32,
    pub ow: i32,
    pub k: i32,
    pub s: i32,
    pub p: i32,
    /// `div_by`'s multipliers and shifts for ow, oh (forward), w, h and the stride
    /// (backward).
    pub ow_mul: u32,
    pub ow_shift: u32,
    pub oh_mul: u32,
    pub oh_shift: u32,
    pub w_mul: u32,
    pub w_shift: u32,
    pub h_mul: u32,
    pub h_shift: u32,
    pub s_mul: u32,
    pub s_shift: u32,
}

// SAFETY: plain old data with the C layout the kernels declare.
unsafe impl DeviceRepr for PoolGeom {}

impl PoolGeom {
    /// `planes` planes of `[h, w, oh, ow]`, window `[k, s, p]` (size, stride, padding).
    pub(crate) fn new(planes: usize, [h, w, oh, ow]: [usize; 4], [k, s, p]: [usize; 3]) -> Self {
        let fwd = (planes * oh * ow) as u64;
        let bwd = (planes * h * w) as u64;
        let (ow_mul, ow_shift) = fast_div_params(ow as u64, fwd);
        let (oh_mul, oh_shift) = fast_div_params(oh as u64, fwd);
        let (w_mul, w_shift) = fast_div_params(w as u64, bwd);
        let (h_mul, h_shift) = fast_div_params(h as u64, bwd);
        // The backward pass divides a row or column plus the padding by the stride.
        let (s_mul, s_shift) = fast_div_params(s as u64, (h.max(w) + p + 1) as u64);
        Self {
            planes: planes as i64,
            h: h as i32,
            w: w as i32,
            oh: oh as i32,
            ow: ow as i32,
            k: k as i32,
            s: s as i32,
            p: p as i32,
            ow_mul,
            ow_shift,
            oh_mul,
            oh_shift,
            w_mul,
            w_shift,
            h_mul,
            h_shift,
            s_mul,
            s_shift,
        }
    }
}

/// Max pooling forward: the output and, when `keep_argmax`, each window's argmax.
pub(crate) fn max_pool_fwd(
    s: &CudaStorage,
    l: &Layout,
    g: PoolGeom,
    out_len: usize,
    keep_argmax: bool,
) -> Result<(CudaStorage, Option<CudaSlice<u32>>)> {
    let dev = s.device();
    with_cuda_dtype!(s.dtype(), T, A, {
        let x = view::<T>(s, l)?;
        let cfg = grid_1d(out_len);
        let (y, (idx, ())) = fresh::<T, _>(dev, out_len, |y| {
            fresh::<u32, _>(dev, out_len, |idx| {
                launch::max_pool_fwd::<T>(dev, cfg, &x, y, idx, &g)
            })
        })?;
        let y = CudaStorage::wrap_cuda_slice(y, dev.clone());
        Ok((y, keep_argmax.then_some(idx)))
    })
}

/// Max pooling backward from the forward pass's argmax positions.
pub(crate) fn max_pool_bwd(
    idx: &CudaSlice<u32>,
    dy: &CudaStorage,
    dy_l: &Layout,
    g: PoolGeom,
) -> Result<CudaStorage> {
    let dev = dy.device();
    let in_len = g.planes as usize * g.h as usize * g.w as usize;
    with_cuda_dtype!(dy.dtype(), T, A, {
        let grad = view::<T>(dy, dy_l)?;
        filled::<T>(dev, in_len, |dx| {
            launch::max_pool_bwd::<T>(dev, grid_1d(in_len), &idx.as_view(), &grad, dx, &g)
        })
    })
}

/// Average pooling forward (`count_include_pad` chooses the divisor).
pub(crate) fn avg_pool_fwd(
    s: &CudaStorage,
    l: &Layout,
    g: PoolGeom,
    out_len: usize,
    include_pad: bool,
) -> Result<CudaStorage> {
    let dev = s.device();
    let inc = include_pad as i32;
    with_cuda_dtype!(s.dtype(), T, A, {
        let x = view::<T>(s, l)?;
        filled::<T>(dev, out_len, |y| {
            launch::avg_pool_fwd::<T>(dev, grid_1d(out_len), &x, y, &g, &inc)
        })
    })
}

/// Average pooling backward: `dy -> dx`.
pub(crate) fn avg_pool_bwd(
    dy: &CudaStorage,
    dy_l: &Layout,
    g: PoolGeom,
    include_pad: bool,
) -> Result<CudaStorage> {
    let dev = dy.device();
    let in_len = g.planes as usize * g.h as usize * g.w as usize;
    let inc = include_pad as i32;
    with_cuda_dtype!(dy.dtype(), T, A, {
        let grad = view::<T>(dy, dy_l)?;
        filled::<T>(dev, in_len, |dx| {
            launch::avg_pool_bwd::<T>(dev, grid_1d(in_len), &grad, dx, &g, &inc)
        })
    })
}

/// Sizes of a batch norm, laid out as `BnGeom` in `kernels/batch_norm.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct BnGeom {
    pub n: i64,
    pub c: i64,
    pub hw: i64,
    /// Blocks per channel of the reductions.
    pub slices: i64,
    /// `div_by`'s multipliers and shifts for hw and c.
    pub hw_mul: u32,
    pub hw_shift: u32,
    pub c_mul: u32,
    pub c_shift: u32,
}

// SAFETY: plain old data with the C layout the kernels declare.
unsafe impl DeviceRepr for BnGeom {}

impl BnGeom {
    pub(crate) fn new(n: usize, c: usize, hw: usize) -> Self {
        // About 2048 reduction blocks in all (two waves of eight 256-thread blocks per SM on
        // an H100's 132: enough loads in flight for a memory-bound pass; 512 filled half
        // the SMs' thread slots), each with at least 4 elements per thread (the kernels
        // keep four loads in flight).
        let m = n * hw;
        let by_blocks = 2048usize.div_ceil(c.max(1));
        let by_work = m.div_ceil(THREADS as usize * 4).max(1);
        let total = (n * c * hw) as u64;
        let (hw_mul, hw_shift) = fast_div_params(hw as u64, total);
        let (c_mul, c_shift) = fast_div_params(c as u64, total);
        Self {
            n: n as i64,
            c: c as i64,
            hw: hw as i64,
            slices: by_blocks.min(by_work).clamp(1, 1024) as i64,
            hw_mul,
            hw_shift,
            c_mul,
            c_shift,
        }
    }

    fn total(&self) -> usize {
        (self.n * self.c * self.hw) as usize
    }

    /// `slices` blocks per channel, the channels in grid.y rows, folded into grid.z planes
    /// past the 65,535 rows a grid can have (`grid::fold_rows`, and `channel` in
    /// `kernels/batch_norm.cu`).
    fn reduce_grid(&self) -> Result<LaunchConfig> {
        let Some((rows, planes)) = crate::grid::fold_rows(self.c as u64) else {
            candle_core::bail!(
                "a batch norm over {} channels exceeds one launch's grid",
                self.c
            )
        };
        Ok(LaunchConfig {
            grid_dim: (self.slices as u32, rows, planes),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    fn channel_grid(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((self.c as u32).div_ceil(THREADS), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The CUDA storage behind a guard of a side tensor (statistics, scale) of an operation.
fn cuda_of<'a>(guard: &'a StorageRef<'_>) -> Result<&'a CudaStorage> {
    match &**guard {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("batch-norm statistics must live on the input's CUDA device"),
    }
}

/// Whether the batch-norm reductions run as two launches each (partials, then a merge per
/// channel) instead of one (the last block of each channel merges): set
/// `NOFUSS_BN_TWO_PASS=1` to rule the one-launch form out when checking a GPU.
fn bn_two_pass() -> bool {
    static TWO: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TWO.get_or_init(|| std::env::var_os("NOFUSS_BN_TWO_PASS").is_some_and(|v| v == "1"))
}

thread_local! {
    // Per device, a counter per channel for the one-launch reductions: zero between
    // launches (each channel's last block resets its own), grown as channels need.
    static BN_DONE: RefCell<HashMap<DeviceId, CudaSlice<u32>>> = RefCell::new(HashMap::new());
}

/// Runs `f` with at least `c` zero counters on `dev` (this thread's, see `BN_DONE`).
fn with_counters<R>(
    dev: &CudaDevice,
    c: usize,
    f: impl FnOnce(&mut CudaViewMut<u32>) -> Result<R>,
) -> Result<R> {
    BN_DONE.with(|m| {
        let mut m = m.borrow_mut();
        let fits = m.get(&dev.id()).is_some_and(|s| s.len() >= c);
        if !fits {
            m.insert(dev.id(), dev.alloc_zeros::<u32>(c.max(1024))?);
        }
        let done = m.get_mut(&dev.id()).expect("inserted above");
        f(&mut done.slice_mut(..c))
    })
}

/// Per-channel mean, biased variance and 1/sqrt(variance + eps): `[3, C]` in the
/// accumulator dtype.
pub(crate) fn bn_stats(s: &CudaStorage, l: &Layout, g: BnGeom, eps: f64) -> Result<CudaStorage> {
    let dev = s.device();
    with_cuda_dtype!(s.dtype(), T, A, {
        let x = view::<T>(s, l)?;
        let cfg = g.reduce_grid()?;
        // SAFETY: every block writes its own partials before any merge reads them.
        let mut partial = unsafe { dev.alloc::<A>((3 * g.c * g.slices) as usize)? };
        if !bn_two_pass() {
            return filled::<A>(dev, (3 * g.c) as usize, |out| {
                with_counters(dev, g.c as usize, |done| {
                    let p = &mut partial.as_view_mut();
                    launch::bn_stats::<T, A>(dev, cfg, &x, p, out, done, &g, &eps)
                })
            });
        }
        launch::bn_stats_partial::<T, A>(dev, cfg, &x, &mut partial.as_view_mut(), &g)?;
        filled::<A>(dev, (3 * g.c) as usize, |out| {
            launch::bn_stats_final::<A>(dev, g.channel_grid(), &partial.as_view(), out, &g, &eps)
        })
    })
}

/// `y = relu?((x - mean) / σ γ + β)`.
pub(crate) fn bn_apply(
    (xs, xl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
    (mean, invstd): (&Tensor, &Tensor),
    g: BnGeom,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let relu = relu as i32;
    let (mg, ml) = mean.storage_and_layout();
    let (ig, il) = invstd.storage_and_layout();
    with_cuda_dtype!(xs.dtype(), T, A, {
        let x = view::<T>(xs, xl)?;
        let (gamma, beta) = (view::<A>(gs, gl)?, view::<A>(bs, bl)?);
        let (mv, iv) = (view::<A>(cuda_of(&mg)?, ml)?, view::<A>(cuda_of(&ig)?, il)?);
        filled::<T>(dev, g.total(), |y| {
            let cfg = grid_1d(g.total());
            launch::bn_apply::<T, A>(dev, cfg, &x, &gamma, &beta, &mv, &iv, y, &g, &relu)
        })
    })
}

/// Per channel Σg and Σg·x̂, `[2, C]`, from `[x, dy, y]`.
pub(crate) fn bn_grad_sums(
    [(xs, xl), (ds, dl), (ys, yl)]: [(&CudaStorage, &Layout); 3],
    (mean, invstd): (&Tensor, &Tensor),
    g: BnGeom,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let relu = relu as i32;
    let (mg, ml) = mean.storage_and_layout();
    let (ig, il) = invstd.storage_and_layout();
    with_cuda_dtype!(xs.dtype(), T, A, {
        let (x, dy, y) = (view::<T>(xs, xl)?, view::<T>(ds, dl)?, view::<T>(ys, yl)?);
        let (mv, iv) = (view::<A>(cuda_of(&mg)?, ml)?, view::<A>(cuda_of(&ig)?, il)?);
        let cfg = g.reduce_grid()?;
        // SAFETY: every block writes its own partials before any merge reads them.
        let mut partial = unsafe { dev.alloc::<A>((2 * g.c * g.slices) as usize)? };
        if !bn_two_pass() {
            return filled::<A>(dev, (2 * g.c) as usize, |out| {
                with_counters(dev, g.c as usize, |done| {
                    let p = &mut partial.as_view_mut();
                    launch::bn_bwd_sums::<T, A>(
                        dev, cfg, &x, &dy, &y, &mv, &iv, p, out, done, &g, &relu,
                    )
                })
            });
        }
        let p = &mut partial.as_view_mut();
        launch::bn_bwd_partial::<T, A>(dev, cfg, &x, &dy, &y, &mv, &iv, p, &g, &relu)?;
        filled::<A>(dev, (2 * g.c) as usize, |out| {
            launch::bn_bwd_final::<A>(dev, g.channel_grid(), &partial.as_view(), out, &g)
        })
    })
}

/// The input gradient from `[x, dy, y]` and `[γ, mean, 1/σ, sums]`.
pub(crate) fn bn_grad_input(
    [(xs, xl), (ds, dl), (ys, yl)]: [(&CudaStorage, &Layout); 3],
    [gamma, mean, invstd, sums]: [&Tensor; 4],
    g: BnGeom,
    relu: bool,
    batch_stats: bool,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let (relu, batch_stats) = (relu as i32, batch_stats as i32);
    let (gg, gl) = gamma.storage_and_layout();
    let (mg, ml) = mean.storage_and_layout();
    let (ig, il) = invstd.storage_and_layout();
    let (sg, sl) = sums.storage_and_layout();
    with_cuda_dtype!(xs.dtype(), T, A, {
        let (x, dy, y) = (view::<T>(xs, xl)?, view::<T>(ds, dl)?, view::<T>(ys, yl)?);
        let gv = view::<A>(cuda_of(&gg)?, gl)?;
        let (mv, iv) = (view::<A>(cuda_of(&mg)?, ml)?, view::<A>(cuda_of(&ig)?, il)?);
        let sv = view::<A>(cuda_of(&sg)?, sl)?;
        filled::<T>(dev, g.total(), |dx| {
            launch::bn_bwd_data::<T, A>(
                dev,
                grid_1d(g.total()),
                &x,
                &dy,
                &y,
                &gv,
                &mv,
                &iv,
                &sv,
                dx,
                &g,
                &relu,
                &batch_stats,
            )
        })
    })
}

/// In place: `running = (1 - momentum) running + momentum factor batch`.
pub(crate) fn bn_update_running(
    (rs, rl): (&mut CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
    shift: Option<(&CudaStorage, &Layout)>,
    momentum: f64,
    factor: f64,
) -> Result<()> {
    let Some((a, b)) = rl.contiguous_offsets() else {
        candle_core::bail!("running statistics must be contiguous");
    };
    let dt = rs.dtype();
    let same = |s: &CudaStorage| s.dtype() == dt;
    if !same(bs) || !shift.is_none_or(|(s, _)| same(s)) || !matches!(dt, DType::F32 | DType::F64) {
        candle_core::bail!("running statistics must be f32 or f64 like the batch's");
    }
    let dev = rs.device.clone();
    let n = (b - a) as i64;
    with_cuda_dtype!(dt, T, A, {
        let batch = view::<T>(bs, bl)?;
        // Without a shift the kernel reads none; the batch stands in for the pointer.
        let (sv, has_shift) = match shift {
            Some((ss, sl)) => (view::<T>(ss, sl)?, 1i32),
            None => (view::<T>(bs, bl)?, 0),
        };
        let mut run = rs.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
        let cfg = grid_1d(n as usize);
        launch::bn_update_running::<T>(
            &dev, cfg, &mut run, &batch, &sv, &n, &momentum, &factor, &has_shift,
        )?;
        Ok(())
    })
}

/// Shapes and settings of one convolution, the key of the cuDNN algorithm caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvKey {
    pub x: [i32; 4],
    pub w: [i32; 4],
    pub y: [i32; 4],
    pub padding: i32,
    pub stride: i32,
    pub dilation: i32,
    pub groups: i32,
    pub dtype: DType,
    pub tf32: bool,
    /// Algorithms timed by cuDNN (`AlgoSearch::Benchmark`) rather than its heuristic.
    pub benchmark: bool,
}

type AlgoCache<A> = std::sync::Mutex<Option<HashMap<ConvKey, A>>>;
static FWD_ALGOS: AlgoCache<Choice<cudnn_sys::cudnnConvolutionFwdAlgo_t>> =
    std::sync::Mutex::new(None);
static BWD_DATA_ALGOS: AlgoCache<Choice<cudnn_sys::cudnnConvolutionBwdDataAlgo_t>> =
    std::sync::Mutex::new(None);
static BWD_FILTER_ALGOS: AlgoCache<Choice<cudnn_sys::cudnnConvolutionBwdFilterAlgo_t>> =
    std::sync::Mutex::new(None);

/// The cached algorithm for `key`, or `pick()`'s, remembered.
fn cached<A: Copy>(
    cache: &AlgoCache<A>,
    key: &ConvKey,
    pick: impl FnOnce() -> Result<A>,
) -> Result<A> {
    if let Some(a) = cache
        .lock()
        .ok()
        .and_then(|m| m.as_ref()?.get(key).copied())
    {
        return Ok(a);
    }
    let a = pick()?;
    if let Ok(mut m) = cache.lock() {
        m.get_or_insert_with(HashMap::new).insert(*key, a);
    }
    Ok(a)
}

fn cudnn_err(what: &str) -> impl Fn(CudnnError) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Msg(format!("cuDNN {what}: {e:?}"))
}

/// Which convolution to run, with its three tensors (`x`/`dx`, `w`/`dw`, `y`/`dy`).
pub(crate) enum ConvPass<'a> {
    /// `y = conv(x, w)`.
    Forward {
        x: (&'a CudaStorage, &'a Layout),
        w: (&'a CudaStorage, &'a Layout),
    },
    /// `dx = conv_bwd_data(dy, w)`.
    BackwardData {
        dy: (&'a CudaStorage, &'a Layout),
        w: (&'a CudaStorage, &'a Layout),
    },
    /// `dw = conv_bwd_filter(x, dy)`.
    BackwardFilter {
        x: (&'a CudaStorage, &'a Layout),
        dy: (&'a CudaStorage, &'a Layout),
    },
}

/// Runs one cuDNN convolution pass; returns the output (`y`, `dx` or `dw`).
pub(crate) fn cudnn_conv(pass: ConvPass<'_>, key: ConvKey) -> Result<CudaStorage> {
    let first = match &pass {
        ConvPass::Forward { x, .. } => x.0,
        ConvPass::BackwardData { dy, .. } => dy.0,
        ConvPass::BackwardFilter { x, .. } => x.0,
    };
    let dev = first.device().clone();
    match key.dtype {
        DType::F32 => conv_typed::<f32, f32>(&dev, pass, key),
        DType::F64 => conv_typed::<f64, f64>(&dev, pass, key),
        DType::BF16 => conv_typed::<half::bf16, f32>(&dev, pass, key),
        dt => candle_core::bail!("cuDNN convolution supports f32, f64 and bf16, not {dt:?}"),
    }
}

/// A raw cuDNN handle on one thread's view of a device's stream, for the `cudnnFind*`
/// calls, which cudarc does not wrap (its descriptors keep their handles private).
struct RawHandle(cudnn_sys::cudnnHandle_t);

impl Drop for RawHandle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate, destroyed once.
        unsafe { cudnn_sys::cudnnDestroy(self.0) };
    }
}

thread_local! {
    static RAW_CUDNN: RefCell<HashMap<DeviceId, RawHandle>> = RefCell::new(HashMap::new());
}

/// Raw descriptors of one convolution (for the `cudnnFind*` calls), destroyed on drop.
struct RawConv {
    x: cudnn_sys::cudnnTensorDescriptor_t,
    w: cudnn_sys::cudnnFilterDescriptor_t,
    y: cudnn_sys::cudnnTensorDescriptor_t,
    conv: cudnn_sys::cudnnConvolutionDescriptor_t,
}

impl Drop for RawConv {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created by its cudnnCreate* call.
        unsafe {
            if !self.x.is_null() {
                cudnn_sys::cudnnDestroyTensorDescriptor(self.x);
            }
            if !self.y.is_null() {
                cudnn_sys::cudnnDestroyTensorDescriptor(self.y);
            }
            if !self.w.is_null() {
                cudnn_sys::cudnnDestroyFilterDescriptor(self.w);
            }
            if !self.conv.is_null() {
                cudnn_sys::cudnnDestroyConvolutionDescriptor(self.conv);
            }
        }
    }
}

impl RawConv {
    /// The descriptors of `key`'s convolution: elements of type `T`, arithmetic in `C`.
    fn new<T: CudnnDataType, C: CudnnDataType>(
        key: &ConvKey,
        math: cudnn_sys::cudnnMathType_t,
    ) -> Result<Self> {
        use cudnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let mut r = RawConv {
            x: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
        };
        let [p, st, d] = [key.padding, key.stride, key.dilation];
        // SAFETY: each descriptor is created before it is set; `r` destroys them.
        unsafe {
            cudnn_sys::cudnnCreateTensorDescriptor(&mut r.x)
                .result()
                .map_err(cudnn_err("find: x"))?;
            cudnn_sys::cudnnCreateTensorDescriptor(&mut r.y)
                .result()
                .map_err(cudnn_err("find: y"))?;
            cudnn_sys::cudnnCreateFilterDescriptor(&mut r.w)
                .result()
                .map_err(cudnn_err("find: w"))?;
            cudnn_sys::cudnnCreateConvolutionDescriptor(&mut r.conv)
                .result()
                .map_err(cudnn_err("find: conv"))?;
            for (desc, [n, c, h, w]) in [(r.x, key.x), (r.y, key.y)] {
                cudnn_sys::cudnnSetTensor4dDescriptor(
                    desc,
                    CUDNN_TENSOR_NCHW,
                    T::DATA_TYPE,
                    n,
                    c,
                    h,
                    w,
                )
                .result()
                .map_err(cudnn_err("find: tensor shape"))?;
            }
            let [k, c, h, w] = key.w;
            cudnn_sys::cudnnSetFilter4dDescriptor(r.w, T::DATA_TYPE, CUDNN_TENSOR_NCHW, k, c, h, w)
                .result()
                .map_err(cudnn_err("find: filter shape"))?;
            cudnn_sys::cudnnSetConvolution2dDescriptor(
                r.conv,
                p,
                p,
                st,
                st,
                d,
                d,
                cudnn_sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                C::DATA_TYPE,
            )
            .result()
            .map_err(cudnn_err("find: convolution"))?;
            if key.groups > 1 {
                cudnn_sys::cudnnSetConvolutionGroupCount(r.conv, key.groups)
                    .result()
                    .map_err(cudnn_err("find: groups"))?;
            }
            cudnn_sys::cudnnSetConvolutionMathType(r.conv, math)
                .result()
                .map_err(cudnn_err("find: math type"))?;
        }
        Ok(r)
    }
}

/// Runs `find` with this thread's raw cuDNN handle on `dev`'s stream.
fn with_raw_handle<R>(
    dev: &CudaDevice,
    find: impl FnOnce(cudnn_sys::cudnnHandle_t) -> Result<R>,
) -> Result<R> {
    let handle = RAW_CUDNN.with(|map| -> Result<cudnn_sys::cudnnHandle_t> {
        use std::collections::hash_map::Entry;
        match map.borrow_mut().entry(dev.id()) {
            Entry::Occupied(e) => Ok(e.get().0),
            Entry::Vacant(e) => {
                let mut h: cudnn_sys::cudnnHandle_t = std::ptr::null_mut();
                // SAFETY: a fresh handle (destroyed by RawHandle's drop), bound to the
                // device's stream, the one candle and the cudarc handle use.
                unsafe {
                    cudnn_sys::cudnnCreate(&mut h)
                        .result()
                        .map_err(cudnn_err("find: handle"))?;
                    let raw = RawHandle(h);
                    let stream = dev.cuda_stream().cu_stream() as cudnn_sys::cudaStream_t;
                    cudnn_sys::cudnnSetStream(h, stream)
                        .result()
                        .map_err(cudnn_err("find: stream"))?;
                    Ok(e.insert(raw).0)
                }
            }
        }
    })?;
    find(handle)
}

/// An algorithm of one convolution pass and the math type cuDNN ranked it under. Since
/// cuDNN 7.4 the pair decides which kernels run (tensor-core or not), so the convolution
/// descriptor takes the chosen math type before the pass runs, as PyTorch's cuDNN
/// convolutions do; running the algorithm under the descriptor's own math type instead can
/// give a different, slower kernel than the one cuDNN ranked first.
type Choice<A> = (A, cudnn_sys::cudnnMathType_t);

/// Whether a ranked math type may run `key`'s convolution: any, except that f32 with TF32
/// forbidden must stay on FMA kernels.
fn math_allowed(key: &ConvKey, math: cudnn_sys::cudnnMathType_t) -> bool {
    key.dtype != DType::F32 || key.tf32 || math == cudnn_sys::cudnnMathType_t::CUDNN_FMA_MATH
}

/// cuDNN's ranking of `key`'s convolution (elements `T`, arithmetic `C`, descriptors under
/// `math`) on this thread's raw handle, with room for `N` results: its heuristic
/// (`cudnnGet*_v7`) or, when `key.benchmark`, every algorithm timed (`cudnnFind*`). The
/// first result that can run (status success, an allowed math type) is the choice.
/// `call` gets the handle, the descriptors, the result count and the results; `result`
/// reads a result's status, algorithm and math type.
fn ranked_choice<T: CudnnDataType, C: CudnnDataType, P, A, const N: usize>(
    dev: &CudaDevice,
    key: &ConvKey,
    math: cudnn_sys::cudnnMathType_t,
    what: &'static str,
    call: impl FnOnce(cudnn_sys::cudnnHandle_t, &RawConv, &mut i32, *mut P) -> cudnn_sys::cudnnStatus_t,
    result: impl Fn(&P) -> (cudnn_sys::cudnnStatus_t, A, cudnn_sys::cudnnMathType_t),
) -> Result<Choice<A>> {
    let raw = RawConv::new::<T, C>(key, math)?;
    with_raw_handle(dev, |h| {
        let mut count = 0i32;
        // SAFETY: plain-old-data results, written by cuDNN (zero is a valid value of each
        // of their enums).
        let mut perf: [P; N] = unsafe { std::mem::zeroed() };
        call(h, &raw, &mut count, perf.as_mut_ptr())
            .result()
            .map_err(cudnn_err(what))?;
        perf.iter()
            .take(count.clamp(0, N as i32) as usize)
            .map(&result)
            .find(|&(status, _, m)| {
                status == cudnn_sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && math_allowed(key, m)
            })
            .map(|(_, algo, m)| (algo, m))
            .ok_or_else(|| candle_core::Error::Msg(format!("cuDNN {what}: no usable algorithm")))
    })
}

/// The choice of algorithm and math type for one convolution pass.
trait ChooseAlgorithm {
    /// The pass's algorithm enum.
    type Algo;
    /// cuDNN's first usable (algorithm, math type) for `key`, its descriptors set up under
    /// `math`: heuristic, or timed when `key.benchmark` (`AlgoSearch::Benchmark`).
    fn choose(
        dev: &CudaDevice,
        key: &ConvKey,
        math: cudnn_sys::cudnnMathType_t,
    ) -> Result<Choice<Self::Algo>>;
}

/// Implements [`ChooseAlgorithm`] for a pass: its op type, algorithm and result types, how
/// many algorithms it has, its heuristic and timing functions (the same arguments) and
/// their four descriptors in order (fields of [`RawConv`]).
macro_rules! choose_algorithm_for {
    ($($op:ident, $algo:ident, $perf:ident, $n:literal, $get:ident, $find:ident, $what:literal, [$a:ident, $b:ident, $c:ident, $d:ident];)*) => {$(
        impl<X: CudnnDataType, C: CudnnDataType, Y: CudnnDataType> ChooseAlgorithm for $op<'_, X, C, Y> {
            type Algo = cudnn_sys::$algo;
            fn choose(
                dev: &CudaDevice,
                key: &ConvKey,
                math: cudnn_sys::cudnnMathType_t,
            ) -> Result<Choice<Self::Algo>> {
                ranked_choice::<X, C, cudnn_sys::$perf, _, $n>(
                    dev,
                    key,
                    math,
                    $what,
                    // SAFETY: live descriptors and handle; room for `$n` results.
                    |h, r, n, p| unsafe {
                        if key.benchmark {
                            cudnn_sys::$find(h, r.$a, r.$b, r.$c, r.$d, $n, n, p)
                        } else {
                            cudnn_sys::$get(h, r.$a, r.$b, r.$c, r.$d, $n, n, p)
                        }
                    },
                    |p| (p.status, p.algo, p.mathType),
                )
            }
        }
    )*};
}

choose_algorithm_for! {
    ConvForward, cudnnConvolutionFwdAlgo_t, cudnnConvolutionFwdAlgoPerf_t, 8,
        cudnnGetConvolutionForwardAlgorithm_v7, cudnnFindConvolutionForwardAlgorithm,
        "forward algorithm", [x, w, conv, y];
    ConvBackwardData, cudnnConvolutionBwdDataAlgo_t, cudnnConvolutionBwdDataAlgoPerf_t, 6,
        cudnnGetConvolutionBackwardDataAlgorithm_v7, cudnnFindConvolutionBackwardDataAlgorithm,
        "backward-data algorithm", [w, y, conv, x];
    ConvBackwardFilter, cudnnConvolutionBwdFilterAlgo_t, cudnnConvolutionBwdFilterAlgoPerf_t, 7,
        cudnnGetConvolutionBackwardFilterAlgorithm_v7, cudnnFindConvolutionBackwardFilterAlgorithm,
        "backward-filter algorithm", [x, y, conv, w];
}

/// The workspace `$op` needs for `$algo` (none when it needs none); its size is asked once
/// per shape and pass (slot `$pass` of the descriptors' sizes).
macro_rules! workspace {
    ($op:ident, $algo:ident, $dev:ident, $descs:ident, $pass:literal, $what:literal) => {{
        let size = match $descs.workspace[$pass].get() {
            Some((a, size)) if a == $algo as u32 => size,
            _ => {
                let size = $op
                    .get_workspace_size($algo)
                    .map_err(cudnn_err(concat!($what, " workspace")))?;
                $descs.workspace[$pass].set(Some(($algo as u32, size)));
                size
            }
        };
        // SAFETY: scratch space, never read before cuDNN writes it.
        (size > 0)
            .then(|| unsafe { $dev.alloc::<u8>(size) })
            .transpose()?
    }};
}

/// The cuDNN descriptors of one convolution shape on one thread's handle, with the
/// workspace size each pass's algorithm needs once known (forward, backward-data,
/// backward-filter): made once per shape instead of at every call.
struct ConvDescs<T: CudnnDataType, C: CudnnDataType> {
    /// The convolution, under the math type of the pass that ran last (`conv_math`).
    conv: RefCell<ConvDescriptor<C>>,
    conv_math: std::cell::Cell<cudnn_sys::cudnnMathType_t>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    /// The math type cuDNN ranks algorithms under (PyTorch's for the element type).
    math: cudnn_sys::cudnnMathType_t,
    workspace: [std::cell::Cell<Option<(u32, usize)>>; 3],
}

impl<T: CudnnDataType, C: CudnnDataType> ConvDescs<T, C> {
    /// The convolution descriptor under `math` (set only when it changes).
    fn conv_under(
        &self,
        math: cudnn_sys::cudnnMathType_t,
    ) -> Result<std::cell::Ref<'_, ConvDescriptor<C>>> {
        if self.conv_math.get() != math {
            self.conv
                .borrow_mut()
                .set_math_type(math)
                .map_err(cudnn_err("math type"))?;
            self.conv_math.set(math);
        }
        Ok(self.conv.borrow())
    }
}

thread_local! {
    // Descriptors hold this thread's handle, so they are cached per thread too.
    static CONV_DESCS: RefCell<HashMap<(DeviceId, ConvKey), std::rc::Rc<dyn std::any::Any>>> =
        RefCell::new(HashMap::new());
}

/// This thread's descriptors of `key`'s convolution on `dev` (elements `T`, arithmetic
/// `C`), made on first use.
fn conv_descs<T, C>(dev: &CudaDevice, key: &ConvKey) -> Result<std::rc::Rc<ConvDescs<T, C>>>
where
    T: CudnnDataType + 'static,
    C: CudnnDataType + 'static,
{
    use cudnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let id = (dev.id(), *key);
    if let Some(d) = CONV_DESCS.with(|m| m.borrow().get(&id).cloned()) {
        if let Ok(d) = d.downcast::<ConvDescs<T, C>>() {
            return Ok(d);
        }
    }
    let handle = cudnn(dev)?;
    let mut conv = handle
        .create_conv2d::<C>(
            [key.padding; 2],
            [key.stride; 2],
            [key.dilation; 2],
            cudnn_sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(cudnn_err("convolution descriptor"))?;
    if key.groups > 1 {
        conv.set_group_count(key.groups)
            .map_err(cudnn_err("group count"))?;
    }
    // PyTorch's (and Paddle's) choice: tensor-op math for bf16; for f32 the default math,
    // which lets cuDNN use TF32 tensor cores, or FMA only when TF32 is forbidden.
    let math = match key.dtype {
        DType::F32 if !key.tf32 => cudnn_sys::cudnnMathType_t::CUDNN_FMA_MATH,
        DType::F32 | DType::F64 => cudnn_sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        _ => cudnn_sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    };
    conv.set_math_type(math).map_err(cudnn_err("math type"))?;
    let d = std::rc::Rc::new(ConvDescs {
        conv: RefCell::new(conv),
        conv_math: std::cell::Cell::new(math),
        x: handle
            .create_4d_tensor::<T>(CUDNN_TENSOR_NCHW, key.x)
            .map_err(cudnn_err("input descriptor"))?,
        w: handle
            .create_4d_filter::<T>(CUDNN_TENSOR_NCHW, key.w)
            .map_err(cudnn_err("filter descriptor"))?,
        y: handle
            .create_4d_tensor::<T>(CUDNN_TENSOR_NCHW, key.y)
            .map_err(cudnn_err("output descriptor"))?,
        math,
        workspace: Default::default(),
    });
    CONV_DESCS.with(|m| m.borrow_mut().insert(id, d.clone()));
    Ok(d)
}

/// A convolution's name in the profile: pass, dtype, shapes, stride, padding, algorithm and
/// its math type.
fn conv_label(pass: &str, key: &ConvKey, (algo, math): Choice<impl std::fmt::Debug>) -> String {
    let algo = format!("{algo:?}");
    let algo = algo.rsplit("_ALGO_").next().unwrap_or(&algo);
    let math = format!("{math:?}");
    let math = math.trim_start_matches("CUDNN_").trim_end_matches("_MATH");
    format!(
        "cudnn {pass} {:?} x{:?} w{:?} s{} p{} {algo} {math}",
        key.dtype, key.x, key.w, key.stride, key.padding
    )
}

/// The (algorithm, math type) of a pass for `key`, cached per shape.
fn choice<P: ChooseAlgorithm>(
    cache: &AlgoCache<Choice<P::Algo>>,
    dev: &CudaDevice,
    key: &ConvKey,
    math: cudnn_sys::cudnnMathType_t,
) -> Result<Choice<P::Algo>>
where
    P::Algo: Copy,
{
    cached(cache, key, || P::choose(dev, key, math))
}

fn conv_typed<T, C>(dev: &CudaDevice, pass: ConvPass<'_>, key: ConvKey) -> Result<CudaStorage>
where
    T: CudaDType + CudnnDataType + DeviceRepr + candle_core::WithDType + 'static,
    C: CudnnDataType + 'static,
{
    let d = conv_descs::<T, C>(dev, &key)?;
    let numel = |s: [i32; 4]| s.iter().map(|&d| d as usize).product::<usize>();
    let one_zero = (T::from_f64(1.0), T::from_f64(0.0));
    match pass {
        ConvPass::Forward { x, w } => {
            let chosen = choice::<ConvForward<T, C, T>>(&FWD_ALGOS, dev, &key, d.math)?;
            let (algo, conv) = (chosen.0, d.conv_under(chosen.1)?);
            let op = ConvForward {
                conv: &conv,
                x: &d.x,
                w: &d.w,
                y: &d.y,
            };
            let mut ws = workspace!(op, algo, dev, d, 0, "forward");
            let (xv, wv) = (view::<T>(x.0, x.1)?, view::<T>(w.0, w.1)?);
            // SAFETY: every element is written by cuDNN.
            let mut y = unsafe { dev.alloc::<T>(numel(key.y))? };
            crate::profile::timed(
                dev,
                || conv_label("forward", &key, chosen),
                || {
                    // SAFETY: buffers match the descriptors' types and shapes.
                    unsafe { op.launch(algo, ws.as_mut(), one_zero, &xv, &wv, &mut y) }
                        .map_err(cudnn_err("forward"))
                },
            )?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        ConvPass::BackwardData { dy, w } => {
            let chosen = choice::<ConvBackwardData<T, C, T>>(&BWD_DATA_ALGOS, dev, &key, d.math)?;
            let (algo, conv) = (chosen.0, d.conv_under(chosen.1)?);
            let op = ConvBackwardData {
                conv: &conv,
                dx: &d.x,
                w: &d.w,
                dy: &d.y,
            };
            let mut ws = workspace!(op, algo, dev, d, 1, "backward-data");
            let (dyv, wv) = (view::<T>(dy.0, dy.1)?, view::<T>(w.0, w.1)?);
            // SAFETY: every element is written by cuDNN (beta = 0).
            let mut dx = unsafe { dev.alloc::<T>(numel(key.x))? };
            crate::profile::timed(
                dev,
                || conv_label("backward-data", &key, chosen),
                || {
                    // SAFETY: buffers match the descriptors' types and shapes.
                    unsafe { op.launch(algo, ws.as_mut(), one_zero, &mut dx, &wv, &dyv) }
                        .map_err(cudnn_err("backward data"))
                },
            )?;
            Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
        }
        ConvPass::BackwardFilter { x, dy } => {
            let chosen =
                choice::<ConvBackwardFilter<T, C, T>>(&BWD_FILTER_ALGOS, dev, &key, d.math)?;
            let (algo, conv) = (chosen.0, d.conv_under(chosen.1)?);
            let op = ConvBackwardFilter {
                conv: &conv,
                x: &d.x,
                dw: &d.w,
                dy: &d.y,
            };
            let mut ws = workspace!(op, algo, dev, d, 2, "backward-filter");
            let (xv, dyv) = (view::<T>(x.0, x.1)?, view::<T>(dy.0, dy.1)?);
            // SAFETY: with beta = 0 cuDNN writes every element and reads none (PyTorch
            // hands it an uninitialised buffer too).
            let mut dw = unsafe { dev.alloc::<T>(numel(key.w))? };
            crate::profile::timed(
                dev,
                || conv_label("backward-filter", &key, chosen),
                || {
                    // SAFETY: buffers match the descriptors' types and shapes.
                    unsafe { op.launch(algo, ws.as_mut(), one_zero, &xv, &mut dw, &dyv) }
                        .map_err(cudnn_err("backward filter"))
                },
            )?;
            Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
        }
    }
}

// SAFETY: plain old data with the C layout `kernels/optim.cu` declares.
unsafe impl DeviceRepr for crate::fused_step::StepArgs {}

/// The device address of the first element of `t`, a contiguous f64 tensor on CUDA.
/// It stays valid while `t`'s storage lives (candle never moves a buffer).
pub(crate) fn device_address_f64(t: &Tensor) -> Result<u64> {
    device_address::<f64>(t)
}

/// [`device_address_f64`] for a contiguous CUDA tensor of element type `T`.
fn device_address<T: CudaDType>(t: &Tensor) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceSlice};
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cuda(s), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        candle_core::bail!("device address: a contiguous CUDA tensor is needed");
    };
    let view = s.as_cuda_slice::<T>()?.slice(a..b);
    let (address, _record) = view.device_ptr(view.stream());
    Ok(address)
}

/// [`device_address`] of a contiguous f32 or f64 CUDA tensor, by its dtype (the
/// many-tensor kernels' tables).
fn float_address(t: &Tensor) -> Result<u64> {
    match t.dtype() {
        DType::F32 => device_address::<f32>(t),
        DType::F64 => device_address::<f64>(t),
        dt => candle_core::bail!("device address: an f32 or f64 tensor is needed, not {dt:?}"),
    }
}

// SAFETY: plain old data with the C layout `kernels/optim.cu` declares.
unsafe impl DeviceRepr for crate::sumsq::SumsqTable {}

/// The summed squares of `tensors` (f32 or f64, on `dev`) as a scalar f64 on `dev`:
/// `sumsq_partial` over tables of up to `TABLE_TENSORS` tensors of one dtype, then
/// `sumsq_total` (`crate::sumsq`).
pub(crate) fn sum_of_squares(dev: &CudaDevice, tensors: &[&Tensor]) -> Result<Tensor> {
    use crate::sumsq::SumsqTable;
    use crate::tables::{plan, TABLE_TENSORS};
    // Contiguous copies, where needed, live until the launches are queued (a buffer
    // freed after that is reused in stream order).
    let tensors = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    if let Some(t) = tensors
        .iter()
        .find(|t| !matches!(t.dtype(), DType::F32 | DType::F64) || !t.device().is_cuda())
    {
        candle_core::bail!(
            "summed squares of f32 or f64 CUDA tensors, not {:?} on {:?}",
            t.dtype(),
            t.device()
        );
    }
    let mut launches = vec![];
    let mut end = 0;
    for dt in [DType::F32, DType::F64] {
        let of_dt: Vec<&Tensor> = tensors.iter().filter(|t| t.dtype() == dt).collect();
        let lens: Vec<usize> = of_dt.iter().map(|t| t.elem_count()).collect();
        let (planned, next) =
            plan(&lens, end).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        end = next;
        for l in planned {
            let mut table = SumsqTable {
                data: [0; TABLE_TENSORS],
                len: [0; TABLE_TENSORS],
                first_block: [0; TABLE_TENSORS],
                count: l.tensors.len() as u32,
                blocks: l.blocks,
                base: l.base,
                _pad: 0,
            };
            for (k, (&i, &first)) in l.tensors.iter().zip(&l.first_block).enumerate() {
                let t = of_dt[i];
                table.data[k] = float_address(t)?;
                table.len[k] = t.elem_count() as i64;
                table.first_block[k] = first;
            }
            launches.push((dt, table));
        }
    }
    let total = end as usize;
    if total == 0 {
        return Tensor::zeros((), DType::F64, &candle_core::Device::Cuda(dev.clone()));
    }
    // SAFETY: every partial sum is written by the launches below before the total reads
    // them (each block writes its own).
    let mut partial = unsafe { dev.alloc::<f64>(total)? };
    for (dt, table) in &launches {
        let cfg = rows_grid(table.blocks as usize, THREADS)?;
        let p = &mut partial.as_view_mut();
        match dt {
            DType::F32 => launch::sumsq_partial::<f32>(dev, cfg, table, p)?,
            _ => launch::sumsq_partial::<f64>(dev, cfg, table, p)?,
        }
    }
    let n = total as i64;
    let out = filled::<f64>(dev, 1, |out| {
        launch::sumsq_total::<f64>(dev, rows_grid(1, THREADS)?, &partial.as_view(), &n, out)
    })?;
    Ok(Tensor::from_storage(
        Storage::Cuda(out),
        (),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// One optimiser step of `params` (each a contiguous f32 or f64 parameter, its gradient
/// and its `[3, numel]` state, all of one dtype) with the same `args`, in place:
/// `optim_step` over tables of up to `TABLE_TENSORS` of them (`crate::tables`).
pub(crate) fn optim_step(
    params: &[(&Tensor, &Tensor, &Tensor)],
    args: &crate::fused_step::StepArgs,
) -> Result<()> {
    use crate::fused_step::OptimTable;
    use crate::tables::{plan, TABLE_TENSORS};
    let Some(&(first, _, _)) = params.first() else {
        return Ok(());
    };
    let dt = first.dtype();
    let Device::Cuda(dev) = first.device() else {
        candle_core::bail!("the fused optimiser step runs on CUDA tensors");
    };
    if !matches!(dt, DType::F32 | DType::F64) {
        candle_core::bail!("optimiser tensors must all be f32 or all f64 in one step");
    }
    for &(p, g, s) in params {
        let n = p.elem_count();
        if [p.dtype(), g.dtype(), s.dtype()] != [dt; 3] {
            candle_core::bail!("optimiser tensors must all be f32 or all f64 in one step");
        }
        if g.elem_count() != n || s.elem_count() != 3 * n {
            candle_core::bail!(
                "optimiser step: a parameter of {n} values with a gradient of {} and a state of {}",
                g.elem_count(),
                s.elem_count()
            );
        }
        if !p.device().same_device(first.device()) {
            candle_core::bail!("optimiser step: parameters on more than one device");
        }
    }
    let lens: Vec<usize> = params.iter().map(|(p, _, _)| p.elem_count()).collect();
    let (launches, _) = plan(&lens, 0).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    for l in launches {
        let mut table = OptimTable {
            param: [0; TABLE_TENSORS],
            grad: [0; TABLE_TENSORS],
            state: [0; TABLE_TENSORS],
            len: [0; TABLE_TENSORS],
            first_block: [0; TABLE_TENSORS],
            count: l.tensors.len() as u32,
            blocks: l.blocks,
        };
        for (k, (&i, &first_block)) in l.tensors.iter().zip(&l.first_block).enumerate() {
            let (p, g, s) = params[i];
            table.param[k] = float_address(p)?;
            table.grad[k] = float_address(g)?;
            table.state[k] = float_address(s)?;
            table.len[k] = lens[i] as i64;
            table.first_block[k] = first_block;
        }
        let cfg = rows_grid(table.blocks as usize, THREADS)?;
        match dt {
            DType::F32 => launch::optim_step::<f32>(dev, cfg, &table, args)?,
            _ => launch::optim_step::<f64>(dev, cfg, &table, args)?,
        }
    }
    Ok(())
}

/// The fused NCA rows: `[N, 2]` (loss, log-sum-exp) from `dist` `[N, P]` and u32 labels.
pub(crate) fn nca_fwd(
    (ds, dl): (&CudaStorage, &Layout),
    (ls, ll): (&CudaStorage, &Layout),
    n: usize,
    p: usize,
    paper: bool,
    smoothing: f64,
) -> Result<CudaStorage> {
    let dev = ds.device();
    let (p64, paper) = (p as i64, paper as i32);
    with_cuda_dtype!(ds.dtype(), T, A, {
        let d = view::<T>(ds, dl)?;
        let labels = view::<u32>(ls, ll)?;
        let cfg = rows_grid(n, THREADS)?;
        filled::<T>(dev, 2 * n, |o| {
            launch::nca_fwd::<T>(dev, cfg, &d, &labels, o, &p64, &paper, &smoothing)
        })
    })
}

/// The gradient of the fused NCA rows with respect to `dist`, from `[dist, res, grad]`.
pub(crate) fn nca_bwd(
    [(ds, dl), (rs, rl), (gs, gl)]: [(&CudaStorage, &Layout); 3],
    labels: &Tensor,
    n: usize,
    p: usize,
    paper: bool,
    smoothing: f64,
) -> Result<CudaStorage> {
    let dev = ds.device();
    let (n64, p64, paper) = (n as i64, p as i64, paper as i32);
    let (lg, ll) = labels.storage_and_layout();
    with_cuda_dtype!(ds.dtype(), T, A, {
        let d = view::<T>(ds, dl)?;
        let res = view::<T>(rs, rl)?;
        let grad = view::<T>(gs, gl)?;
        let lv = view::<u32>(cuda_of(&lg)?, ll)?;
        let cfg = grid_1d(n * p);
        filled::<T>(dev, n * p, |dd| {
            launch::nca_bwd::<T>(
                dev, cfg, &d, &lv, &res, &grad, dd, &n64, &p64, &paper, &smoothing,
            )
        })
    })
}

/// The `k` smallest entries of every row of an f32 `[rows, cols]` matrix, sorted, with
/// their columns (`kernels/select.cu`; the caller checked `k` and the sizes).
pub(crate) fn smallest_k(
    s: &CudaStorage,
    l: &Layout,
    rows: usize,
    cols: usize,
    k: usize,
    skip_diagonal: Option<usize>,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = s.device();
    let cfg = rows_grid(rows, SELECT_THREADS)?;
    let x = view::<f32>(s, l)?;
    let (cols, k32) = (cols as i64, k as i32);
    let (offset, skip) = (
        skip_diagonal.unwrap_or(0) as i64,
        skip_diagonal.is_some() as i32,
    );
    let (vals, idx) = fresh::<f32, _>(dev, rows * k, |vals| {
        filled::<u32>(dev, rows * k, |idx| {
            launch::smallest_k::<f32>(dev, cfg, &x, vals, idx, &cols, &k32, &offset, &skip)
        })
    })?;
    Ok((CudaStorage::wrap_cuda_slice(vals, dev.clone()), idx))
}

/// A launch of one `threads`-thread block per row.
fn rows_grid(rows: usize, threads: u32) -> Result<LaunchConfig> {
    if rows > i32::MAX as usize {
        candle_core::bail!("{rows} rows exceed one launch's grid");
    }
    Ok(LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `scale * x / max(|x|, eps)` per row of a contiguous `[n, d]` matrix.
pub(crate) fn l2n_fwd(
    s: &CudaStorage,
    l: &Layout,
    n: usize,
    d: usize,
    scale: f64,
    eps: f64,
) -> Result<CudaStorage> {
    let dev = s.device();
    let d64 = d as i64;
    with_cuda_dtype!(s.dtype(), T, A, {
        let x = view::<T>(s, l)?;
        let cfg = rows_grid(n, THREADS)?;
        filled::<T>(dev, n * d, |y| {
            launch::l2n_fwd::<T>(dev, cfg, &x, y, &d64, &scale, &eps)
        })
    })
}

/// The gradient of [`l2n_fwd`] from `(x, dy)`.
pub(crate) fn l2n_bwd(
    (xs, xl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    n: usize,
    d: usize,
    scale: f64,
    eps: f64,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let d64 = d as i64;
    with_cuda_dtype!(xs.dtype(), T, A, {
        let (x, g) = (view::<T>(xs, xl)?, view::<T>(gs, gl)?);
        let cfg = rows_grid(n, THREADS)?;
        filled::<T>(dev, n * d, |dx| {
            launch::l2n_bwd::<T>(dev, cfg, &x, &g, dx, &d64, &scale, &eps)
        })
    })
}

/// `max((|a|² + |b|²) - 2 ab, 0)` from `[ab [n, p], |a|² [n], |b|² [p]]`.
pub(crate) fn sqdist_fwd(
    [(abs, abl), (aas, aal), (bbs, bbl)]: [(&CudaStorage, &Layout); 3],
    n: usize,
    p: usize,
) -> Result<CudaStorage> {
    let dev = abs.device();
    let (n64, p64) = (n as i64, p as i64);
    with_cuda_dtype!(abs.dtype(), T, A, {
        let ab = view::<T>(abs, abl)?;
        let (aa, bb) = (view::<T>(aas, aal)?, view::<T>(bbs, bbl)?);
        filled::<T>(dev, n * p, |o| {
            launch::sqdist_fwd::<T>(dev, grid_1d(n * p), &ab, &aa, &bb, o, &n64, &p64)
        })
    })
}

/// `-2 g where d > 0, else 0` over `total` elements.
pub(crate) fn sqdist_bwd(
    (gs, gl): (&CudaStorage, &Layout),
    (ds, dl): (&CudaStorage, &Layout),
    total: usize,
) -> Result<CudaStorage> {
    let dev = gs.device();
    let t64 = total as i64;
    with_cuda_dtype!(gs.dtype(), T, A, {
        let (g, d) = (view::<T>(gs, gl)?, view::<T>(ds, dl)?);
        filled::<T>(dev, total, |o| {
            launch::sqdist_bwd::<T>(dev, grid_1d(total), &g, &d, o, &t64)
        })
    })
}
