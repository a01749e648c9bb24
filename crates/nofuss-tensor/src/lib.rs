//! The tensor core of nofuss: where computations run and how parameters are made.
//!
//! Everything above this crate is device-generic candle code; this crate decides
//! *which* device ([`DeviceSpec`]), *which* precision ([`Precision`]) and gives
//! reproducible parameter initialisation ([`SeededVarMap`]), which candle's CPU
//! backend cannot seed on its own. It also holds the operations candle lacks or does
//! slowly, each a candle custom op with autograd and a kernel for the CPU (rayon loops)
//! and for CUDA (`kernels/*.cu`, or cuDNN):
//!
//! - [`conv`]: 2-D convolution (cuDNN forward / backward-data / backward-filter on CUDA;
//!   im2col + GEMM with a GEMM backward on the CPU);
//! - [`pool`]: max and average pooling with PyTorch's padding, ceil mode and
//!   `count_include_pad`;
//! - [`batch_norm`]: batch normalisation fused with ReLU, statistics and running
//!   statistics included;
//! - [`ops::nca_rows`], [`ops::nca_rows_from_points`], [`ops::triplet_rows_from_points`],
//!   [`ops::hardest_triplet_rows_from_points`]: the per-row objectives of the proxy losses
//!   (on the CPU from the points and proxies in one operation, no `[N, P]` tensor in the
//!   graph);
//! - [`select::smallest_k`]: the k smallest entries of every row, sorted (the selection
//!   of an exact kNN search; one kernel per row block on CUDA);
//! - [`optim`]: the optimisers (PyTorch's update rules, parameter groups, schedules,
//!   clipping), each step one fused in-place pass per parameter on the CPU and, on CUDA,
//!   a few launches for a whole group (up to 64 parameters each, the clipping norm summed
//!   on the device);
//! - [`tape`]: a reverse-mode tape over those layers, beside candle's autograd, for the
//!   training step of a convolutional backbone (no zero-filled gradient buffers);
//! - [`graph`]: a training step captured once into a CUDA graph and replayed (one launch
//!   instead of thousands);
//! - [`profile`]: per-operation GPU timing of all of the above, to see where a step's
//!   time goes;
//! - [`upload`]: batches to a GPU through page-locked staging buffers (the host does not
//!   wait for the GPU to take them).
//!
//! With the `cuda` feature it also forwards CUDA support to candle; building and testing
//! without a GPU needs nothing CUDA-specific (docs/GPU.md).
//!
//! ```
//! use nofuss_tensor::{DeviceSpec, SeededVarMap};
//! use candle_core::DType;
//!
//! let spec: DeviceSpec = "auto".parse()?;
//! let picked = spec.select()?;             // CPU here, a GPU when built with `cuda` and one is present
//! let params = SeededVarMap::new(42);
//! let vb = params.var_builder(DType::F32, &picked.device);
//! let w = vb.get_with_hints((4, 3), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
//! assert_eq!(w.dims(), &[4, 3]);
//! // The same seed and name give the same values, whatever else was created before.
//! let again = SeededVarMap::new(42).var_builder(DType::F32, &picked.device)
//!     .get_with_hints((4, 3), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
//! assert_eq!(w.to_vec2::<f32>()?, again.to_vec2::<f32>()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod batch_norm;
pub mod conv;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod error;
mod fast_div;
mod fused_step;
pub mod graph;
mod grid;
mod init;
mod normalization;
pub mod ops;
pub mod optim;
pub mod pool;
mod precision;
pub mod profile;
mod proxy_rows;
pub mod select;
mod sumsq;
mod tables;
pub mod tape;
pub mod upload;

pub use device::{
    caches_layouts, cuda_pool_stats, fixtures_dir, on_pool, test_device, with_cached_layouts,
    DeviceSpec, PoolStats, SelectedDevice,
};
pub use error::{Error, Result};
pub use init::SeededVarMap;
pub use normalization::{ChannelOrder, Normalization};
pub use precision::Precision;

/// Whether this build of nofuss can use CUDA (the `cuda` feature).
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;
