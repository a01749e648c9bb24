//! Proxy losses for deep metric learning, after Movshovitz-Attias et al.,
//! "No Fuss Distance Metric Learning using Proxies" (ICCV 2017, arXiv 1703.07464).
//!
//! Instead of sampling triplets, every class owns a learned *proxy* vector and each
//! embedding is pulled towards its class proxy and pushed from the others. This
//! crate is plain candle: it works on any `Tensor` and differentiates through candle's
//! autograd with respect to both the embeddings and the proxies.
//!
//! ```
//! use candle_core::{Device, Tensor, DType};
//! use nofuss_losses::{proxy_nca, ProxyNcaConfig};
//!
//! let dev = Device::Cpu;
//! let emb = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &dev)?;
//! let proxies = Tensor::new(&[[1.0f32, 0.1], [0.1, 1.0], [-1.0, 0.0]], &dev)?;
//! let labels = Tensor::new(&[0u32, 1], &dev)?;
//! let loss = proxy_nca(&emb, &labels, &proxies, &ProxyNcaConfig::default())?;
//! assert!(loss.to_scalar::<f32>()?.is_finite());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What is here:
//!
//! - [`proxy_nca`] / [`ProxyNca`]: Proxy-NCA, in the paper's form (the positive proxy left
//!   out of the denominator, [`ProxyNcaForm::Paper`]) or the softmax form with optional
//!   label smoothing ([`ProxyNcaForm::Softmax`]), embeddings and proxies normalised and
//!   scaled.
//! - [`proxy_triplet`] / [`ProxyTriplet`]: Proxy-Triplet over all negative proxies or the
//!   `k` hardest ([`ProxyTripletConfig::hardest_negatives`]).
//! - [`Assignment`]: static (one proxy per class: label `y` uses proxy row `y`) or dynamic
//!   (each example's nearest proxy, any number of proxies) for both proxy losses;
//!   [`ProxyReseeder`] optionally moves proxies no example has picked for a while (an
//!   option of this project's, not the paper's).
//! - The paper's baselines on in-batch pairs: [`triplet_loss`] (all triplets or FaceNet's
//!   semi-hard negatives, [`TripletMining`]) and [`nca_loss`].
//! - [`MetricLoss`] and [`LossSpec`]: any of the above by name, owning its proxies, for a
//!   trainer that picks the loss from its configuration.
//!
//! Values and both gradients match pytorch-metric-learning or a PyTorch transcription of
//! each formula on committed fixtures (`tests/reference_parity.rs`). The proxy losses'
//! per-row work runs as one `nofuss-tensor` operation (a fused kernel on CUDA), and off the
//! CPU dynamic assignment picks its proxies on the device, so a step does not wait for it.
//! Bad input is an error, never a panic: labels past the proxies, non-finite values (with
//! `check_finite`), a batch without a valid anchor ([`LossError::NoPairs`]).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use nofuss_losses::{Assignment, LossSpec, MetricLoss, ProxyInit, ProxyNcaConfig};
//! use nofuss_tensor::SeededVarMap;
//!
//! // Proxy-NCA with dynamic assignment: 2 proxies for 4 classes.
//! let spec = LossSpec::ProxyNca(ProxyNcaConfig {
//!     assignment: Assignment::Dynamic,
//!     ..Default::default()
//! });
//! let params = SeededVarMap::new(0);
//! let loss_fn = MetricLoss::new(spec, 2, 3, ProxyInit::Normal, params.var_builder(DType::F32, &Device::Cpu))?;
//! let emb = Tensor::new(&[[1.0f32, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 0.1, 0.9]], &Device::Cpu)?;
//! let labels = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu)?;
//! let loss = loss_fn.loss(&emb, &labels)?;
//! let grads = loss.backward()?; // gradients for the proxies (and the embeddings, if tracked)
//! let proxies = loss_fn.proxies().ok_or("a proxy loss owns its proxies")?;
//! assert_eq!(grads.get(proxies).map(|g| g.dims().to_vec()), Some(vec![2, 3]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod assignment;
mod baselines;
mod common;
mod error;
mod metric_loss;
mod on_device;
mod proxy_nca;
mod proxy_triplet;
mod reseed;

pub use assignment::{nearest, Assignment, Selection};
pub use baselines::{nca_loss, triplet_loss, NcaConfig, TripletConfig, TripletMining};
pub use common::pairwise_squared_distances;
pub use error::{LossError, Result};
pub use metric_loss::{LossSpec, MetricLoss};
pub use proxy_nca::{
    class_mean_proxies, create_proxies, proxy_nca, ProxyInit, ProxyNca, ProxyNcaConfig,
    ProxyNcaForm,
};
pub use proxy_triplet::{proxy_triplet, ProxyTriplet, ProxyTripletConfig};
pub use reseed::ProxyReseeder;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;
