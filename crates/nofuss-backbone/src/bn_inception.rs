//! BN-Inception (Inception with batch normalisation, Ioffe & Szegedy 2015), layer for
//! layer the widely used PyTorch port (`pretrainedmodels.bninception`, also vendored by
//! the Proxy-NCA and Proxy-Anchor repositories), so its ImageNet checkpoint loads as is.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Conv2dConfig, Linear, Module, VarBuilder};
use nofuss_tensor::batch_norm::BatchNorm2d;
use nofuss_tensor::conv::Conv2d;
use nofuss_tensor::pool::Pool2d;
use nofuss_tensor::tape::{self, Graph, Layers, Tape};
use nofuss_tensor::Normalization;
use serde::{Deserialize, Serialize};

use crate::weights::{read_weights, select};
use crate::{Backbone, BackboneError, InputSpec, Pooling, Result};

/// How batch normalisation behaves while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatchNormMode {
    /// Batch statistics in training steps, running statistics updated with PyTorch's
    /// momentum convention (`running = (1 - m) running + m batch`, unbiased variance).
    #[default]
    Train,
    /// Running statistics always ("frozen BN"), while scale and shift still train: the
    /// usual choice when fine-tuning ImageNet weights with small batches.
    Frozen,
}

/// Settings of [`BnInception`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BnInceptionConfig {
    /// Batch-norm behaviour in training steps.
    pub batch_norm: BatchNormMode,
    /// Momentum of the running statistics, PyTorch convention (0.1 = 10 % new batch).
    pub bn_momentum: f64,
    /// Epsilon of batch normalisation (the port uses PyTorch's default 1e-5).
    pub bn_eps: f64,
    /// Classes of the ImageNet classifier `last_linear`; 0 builds no classifier (the
    /// metric-learning use). The checkpoint's `last_linear.*` tensors are then ignored.
    pub num_classes: usize,
}

impl Default for BnInceptionConfig {
    fn default() -> Self {
        Self {
            batch_norm: BatchNormMode::Train,
            bn_momentum: 0.1,
            bn_eps: 1e-5,
            num_classes: 0,
        }
    }
}

/// Convolution (with bias, as in the port, folded into the batch norm), batch norm and
/// ReLU (fused with the batch norm). Parameters `{name}.{weight,bias}` and
/// `{name}_bn.{weight,bias,running_mean,running_var}`.
#[derive(Debug, Clone)]
struct ConvBnRelu {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBnRelu {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: &VarBuilder,
        name: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        cfg: &BnInceptionConfig,
    ) -> Result<Self> {
        let conv_cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let conv = Conv2d::new(c_in, c_out, kernel, conv_cfg, true, vb.pp(name))?;
        let bn = BatchNorm2d::new(
            c_out,
            cfg.bn_eps,
            cfg.bn_momentum,
            vb.pp(format!("{name}_bn")),
        )?;
        Ok(Self { conv, bn })
    }

    fn forward<L: Layers>(&self, l: &mut L, x: &L::Act) -> candle_core::Result<L::Act> {
        // The bias goes into the batch norm (no pass over the activation to add it, none
        // backward to differentiate the sum); in training mode it only moves the running
        // mean, as the batch statistics cancel it.
        l.conv_bn(x, &self.conv, &self.bn, true)
    }
}

/// The pool branch of an inception block.
#[derive(Debug, Clone, Copy)]
enum PoolBranch {
    /// 3x3 stride-1 average pool (padding counted), then a 1x1 projection.
    AvgProject(usize),
    /// 3x3 stride-1 padded max pool, then a 1x1 projection (block 5b).
    MaxProject(usize),
    /// 3x3 stride-2 ceil-mode max pool passed through (reduction blocks 3c, 4e).
    MaxReduce,
}

/// Channel plan of one inception block.
#[derive(Debug, Clone, Copy)]
struct BlockSpec {
    name: &'static str,
    c_in: usize,
    one_by_one: Option<usize>,
    reduce_3x3: usize,
    out_3x3: usize,
    reduce_double: usize,
    out_double: usize,
    pool: PoolBranch,
}

impl BlockSpec {
    fn c_out(&self) -> usize {
        let pool = match self.pool {
            PoolBranch::AvgProject(c) | PoolBranch::MaxProject(c) => c,
            PoolBranch::MaxReduce => self.c_in,
        };
        self.one_by_one.unwrap_or(0) + self.out_3x3 + self.out_double + pool
    }

