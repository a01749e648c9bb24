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
//! Static assignment (one proxy per class, paper section 3.1) is what [`ProxyNca`]
//! implements: label `y` uses proxy row `y`.

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
