use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// Where to run: parsed from `cpu`, `cuda`, `cuda:N` or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (multi-threaded through candle's gemm and rayon).
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
    /// CUDA device 0 when built with `cuda` and a GPU answers, else the CPU.
    #[default]
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| Error::BadDeviceSpec(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => write!(f, "auto"),
        }
    }
}

/// A device picked from a [`DeviceSpec`], with a human-readable account of the choice.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    /// The candle device.
    pub device: Device,
    /// What was picked and why, e.g. `cpu (auto: built without CUDA)`.
    pub description: String,
}

impl DeviceSpec {
    /// Opens the device. `Cuda(n)` fails with a clear error when CUDA is not compiled in
    /// or device `n` does not answer; `Auto` falls back to the CPU and says why.
    pub fn select(self) -> Result<SelectedDevice> {
        match self {
            Self::Cpu => Ok(cpu("cpu".into())),
            Self::Cuda(n) => {
                if !crate::cuda_compiled() {
                    return Err(Error::CudaNotCompiled(n));
                }
                let device = single_stream(Device::new_cuda(n)?);
                Ok(SelectedDevice {
                    device,
                    description: format!("cuda:{n}"),
                })
            }
            Self::Auto => {
                if !crate::cuda_compiled() {
                    return Ok(cpu("cpu (auto: built without CUDA)".into()));
                }
                match Device::new_cuda(0) {
                    Ok(device) => Ok(SelectedDevice {
                        device: single_stream(device),
                        description: "cuda:0 (auto)".into(),
                    }),
                    Err(e) => Ok(cpu(format!("cpu (auto: no usable GPU: {e})"))),
                }
            }
        }
    }
}

/// Runs `f` on a thread of rayon's global pool when `device` is the CPU, else right here.
///
/// nofuss's and candle's CPU operations parallelise with rayon. Called from a thread
/// outside the pool, each operation hands its work to the pool and puts the caller to
/// sleep until it is done: two thread wake-ups per operation, which on two cores were a
/// sixth of a small-CNN training step (80 -> 67 ms). Started on a worker instead, the
/// operations of `f` share their parallel parts by work stealing. Meant for a training
/// step or a forward pass: `f` must not wait for other work on the global pool (say, a
/// batch that a pool job is still decoding), which could never run on a one-thread pool.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::ones((64, 64), candle_core::DType::F32, &Device::Cpu)?;
/// let y = nofuss_tensor::on_pool(&Device::Cpu, || x.matmul(&x))?;
/// assert_eq!(y.dims(), [64, 64]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn on_pool<T: Send>(device: &Device, f: impl FnOnce() -> T + Send) -> T {
    if device.is_cpu() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// Runs `f` with candle's device-side cache of layout parameters on, when `device` is a
/// CUDA device (on the CPU it only runs `f`).
///
/// candle's CUDA backend hands every reduction, and every element-wise operation or copy
/// over a non-contiguous layout, the dims and strides it works on as a small buffer copied
/// from host memory before the launch: in a BN-Inception training step over forty of them,
/// 38 for the copies of each inception branch's slice of a concatenation's gradient, the
/// rest for the head's pooling mean and bias, the loss's mean and their gradients. They come from
/// pageable memory, which CUDA may only copy once the stream's earlier work has finished
/// (its documented "may synchronize with the stream"), so the host stops queueing work
/// until the device catches up. With the cache on, each distinct layout is uploaded once
/// and kept on the device, and later operations with it upload nothing.
///
/// While it is on, candle also keeps every other host-to-device copy of at most 4 KiB on
/// the device, keyed by its content, for the rest of the process: `f` must not upload
/// small data that changes from call to call (labels, index lists: batches are uploaded
/// outside, and losses that pick on the host, `LossSpec::selects_on_host` in
/// nofuss-losses, stay outside). Setting `NOFUSS_CUDA_LAYOUT_CACHE=0` turns it off, to
/// compare.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let dev = Device::Cpu; // on a CUDA device the transposed sum's layout is cached
/// let x = Tensor::ones((2, 3), DType::F32, &dev)?;
/// let s = nofuss_tensor::with_cached_layouts(&dev, || x.t()?.sum(1))?;
/// assert_eq!(s.to_vec1::<f32>()?, [2.0, 2.0, 2.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn with_cached_layouts<T>(device: &Device, f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "cuda")]
    let _cache = match device {
        Device::Cuda(d) if caches_layouts(device) => Some(d.enable_cuda_graph_htod_cache()),
        _ => None,
    };
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    f()
}

/// Whether [`with_cached_layouts`] turns candle's layout cache on for `device`: a CUDA
/// device, unless `NOFUSS_CUDA_LAYOUT_CACHE` is `0`.
pub fn caches_layouts(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    return device.is_cuda() && layout_cache_wanted();
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// Whether [`with_cached_layouts`] turns the cache on: unless `NOFUSS_CUDA_LAYOUT_CACHE`
/// is `0` (read once).
#[cfg(feature = "cuda")]
fn layout_cache_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| std::env::var_os("NOFUSS_CUDA_LAYOUT_CACHE").is_none_or(|v| v != "0"))
}