    fn reduces(&self) -> bool {
        matches!(self.pool, PoolBranch::MaxReduce)
    }
}

const fn block(
    name: &'static str,
    c_in: usize,
    one_by_one: Option<usize>,
    (reduce_3x3, out_3x3): (usize, usize),
    (reduce_double, out_double): (usize, usize),
    pool: PoolBranch,
) -> BlockSpec {
    BlockSpec {
        name,
        c_in,
        one_by_one,
        reduce_3x3,
        out_3x3,
        reduce_double,
        out_double,
        pool,
    }
}

/// The ten inception blocks of the port, in order.
const BLOCKS: [BlockSpec; 10] = [
    block(
        "3a",
        192,
        Some(64),
        (64, 64),
        (64, 96),
        PoolBranch::AvgProject(32),
    ),
    block(
        "3b",
        256,
        Some(64),
        (64, 96),
        (64, 96),
        PoolBranch::AvgProject(64),
    ),
    block("3c", 320, None, (128, 160), (64, 96), PoolBranch::MaxReduce),
    block(
        "4a",
        576,
        Some(224),
        (64, 96),
        (96, 128),
        PoolBranch::AvgProject(128),
    ),
    block(
        "4b",
        576,
        Some(192),
        (96, 128),
        (96, 128),
        PoolBranch::AvgProject(128),
    ),
    block(
        "4c",
        576,
        Some(160),
        (128, 160),
        (128, 160),
        PoolBranch::AvgProject(128),
    ),
    block(
        "4d",
        608,
        Some(96),
        (128, 192),
        (160, 192),
        PoolBranch::AvgProject(128),
    ),
    block(
        "4e",
        608,
        None,
        (128, 192),
        (192, 256),
        PoolBranch::MaxReduce,
    ),
    block(
        "5a",
        1056,
        Some(352),
        (192, 320),
        (160, 224),
        PoolBranch::AvgProject(128),
    ),
    block(
        "5b",
        1024,
        Some(352),
        (192, 320),
        (192, 224),
        PoolBranch::MaxProject(128),
    ),
];

/// 3x3 stride-2 ceil-mode max pooling (stem and reduction blocks).
const REDUCE_POOL: Pool2d = Pool2d {
    kernel: 3,
    stride: 2,
    padding: 0,
    ceil_mode: true,
};

/// 3x3 stride-1 padded pooling of the pool branches.
const SAME_POOL: Pool2d = Pool2d {
    kernel: 3,
    stride: 1,
    padding: 1,
    ceil_mode: true,
};

#[derive(Debug, Clone)]
struct InceptionBlock {
    spec: BlockSpec,
    one_by_one: Option<ConvBnRelu>,
    reduce_3x3: ConvBnRelu,
    conv_3x3: ConvBnRelu,
    reduce_double: ConvBnRelu,
    double_1: ConvBnRelu,
    double_2: ConvBnRelu,
    pool_proj: Option<ConvBnRelu>,
}

impl InceptionBlock {
    fn new(vb: &VarBuilder, spec: BlockSpec, cfg: &BnInceptionConfig) -> Result<Self> {
        let n = |suffix: &str| format!("inception_{}_{suffix}", spec.name);
        let stride = if spec.reduces() { 2 } else { 1 };
        let one_by_one = spec
            .one_by_one
            .map(|c| ConvBnRelu::new(vb, &n("1x1"), spec.c_in, c, 1, 1, 0, cfg))
            .transpose()?;
        let reduce_3x3 = ConvBnRelu::new(
            vb,
            &n("3x3_reduce"),
            spec.c_in,
            spec.reduce_3x3,
            1,
            1,
            0,
            cfg,
        )?;
        let conv_3x3 = ConvBnRelu::new(
            vb,
            &n("3x3"),
            spec.reduce_3x3,
            spec.out_3x3,
            3,
            stride,
            1,
            cfg,
        )?;
        let reduce_double = ConvBnRelu::new(
            vb,
            &n("double_3x3_reduce"),
            spec.c_in,
            spec.reduce_double,
            1,
            1,
            0,
            cfg,
        )?;
        let double_1 = ConvBnRelu::new(
            vb,
            &n("double_3x3_1"),
            spec.reduce_double,
            spec.out_double,
            3,
            1,
            1,
            cfg,
        )?;
        let double_2 = ConvBnRelu::new(
            vb,
            &n("double_3x3_2"),
            spec.out_double,
            spec.out_double,
            3,
            stride,
            1,
            cfg,
        )?;
        let pool_proj = match spec.pool {
            PoolBranch::AvgProject(c) | PoolBranch::MaxProject(c) => Some(ConvBnRelu::new(
                vb,
                &n("pool_proj"),
                spec.c_in,
                c,
                1,
                1,
                0,
                cfg,
            )?),
            PoolBranch::MaxReduce => None,
        };
        Ok(Self {
            spec,
            one_by_one,
            reduce_3x3,
            conv_3x3,
            reduce_double,
            double_1,
            double_2,
            pool_proj,
        })
    }

