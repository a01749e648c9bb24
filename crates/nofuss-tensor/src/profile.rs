//! Where a step's time goes: per-operation timing of nofuss-tensor's own operations (CUDA
//! kernels and cuDNN passes on a GPU, the operations themselves on the CPU).
//!
//! When [`set_enabled`] is on, every CUDA kernel of this crate (batch norm, pooling, the
//! loss and optimiser kernels, by kernel name) and every cuDNN convolution (by pass,
//! shapes and the algorithm cuDNN runs) waits for the device before and after it runs,
//! and adds the time to a table that [`take`] returns, largest first; on the CPU each of
//! the crate's operations is timed by its name (`nofuss-batch-norm-stats`, ...). What is
//! left of a profiled step's time went to candle's own operations (copies,
//! concatenation, element-wise arithmetic, matrix products, gradient sums) and, on a GPU,
//! to the waits themselves. The waits serialise host and device, so a profiled GPU step is
//! slower than a plain one: compare the operations with each other. Off (the default), an
//! operation pays one relaxed atomic load.
//!
//! ```
//! use nofuss_tensor::profile;
//!
//! profile::set_enabled(true);
//! // ... run some steps on a CUDA device ...
//! for op in profile::take() {
//!     println!("{:>8.3} ms {:>5} x {}", op.seconds * 1e3, op.calls, op.name);
//! }
//! profile::set_enabled(false);
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Option<HashMap<String, (u64, f64)>>> = Mutex::new(None);

/// The time one operation took in all its calls since the last [`take`].
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// Kernel name (`bn_apply_f32`), cuDNN pass with shapes and algorithm, or CPU operation
    /// name (`nofuss-batch-norm-stats`).
    pub name: String,
    /// How many times it ran.
    pub calls: u64,
    /// Seconds in all (on a GPU each call from a finished device to a finished device).
    pub seconds: f64,
}

/// Turns per-operation timing on or off (process-wide).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether per-operation timing is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Adds one call of `name` that took `seconds`.
pub fn record(name: &str, seconds: f64) {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let entry = table
        .get_or_insert_with(HashMap::new)
        .entry(name.to_string())
        .or_insert((0, 0.0));
    entry.0 += 1;
    entry.1 += seconds;
}

/// The table so far, largest total first (ties by name), and empties it.
pub fn take() -> Vec<OpTime> {
    let table = TABLE.lock().unwrap_or_else(|e| e.into_inner()).take();
    let mut ops: Vec<OpTime> = table
        .unwrap_or_default()
        .into_iter()
        .map(|(name, (calls, seconds))| OpTime {
            name,
            calls,
            seconds,
        })
        .collect();
    ops.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.name.cmp(&b.name)));
    ops
}

/// Times one CPU operation from `start` until dropped, when timing is on (CPU work is
/// done when its call returns: no wait needed).
pub(crate) struct HostTimer(Option<(&'static str, std::time::Instant)>);

impl HostTimer {
    /// Starts timing the operation `name` (nothing when timing is off).
    pub(crate) fn start(name: &'static str) -> Self {
        Self(enabled().then(|| (name, std::time::Instant::now())))
    }
}

impl Drop for HostTimer {
    fn drop(&mut self) {
        if let Some((name, t)) = self.0.take() {
            record(name, t.elapsed().as_secs_f64());
        }
    }
}

/// Runs `f` between two waits for `dev` and records it under `name()` when timing is on;
/// just runs it otherwise.
#[cfg(feature = "cuda")]
pub(crate) fn timed<T>(
    dev: &candle_core::cuda_backend::CudaDevice,
    name: impl FnOnce() -> String,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    use candle_core::backend::BackendDevice;
    if !enabled() {
        return f();
    }
    dev.synchronize()?;
    let t = std::time::Instant::now();
    let v = f()?;
    dev.synchronize()?;
    record(&name(), t.elapsed().as_secs_f64());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_add_up_per_name_and_take_sorts_and_empties() {
        record("profile-test b", 0.5);
        record("profile-test a", 0.25);
        record("profile-test b", 1.0);
        record("profile-test c", 0.25);
        let ops: Vec<OpTime> = take()
            .into_iter()
            .filter(|o| o.name.starts_with("profile-test"))
            .collect();
        let got: Vec<(&str, u64, f64)> = ops
            .iter()
            .map(|o| (o.name.as_str(), o.calls, o.seconds))
            .collect();
        assert_eq!(
            got,
            [
                ("profile-test b", 2, 1.5),
                ("profile-test a", 1, 0.25),
                ("profile-test c", 1, 0.25)
            ]
        );
        assert!(take().iter().all(|o| !o.name.starts_with("profile-test")));
        set_enabled(true);
        assert!(enabled());
        set_enabled(false);
        assert!(!enabled());
    }
}
