//! Backbones and the embedding head: images in, L2-normalised embeddings out.
//!
//! A [`Backbone`] maps `[N,C,H,W]` images to a feature map; the [`EmbeddingHead`]
//! pools it globally (average, max, or both summed), projects it linearly to `D`
//! dimensions (64 in the paper) and optionally L2-normalises; an [`Embedder`] chains
//! both. Every model is built from a candle `VarBuilder`, so weights load by name.
//!
//! - [`BnInception`]: Inception with batch normalisation, the paper's backbone, in the
//!   layer plan of the public `pretrainedmodels` port; [`BnInception::load`] reads its
//!   ImageNet checkpoint (`bn_inception-52deb4733.pth`, a pickled state dict, or
//!   safetensors; [`weights`] names a missing or mis-shaped tensor and the file). Its
//!   features, logits, training-mode statistics and gradients match the PyTorch port on
//!   committed fixtures (`tests/bn_inception_parity.rs`). Batch norm trains or stays
//!   frozen ([`BatchNormMode`]).
//! - [`SmallCnn`]: a compact VGG-style network fast enough to train on two CPU cores.
//! - [`Embedder::forward_train`]: a training pass whose backbone runs on
//!   `nofuss_tensor`'s tape (its own backward pass, faster than candle's graph) and whose
//!   [`TrainingPass::backward`] gives the gradients of any loss on the embeddings;
//!   [`Embedder::with_precision`] runs the backbone in bf16 with f32 parameters.
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

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use nofuss_tensor::tape::{self, Tape};

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
    /// [`Self::forward_map`] in training mode recorded on `tape` instead of candle's graph
    /// (see [`nofuss_tensor::tape`]), or `None`, before recording anything, where the
    /// backbone trains through candle's graph only (the default).
    fn forward_tape(
        &self,
        tape: &mut Tape,
        x: &tape::Act,
    ) -> Option<candle_core::Result<tape::Act>> {
        let _ = (tape, x);
        None
    }

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
    tape: bool,
}

impl Embedder {
    /// Chains `backbone` and `head`, everything in f32.
    pub fn new(backbone: Box<dyn Backbone>, head: EmbeddingHead) -> Self {
        Self {
            backbone,
            head,
            precision: Precision::F32,
            tape: true,
        }
    }

    /// Whether [`Self::forward_train`] runs the backbone on a tape where it can (the
    /// default) or always in candle's graph (for comparisons).
    pub fn set_tape(&mut self, tape: bool) {
        self.tape = tape;
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
        self.map_of(&x.to_dtype(self.precision.compute_dtype())?, train)
    }

    /// [`Self::map`] of an input already in the compute dtype.
    fn map_of(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.backbone
            .forward_map(x, train)?
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

    /// A training-mode forward pass whose [`TrainingPass::backward`] gives the gradients
    /// of a loss on its embeddings. The backbone runs on a [`Tape`] where it can
    /// ([`Backbone::forward_tape`]; same values and gradients as candle's graph, without
    /// its zero-filled gradient buffers; see [`Self::set_tape`]), the head in candle's
    /// graph.
    pub fn forward_train(&self, x: &Tensor) -> Result<TrainingPass> {
        self.train_pass(x, |map| self.head.forward(map))
    }

    /// [`Self::forward_train`] up to the globally average-pooled backbone features `[N,F]`
    /// (the head left out), for timing or training the backbone alone.
    pub fn forward_train_features(&self, x: &Tensor) -> Result<TrainingPass> {
        self.train_pass(x, |map| Ok(Pooling::Average.apply(map)?))
    }

    /// A training pass whose output is `top` of the backbone's feature map (in f32).
    fn train_pass(
        &self,
        x: &Tensor,
        top: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<TrainingPass> {
        let xc = x.to_dtype(self.precision.compute_dtype())?;
        let mut tape = Tape::new();
        let input = tape.input(&xc);
        let out = if self.tape {
            self.backbone.forward_tape(&mut tape, &input)
        } else {
            None
        };
        let Some(out) = out else {
            return Ok(TrainingPass {
                embeddings: top(&self.map_of(&xc, true)?)?,
                tape: None,
            });
        };
        let out = out?;
        // The tape's output joins candle's graph as a leaf whose gradient starts the
        // tape's backward pass.
        let leaf = Var::from_tensor(&out.tensor().to_dtype(self.precision.loss_dtype())?)?;
        let embeddings = top(leaf.as_tensor())?;
        Ok(TrainingPass {
            embeddings,
            tape: Some((tape, out, leaf)),
        })
    }
}

/// A training forward pass of an [`Embedder`] ([`Embedder::forward_train`],
/// [`Embedder::forward_train_features`]).
pub struct TrainingPass {
    /// The embeddings `[N,D]` (or pooled features `[N,F]`), in candle's graph.
    pub embeddings: Tensor,
    /// The backbone's tape, its output and the leaf the head starts from.
    tape: Option<(Tape, tape::Act, Var)>,
}

impl std::fmt::Debug for TrainingPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingPass")
            .field("embeddings", &self.embeddings.dims())
            .field("tape", &self.tape.as_ref().map(|t| &t.0))
            .finish()
    }
}