    fn forward<L: Layers>(&self, l: &mut L, x: &L::Act) -> candle_core::Result<L::Act> {
        let mut branches = Vec::with_capacity(4);
        if let Some(c) = &self.one_by_one {
            branches.push(c.forward(l, x)?);
        }
        let r = self.reduce_3x3.forward(l, x)?;
        branches.push(self.conv_3x3.forward(l, &r)?);
        let d = self.reduce_double.forward(l, x)?;
        let d = self.double_1.forward(l, &d)?;
        branches.push(self.double_2.forward(l, &d)?);
        let pooled = match self.spec.pool {
            PoolBranch::AvgProject(_) => l.avg_pool(x, &SAME_POOL, true)?,
            PoolBranch::MaxProject(_) => l.max_pool(x, &SAME_POOL)?,
            PoolBranch::MaxReduce => l.max_pool(x, &REDUCE_POOL)?,
        };
        branches.push(match &self.pool_proj {
            Some(p) => p.forward(l, &pooled)?,
            None => pooled,
        });
        l.cat(&branches)
    }
}

/// BN-Inception: a 7x7 stride-2 stem, two 3x3 stride-2 ceil-mode max pools and ten
/// inception blocks, ending in a `[N,1024,H/32,W/32]` feature map (7x7 at 224x224).
///
/// Parameter names are the port's (`conv1_7x7_s2.weight`,
/// `inception_3a_1x1_bn.running_mean`, ..., `last_linear.weight`), so
/// `bn_inception-52deb4733.pth` loads directly. Every batch norm is followed by a ReLU,
/// which is what the port computes (its forward passes some `*_bn_out` tensors on after
/// an in-place ReLU has rewritten them). Inputs follow the checkpoint's convention: BGR,
/// 0-255, minus the means `[104, 117, 128]` ([`Normalization::bn_inception_bgr`]).
#[derive(Debug, Clone)]
pub struct BnInception {
    conv1: ConvBnRelu,
    conv2_reduce: ConvBnRelu,
    conv2: ConvBnRelu,
    blocks: Vec<InceptionBlock>,
    last_linear: Option<Linear>,
    cfg: BnInceptionConfig,
}

/// Side of the final feature map for an input side `len`, or `None` where the
/// network's branches would disagree in size (odd sides entering blocks 3c and 4e).
pub fn feature_len(len: usize) -> Option<usize> {
    let conv_s2 = |l: usize| (l + 2 - 3) / 2 + 1;
    let stem = |l: usize| (l + 6).checked_sub(7).map(|v| v / 2 + 1);
    let mut l = stem(len)?;
    for _ in 0..2 {
        l = REDUCE_POOL.output_len(l).ok()?;
    }
    for _ in 0..2 {
        let pooled = REDUCE_POOL.output_len(l).ok()?;
        if conv_s2(l) != pooled {
            return None;
        }
        l = pooled;
    }
    Some(l)
}

/// An error for input sizes the network's branches disagree on.
fn check_input(x: &Tensor) -> candle_core::Result<()> {
    let (_, _, h, w) = x.dims4()?;
    if feature_len(h).is_none() || feature_len(w).is_none() {
        candle_core::bail!(
            "BN-Inception cannot take a {h}x{w} input: in its stride-2 blocks the \
                 convolution and ceil-mode pooling branches disagree in size (the PyTorch \
                 port fails alike); use e.g. 224, 227 or a multiple of 32"
        );
    }
    Ok(())
}

