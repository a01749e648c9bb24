//! Backbones and the embedding head: images in, L2-normalised embeddings out.
//!
//! A [`Backbone`] maps `[N,C,H,W]` images to a feature map; the [`EmbeddingHead`]
//! pools it globally (average, max, or both summed), projects it linearly to `D`
//! dimensions (64 in the paper) and optionally L2-normalises; an [`Embedder`] chains
//! both. [`SmallCnn`] is a compact VGG-style network fast enough to train on two CPU
//! cores. Every model is built from a candle `VarBuilder`, so weights load by name.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use nofuss_backbone::{Backbone, EmbeddingHead, Embedder, HeadConfig, SmallCnn, SmallCnnConfig};
//! use nofuss_tensor::SeededVarMap;
//!
//! let params = SeededVarMap::new(0);
//! let vb = params.var_builder(DType::F32, &Device::Cpu);
//! let cnn = SmallCnn::new(&SmallCnnConfig::default(), vb.pp("backbone"))?;
//! let head = EmbeddingHead::new(cnn.out_channels(), &HeadConfig::default(), vb.pp("head"))?;
//! let model = Embedder::new(Box::new(cnn), head);
//! let x = Tensor::zeros((2, 1, 32, 32), DType::F32, &Device::Cpu)?;
//! let e = model.forward(&x, false)?;
//! assert_eq!(e.dims(), &[2, 64]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod bn_inception;
mod error;
mod head;
mod small_cnn;
pub mod weights;

pub use bn_inception::{
    feature_len as bn_inception_feature_len, BatchNormMode, BnInception, BnInceptionConfig,
    BN_INCEPTION_FEATURES,
};
pub use error::{BackboneError, Result};
pub use head::{EmbeddingHead, HeadConfig, HeadInit, Pooling};
pub use nofuss_tensor::{ChannelOrder, Normalization, Precision};
pub use small_cnn::{SmallCnn, SmallCnnConfig};

use candle_core::Tensor;

/// What a backbone expects as input.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// Number of channels.
    pub channels: usize,
    /// Nominal square input size (the network itself accepts any size its pooling allows).
    pub size: usize,
    /// How 8-bit pixels must be normalised for these weights.
    pub normalization: Normalization,
}

/// A convolutional feature extractor.
pub trait Backbone: Send + Sync {
    /// Short name, as given on the command line (`small-cnn`).
    fn name(&self) -> &'static str;
    /// `[N,C,H,W]` images to a `[N,F,h,w]` feature map. `train` selects batch statistics
    /// (and updates running statistics) in batch normalisation.
    fn forward_map(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    /// `F`, the channels of the feature map.
    fn out_channels(&self) -> usize;
    /// The expected input.
    fn input(&self) -> InputSpec;
}

/// A backbone followed by an embedding head.
pub struct Embedder {
    backbone: Box<dyn Backbone>,
    head: EmbeddingHead,
    precision: Precision,
}

impl Embedder {
    /// Chains `backbone` and `head`, everything in f32.
    pub fn new(backbone: Box<dyn Backbone>, head: EmbeddingHead) -> Self {
        Self {
            backbone,
            head,
            precision: Precision::F32,
        }
    }

    /// Runs the backbone in `precision`'s compute dtype (bf16: autocast-style mixed
    /// precision: images, activations and the convolutions' weight copies in bf16, batch
    /// norm statistics in f32, parameters and their gradients in f32); the feature map is
    /// brought back to f32 before the head, so embeddings, proxies and the loss stay f32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The backbone's precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    fn map(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(self.precision.compute_dtype())?;
        self.backbone
            .forward_map(&x, train)?
            .to_dtype(self.precision.loss_dtype())
    }

    /// The backbone.
    pub fn backbone(&self) -> &dyn Backbone {
        self.backbone.as_ref()
    }

    /// The head.
    pub fn head(&self) -> &EmbeddingHead {
        &self.head
    }

    /// Globally average-pooled backbone features `[N,F]`, for feature extraction.
    pub fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(Pooling::Average.apply(&self.map(x, train)?)?)
    }

    /// Images to embeddings `[N,D]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.head.forward(&self.map(x, train)?)
    }
}