/// The device named by the environment variable `NOFUSS_TEST_DEVICE` (`cpu`, `cuda`,
/// `cuda:N`, `auto`), the CPU when it is unset: lets the same parity tests run on a GPU
/// (`NOFUSS_TEST_DEVICE=cuda cargo test --features cuda`).
pub fn test_device() -> Result<Device> {
    let spec = std::env::var("NOFUSS_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    Ok(spec.parse::<DeviceSpec>()?.select()?.device)
}

/// The folder of the committed reference fixtures: `NOFUSS_FIXTURES` when set (test
/// binaries run on another machine), else `tests/reference/fixtures` of the workspace
/// holding `manifest_dir` (a crate's `CARGO_MANIFEST_DIR`, two levels below the root).
pub fn fixtures_dir(manifest_dir: &str) -> std::path::PathBuf {
    match std::env::var_os("NOFUSS_FIXTURES") {
        Some(p) => p.into(),
        None => std::path::Path::new(manifest_dir).join("../../tests/reference/fixtures"),
    }
}

/// Turns off cudarc's per-launch event tracking on a fresh CUDA device (set
/// `NOFUSS_CUDA_EVENT_TRACKING=1` to keep it). candle gives each device one stream of its
/// own, which puts cudarc in multi-stream mode: every kernel launch then records a CUDA
/// event for each buffer it touches, a few driver calls per launch for nothing, since all
/// of nofuss's work (candle's kernels, ours, cuDNN, copies) runs on that one stream.
fn single_stream(device: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        if std::env::var_os("NOFUSS_CUDA_EVENT_TRACKING").is_none_or(|v| v != "1") {
            // SAFETY: called before any tensor exists on the device, and every later use
            // of it is ordered on its single stream (no cross-stream hazards to track).
            unsafe { d.disable_event_tracking() };
        }
        keep_freed_memory(d);
    }
    device
}

/// Lets the device's default memory pool (where cudarc's stream-ordered allocations come
/// from) keep freed memory instead of returning it to the driver at every
/// synchronisation: a training step frees and reallocates the same activation sizes each
/// time, and PyTorch's caching allocator keeps them too. Best effort: a failure only
/// costs speed.
#[cfg(feature = "cuda")]
fn keep_freed_memory(d: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let dev = d.cuda_stream().context().cu_device();
    let mut threshold = u64::MAX;
    // SAFETY: `dev` comes from a live context; the release threshold is a u64 attribute.
    unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(dev) {
            let _ = result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
}

/// The state of a CUDA device's default memory pool, where candle's and nofuss's
/// stream-ordered allocations come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes the pool holds from the driver (in use or kept for reuse).
    pub reserved_bytes: u64,
    /// Bytes in live allocations.
    pub used_bytes: u64,
    /// Bytes of freed memory the pool keeps at a synchronisation (nofuss sets the
    /// maximum on the devices it opens; the driver's default is 0).
    pub release_threshold: u64,
}

/// The default memory pool's [`PoolStats`] of a CUDA device; `None` on the CPU, without
/// the `cuda` feature, or where the driver does not answer.
pub fn cuda_pool_stats(device: &Device) -> Option<PoolStats> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        use sys::CUmemPool_attribute as A;
        let dev = d.cuda_stream().context().cu_device();
        // SAFETY: `dev` comes from a live context; the three attributes are u64s.
        unsafe {
            let pool = result::device::get_default_mem_pool(dev).ok()?;
            let get = |attr: A| -> Option<u64> {
                let mut v = 0u64;
                result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()).ok()?;
                Some(v)
            };
            return Some(PoolStats {
                reserved_bytes: get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
                used_bytes: get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
                release_threshold: get(A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD)?,
            });
        }
    }
    let _ = device;
    None
}

fn cpu(description: String) -> SelectedDevice {
    SelectedDevice {
        device: Device::Cpu,
        description,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(" CUDA ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(err.to_string().contains("unknown device"), "{bad}: {err}");
        }
    }

    #[test]
    fn cpu_work_runs_on_a_pool_thread() {
        assert!(rayon::current_thread_index().is_none());
        let (inside, sum) = on_pool(&Device::Cpu, || {
            use rayon::prelude::*;
            let sum: u64 = (0..10_000u64).into_par_iter().sum();
            (rayon::current_thread_index(), sum)
        });
        assert!(inside.is_some());
        assert_eq!(sum, 49_995_000);
    }

    #[test]
    fn display_round_trips() {
        for s in [DeviceSpec::Cpu, DeviceSpec::Cuda(2), DeviceSpec::Auto] {
            assert_eq!(s.to_string().parse::<DeviceSpec>().unwrap(), s);
        }
    }

    #[test]
    fn cpu_and_auto_select_without_gpu() {
        assert!(DeviceSpec::Cpu.select().unwrap().device.is_cpu());
        assert_eq!(cuda_pool_stats(&Device::Cpu), None);
        let auto = DeviceSpec::Auto.select().unwrap();
        if !crate::cuda_compiled() {
            assert!(auto.device.is_cpu());
            assert!(auto.description.contains("without CUDA"));
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(1).select().unwrap_err();
        assert!(matches!(err, Error::CudaNotCompiled(1)));
        assert!(err.to_string().contains("--features cuda"));
    }
}