/// Channels of BN-Inception's final feature map.
pub const BN_INCEPTION_FEATURES: usize = 1024;

impl BnInception {
    /// Builds the network from `vb` (fresh parameters are initialised by `vb`'s hints:
    /// Kaiming-style convolutions, unit batch-norm scale, zero shift).
    pub fn new(vb: VarBuilder, cfg: &BnInceptionConfig) -> Result<Self> {
        if !(0.0..=1.0).contains(&cfg.bn_momentum) || cfg.bn_eps <= 0.0 {
            return Err(BackboneError::Config(format!(
                "batch-norm momentum must be in [0, 1] and eps positive, got {} and {}",
                cfg.bn_momentum, cfg.bn_eps
            )));
        }
        let conv1 = ConvBnRelu::new(&vb, "conv1_7x7_s2", 3, 64, 7, 2, 3, cfg)?;
        let conv2_reduce = ConvBnRelu::new(&vb, "conv2_3x3_reduce", 64, 64, 1, 1, 0, cfg)?;
        let conv2 = ConvBnRelu::new(&vb, "conv2_3x3", 64, 192, 3, 1, 1, cfg)?;
        let mut blocks = Vec::with_capacity(BLOCKS.len());
        let mut c = 192;
        for spec in BLOCKS {
            debug_assert_eq!(spec.c_in, c);
            blocks.push(InceptionBlock::new(&vb, spec, cfg)?);
            c = spec.c_out();
        }
        debug_assert_eq!(c, BN_INCEPTION_FEATURES);
        let last_linear = if cfg.num_classes > 0 {
            Some(candle_nn::linear(
                BN_INCEPTION_FEATURES,
                cfg.num_classes,
                vb.pp("last_linear"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            conv2_reduce,
            conv2,
            blocks,
            last_linear,
            cfg: cfg.clone(),
        })
    }

    /// Loads the network from a PyTorch checkpoint (`.pth`, `.pt`, `.bin`: a pickled
    /// state dict such as `bn_inception-52deb4733.pth`) or a `.safetensors` file, onto
    /// `device`, for inference or feature extraction. Batch-norm tensors stored as
    /// `[1, C]` (as in the public checkpoint) are accepted. A missing or mis-shaped
    /// tensor is an error naming it and the file.
    pub fn load(path: &Path, device: &Device, cfg: &BnInceptionConfig) -> Result<Self> {
        let tensors = read_weights(path)?;
        let expected = Self::parameter_shapes(cfg)?;
        let checked = select(path, &tensors, &expected, "BN-Inception")?;
        let checked = checked
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        Self::new(VarBuilder::from_tensors(checked, DType::F32, device), cfg)
    }

    /// Every parameter and buffer name with its shape, in construction order.
    pub fn parameter_shapes(cfg: &BnInceptionConfig) -> Result<Vec<(String, Vec<usize>)>> {
        let map = nofuss_tensor::SeededVarMap::new(0);
        Self::new(map.var_builder(DType::F32, &Device::Cpu), cfg)?;
        Ok(map
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.dims().to_vec()))
            .collect())
    }

    /// The `[N,1024]` globally average-pooled features (equal to the port's 7x7
    /// `global_pool` at 224x224, and defined at any input size).
    pub fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(Pooling::Average.apply(&self.forward_map(x, train)?)?)
    }

    /// ImageNet logits `[N, num_classes]`; an error when built without a classifier.
    pub fn forward_logits(&self, x: &Tensor) -> Result<Tensor> {
        let linear = self.last_linear.as_ref().ok_or_else(|| {
            BackboneError::Config("BN-Inception was built with num_classes = 0".into())
        })?;
        Ok(linear.forward(&self.forward_features(x, false)?)?)
    }

    /// The settings.
    pub fn config(&self) -> &BnInceptionConfig {
        &self.cfg
    }
}

impl BnInception {
    /// The network over `l`'s layers (candle's graph or a tape), after the input check.
    fn forward_layers<L: Layers>(&self, l: &mut L, x: &L::Act) -> candle_core::Result<L::Act> {
        let h = self.conv1.forward(l, x)?;
        let h = l.max_pool(&h, &REDUCE_POOL)?;
        let h = self.conv2_reduce.forward(l, &h)?;
        let h = self.conv2.forward(l, &h)?;
        let mut h = l.max_pool(&h, &REDUCE_POOL)?;
        for b in &self.blocks {
            h = b.forward(l, &h)?;
        }
        Ok(h)
    }
}