impl TrainingPass {
    /// Whether the backbone ran on a tape (rather than in candle's graph).
    pub fn taped(&self) -> bool {
        self.tape.is_some()
    }

    /// The gradients of `loss` (a scalar computed from [`Self::embeddings`]) with respect
    /// to every trained variable: candle's backward pass down to the backbone's output,
    /// then the tape's.
    pub fn backward(self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        if let Some((tape, out, leaf)) = self.tape {
            if let Some(g) = grads.remove(leaf.as_tensor()) {
                tape.backward_into(&out, &g, &mut grads)?;
            }
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use nofuss_tensor::SeededVarMap;

    type VarBuilderOf = candle_nn::VarBuilder<'static>;

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Fixed weights `cos(0.01 i)` shaped like `t`: the loss `Σ t ⊙ w` has gradient `w`.
    fn weights_like(t: &Tensor) -> Tensor {
        let w = Tensor::arange(0u32, t.elem_count() as u32, t.device())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .reshape(t.dims())
            .unwrap();
        (w * 0.01)
            .unwrap()
            .cos()
            .unwrap()
            .to_dtype(t.dtype())
            .unwrap()
    }

    /// Compares every variable's gradient (and every running statistic) of two copies of
    /// the same parameters, `tol` relative to each tensor's largest value.
    fn same_gradients(
        (p_graph, g_graph): (&SeededVarMap, &GradStore),
        (p_tape, g_tape): (&SeededVarMap, &GradStore),
        tol: f64,
    ) {
        let mut compared = 0;
        for ((name, gv), (_, tv)) in p_graph.named_vars().iter().zip(&p_tape.named_vars()) {
            if name.contains("running") {
                close(&vals(tv.as_tensor()), &vals(gv.as_tensor()), tol, name);
                continue;
            }
            match (g_graph.get(gv.as_tensor()), g_tape.get(tv.as_tensor())) {
                (Some(a), Some(b)) => {
                    assert_eq!(a.dtype(), b.dtype(), "{name}");
                    close(&vals(b), &vals(a), tol, name);
                    compared += 1;
                }
                // Folded convolution biases under batch statistics: no gradient, either way.
                (None, None) => assert!(name.ends_with(".bias"), "{name}"),
                (a, b) => panic!("{name}: graph {:?}, tape {:?}", a.is_some(), b.is_some()),
            }
        }
        assert!(compared > 4, "{compared} gradients compared");
    }

    /// A backbone's feature-map gradients, from its tape and from candle's graph.
    fn backbone_tape_against_graph(
        build: impl Fn(VarBuilderOf) -> Box<dyn Backbone>,
        dims: (usize, usize, usize, usize),
        dt: DType,
        tol: f64,
    ) {
        let dev = Device::Cpu;
        let make = || {
            let params = SeededVarMap::new(11);
            let backbone = build(params.var_builder(dt, &dev));
            // Running statistics away from 0 and 1, for batch norms that use them.
            for (name, v) in params.named_vars() {
                let ramp = Tensor::arange(0u32, v.elem_count() as u32, &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let ramp = (ramp * 0.01).unwrap().sin().unwrap();
                if name.ends_with("running_mean") {
                    v.set(&(ramp * 0.3).unwrap()).unwrap();
                } else if name.ends_with("running_var") {
                    v.set(&(ramp.abs().unwrap() + 0.5).unwrap()).unwrap();
                }
            }
            (params, backbone)
        };
        let (p_graph, graph) = make();
        let (p_tape, taped) = make();
        let x = Tensor::randn(0f64, 1.0, dims, &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let map = graph.forward_map(&x, true).unwrap();
        let w = weights_like(&map);
        let g_graph = (&map * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let mut tape = Tape::new();
        let input = tape.input(&x);
        let out = taped.forward_tape(&mut tape, &input).unwrap().unwrap();
        close(&vals(out.tensor()), &vals(&map), tol, "feature map");
        let mut g_tape = (x.zeros_like().unwrap().sum_all().unwrap())
            .backward()
            .unwrap();
        tape.backward_into(&out, &w, &mut g_tape).unwrap();
        same_gradients((&p_graph, &g_graph), (&p_tape, &g_tape), tol);
    }

    /// The same through an [`Embedder`] (head and loss in candle's graph) in `precision`.
    fn embedder_tape_against_graph(
        build: impl Fn(VarBuilderOf) -> Box<dyn Backbone>,
        dims: (usize, usize, usize, usize),
        precision: Precision,
        tol: f64,
    ) {
        let dev = Device::Cpu;
        let make = || {
            let params = SeededVarMap::new(11);
            let vb = params.var_builder(DType::F32, &dev);
            let backbone = build(vb.pp("backbone"));
            let head = EmbeddingHead::new(
                backbone.out_channels(),
                &HeadConfig::default(),
                vb.pp("head"),
            )
            .unwrap();
            let model = Embedder::new(backbone, head).with_precision(precision);
            (params, model)
        };
        let (p_graph, graph) = make();
        let (p_tape, taped) = make();
        let x = Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
        let e_graph = graph.forward(&x, true).unwrap();
        let w = weights_like(&e_graph);
        let g_graph = (&e_graph * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let pass = taped.forward_train(&x).unwrap();
        assert!(pass.taped());
        let e_tape = pass.embeddings.clone();
        close(&vals(&e_tape), &vals(&e_graph), tol, "embeddings");
        let loss = (&e_tape * &w).unwrap().sum_all().unwrap();
        let g_tape = pass.backward(&loss).unwrap();
        same_gradients((&p_graph, &g_graph), (&p_tape, &g_tape), tol);
    }

    fn small_cnn(vb: VarBuilderOf) -> Box<dyn Backbone> {
        let cfg = SmallCnnConfig {
            in_channels: 3,
            widths: vec![4, 6],
            input_size: 12,
        };
        Box::new(SmallCnn::new(&cfg, vb).unwrap())
    }

    fn bn_inception(vb: VarBuilderOf) -> Box<dyn Backbone> {
        Box::new(BnInception::new(vb, &BnInceptionConfig::default()).unwrap())
    }

    #[test]
    fn small_cnn_trains_the_same_on_a_tape() {
        backbone_tape_against_graph(small_cnn, (4, 3, 12, 12), DType::F64, 1e-10);
        embedder_tape_against_graph(small_cnn, (4, 3, 12, 12), Precision::F32, 1e-5);
    }

    #[test]
    fn bn_inception_trains_the_same_on_a_tape() {
        backbone_tape_against_graph(bn_inception, (2, 3, 64, 64), DType::F64, 1e-9);
        embedder_tape_against_graph(bn_inception, (2, 3, 32, 32), Precision::F32, 1e-4);
    }

    /// Frozen batch norm (running statistics; scales, shifts and the folded convolution
    /// biases train) on the tape, against candle's graph.
    #[test]
    fn frozen_bn_inception_trains_the_same_on_a_tape() {
        let frozen = |vb: VarBuilderOf| -> Box<dyn Backbone> {
            let cfg = BnInceptionConfig {
                batch_norm: BatchNormMode::Frozen,
                ..Default::default()
            };
            Box::new(BnInception::new(vb, &cfg).unwrap())
        };
        backbone_tape_against_graph(frozen, (2, 3, 64, 64), DType::F64, 1e-9);
        embedder_tape_against_graph(frozen, (2, 3, 32, 32), Precision::F32, 1e-4);
    }
    #[test]
    fn the_tape_can_be_turned_off_and_refuses_bad_sizes() {
        let params = SeededVarMap::new(1);
        let vb = params.var_builder(DType::F32, &Device::Cpu);
        let net = SmallCnn::new(&SmallCnnConfig::default(), vb.pp("b")).unwrap();
        let head =
            EmbeddingHead::new(net.out_channels(), &HeadConfig::default(), vb.pp("h")).unwrap();
        let mut model = Embedder::new(Box::new(net), head);
        let x = Tensor::randn(0f32, 1.0, (2, 1, 32, 32), &Device::Cpu).unwrap();
        assert!(model.forward_train(&x).unwrap().taped());
        // The pooled features alone, on the tape and in candle's graph: the same values
        // and gradients.
        let features = |model: &Embedder| {
            let pass = model.forward_train_features(&x).unwrap();
            let taped = pass.taped();
            let f = pass.embeddings.clone();
            let grads = pass.backward(&f.sqr().unwrap().sum_all().unwrap()).unwrap();
            let named = params.named_vars();
            let (_, v) = named
                .iter()
                .find(|(n, _)| n == "b.blocks.0.conv.weight")
                .unwrap();
            let w = grads.get(v.as_tensor()).unwrap().clone();
            (taped, vals(&f), vals(&w))
        };
        let on_tape = features(&model);
        model.set_tape(false);
        let in_graph = features(&model);
        assert_eq!((on_tape.0, in_graph.0), (true, false));
        assert_eq!(on_tape.1.len(), 2 * 64);
        close(&on_tape.1, &in_graph.1, 1e-5, "features");
        close(&on_tape.2, &in_graph.2, 1e-5, "weight gradient");
        let pass = model.forward_train(&x).unwrap();
        assert!(!pass.taped());
        let loss = pass.embeddings.sum_all().unwrap();
        assert!(pass.backward(&loss).is_ok());
        // An input size the network refuses is an error on the tape too.
        let bad = Tensor::zeros((2, 3, 40, 40), DType::F32, &Device::Cpu).unwrap();
        let params = SeededVarMap::new(1);
        let vb = params.var_builder(DType::F32, &Device::Cpu);
        let net = BnInception::new(vb.pp("b"), &BnInceptionConfig::default()).unwrap();
        let head =
            EmbeddingHead::new(BN_INCEPTION_FEATURES, &HeadConfig::default(), vb.pp("h")).unwrap();
        let model = Embedder::new(Box::new(net), head);
        let err = model.forward_train(&bad).unwrap_err().to_string();
        assert!(err.contains("40x40"), "{err}");
    }
}

/// The README's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;