impl Backbone for BnInception {
    fn name(&self) -> &'static str {
        "bn-inception"
    }

    fn forward_map(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        check_input(x)?;
        let train = train && self.cfg.batch_norm == BatchNormMode::Train;
        self.forward_layers(&mut Graph { train }, x)
    }

    fn forward_tape(
        &self,
        tape: &mut Tape,
        x: &tape::Act,
    ) -> Option<candle_core::Result<tape::Act>> {
        tape.set_fixed_statistics(self.cfg.batch_norm == BatchNormMode::Frozen);
        Some(check_input(x.tensor()).and_then(|()| self.forward_layers(tape, x)))
    }

    fn out_channels(&self) -> usize {
        BN_INCEPTION_FEATURES
    }

    fn input(&self) -> InputSpec {
        InputSpec {
            channels: 3,
            size: 224,
            normalization: Normalization::bn_inception_bgr(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_plan_matches_the_port() {
        let outs: Vec<usize> = BLOCKS.iter().map(|b| b.c_out()).collect();
        assert_eq!(
            outs,
            vec![256, 320, 576, 576, 576, 608, 608, 1056, 1024, 1024]
        );
        for w in BLOCKS.windows(2) {
            assert_eq!(w[0].c_out(), w[1].c_in, "{} -> {}", w[0].name, w[1].name);
        }
    }

    #[test]
    fn parameter_names_and_count() {
        let shapes = BnInception::parameter_shapes(&BnInceptionConfig {
            num_classes: 1000,
            ..Default::default()
        })
        .unwrap();
        let get = |n: &str| shapes.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone());
        assert_eq!(get("conv1_7x7_s2.weight"), Some(vec![64, 3, 7, 7]));
        assert_eq!(
            get("inception_3c_double_3x3_2.weight"),
            Some(vec![96, 96, 3, 3])
        );
        assert_eq!(
            get("inception_5b_pool_proj_bn.running_var"),
            Some(vec![128])
        );
        assert_eq!(get("last_linear.weight"), Some(vec![1000, 1024]));
        assert_eq!(get("inception_3c_pool_proj.weight"), None);
        // The port: 69 convolutions (2 tensors each), 69 batch norms (4 each), classifier.
        assert_eq!(shapes.len(), 69 * 6 + 2);
        let learnable: usize = shapes
            .iter()
            .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // torch: sum(p.numel() for p in bninception().parameters())
        assert_eq!(learnable, 11_295_240);
    }

    #[test]
    fn small_input_shapes_and_frozen_bn() {
        let p = nofuss_tensor::SeededVarMap::new(1);
        let cfg = BnInceptionConfig {
            batch_norm: BatchNormMode::Frozen,
            ..Default::default()
        };
        let net = BnInception::new(p.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 64), &Device::Cpu).unwrap();
        let running = || {
            p.named_vars()
                .into_iter()
                .find(|(n, _)| n == "conv1_7x7_s2_bn.running_mean")
                .unwrap()
                .1
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap()
        };
        let before = running();
        let map = net.forward_map(&x, true).unwrap();
        assert_eq!(map.dims(), &[2, 1024, 1, 2]);
        assert_eq!(running(), before, "frozen BN must not update statistics");
        assert_eq!(net.forward_features(&x, true).unwrap().dims(), &[2, 1024]);
        assert!(net.forward_logits(&x).is_err());
        let odd = Tensor::zeros((1, 3, 32, 40), DType::F32, &Device::Cpu).unwrap();
        let e = net.forward_map(&odd, false).unwrap_err().to_string();
        assert!(e.contains("32x40"), "{e}");
    }

    #[test]
    fn feature_sides() {
        assert_eq!(feature_len(224), Some(7));
        assert_eq!(feature_len(227), Some(7));
        assert_eq!(feature_len(256), Some(8));
        assert_eq!(feature_len(32), Some(1));
        assert_eq!(feature_len(33), Some(1));
        assert_eq!(feature_len(40), None);
        assert_eq!(feature_len(2), None);
    }
}
