use candle_core::{Tensor, D};
use candle_nn::{Init, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{BackboneError, Result};

/// Global pooling of a `[N,C,H,W]` feature map to `[N,C]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// Mean over space.
    #[default]
    Average,
    /// Max over space.
    Max,
    /// Mean plus max (as in several Proxy-Anchor / ProxyNCA++ reproductions).
    AverageMax,
}

impl Pooling {
    /// Pools `[N,C,H,W]` to `[N,C]`.
    pub fn apply(self, map: &Tensor) -> candle_core::Result<Tensor> {
        let flat = map.flatten_from(2)?;
        match self {
            Self::Average => flat.mean(D::Minus1),
            Self::Max => flat.max(D::Minus1),
            Self::AverageMax => flat.mean(D::Minus1)? + flat.max(D::Minus1)?,
        }
    }
}

/// How the embedding layer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadInit {
    /// PyTorch's `nn.Linear` default, which the Proxy-NCA reproductions keep: weight and
    /// bias uniform in `±1/sqrt(in_features)`.
    #[default]
    TorchLinear,
    /// The Proxy-Anchor repository's: weight `kaiming_normal_(mode='fan_out')`, i.e.
    /// normal with standard deviation `sqrt(2 / D)`, bias 0.
    KaimingFanOut,
}

/// Settings of the [`EmbeddingHead`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    /// Embedding dimension `D` (64 in the paper).
    pub dim: usize,
    /// Global pooling.
    pub pooling: Pooling,
    /// L2-normalise the embeddings (the proxy losses normalise anyway; retrieval
    /// with normalised embeddings ranks by cosine).
    pub l2_normalize: bool,
    /// Initialisation of the linear layer.
    pub init: HeadInit,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            dim: 64,
            pooling: Pooling::Average,
            l2_normalize: true,
            init: HeadInit::TorchLinear,
        }
    }
}

/// Global pooling, a linear layer to `D` dimensions (`embedding.weight`,
/// `embedding.bias`) and optional L2 normalisation.
#[derive(Debug, Clone)]
pub struct EmbeddingHead {
    linear: Linear,
    cfg: HeadConfig,
}

impl EmbeddingHead {
    /// A head on `in_features` channels.
    pub fn new(in_features: usize, cfg: &HeadConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.dim == 0 || in_features == 0 {
            return Err(BackboneError::Config(format!(
                "embedding head {in_features} -> {} is empty",
                cfg.dim
            )));
        }
        let vb = vb.pp("embedding");
        let bound = 1.0 / (in_features as f64).sqrt();
        let (w_init, b_init) = match cfg.init {
            HeadInit::TorchLinear => (
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
            HeadInit::KaimingFanOut => (
                Init::Randn {
                    mean: 0.0,
                    stdev: (2.0 / cfg.dim as f64).sqrt(),
                },
                Init::Const(0.0),
            ),
        };
        let weight = vb.get_with_hints((cfg.dim, in_features), "weight", w_init)?;
        let bias = vb.get_with_hints(cfg.dim, "bias", b_init)?;
        let linear = Linear::new(weight, Some(bias));
        Ok(Self {
            linear,
            cfg: cfg.clone(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// Feature map `[N,C,H,W]` to embeddings `[N,D]`.
    pub fn forward(&self, map: &Tensor) -> Result<Tensor> {
        let pooled = self.cfg.pooling.apply(map)?;
        let e = self.linear.forward(&pooled)?;
        if self.cfg.l2_normalize {
            Ok(nofuss_tensor::ops::l2_normalize_rows(&e)?)
        } else {
            Ok(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn pooling_by_hand() {
        let m = Tensor::new(&[[[[1f32, 2.0], [3.0, 6.0]]]], &Device::Cpu).unwrap();
        assert_eq!(
            Pooling::Average
                .apply(&m)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            vec![vec![3.0]]
        );
        assert_eq!(
            Pooling::Max.apply(&m).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![6.0]]
        );
        assert_eq!(
            Pooling::AverageMax
                .apply(&m)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            vec![vec![9.0]]
        );
    }

    #[test]
    fn embeddings_have_unit_norm_and_dim() {
        let p = nofuss_tensor::SeededVarMap::new(0);
        let vb = p.var_builder(DType::F32, &Device::Cpu);
        let h = EmbeddingHead::new(
            8,
            &HeadConfig {
                dim: 5,
                ..Default::default()
            },
            vb,
        )
        .unwrap();
        let m = Tensor::randn(0f32, 1.0, (3, 8, 2, 2), &Device::Cpu).unwrap();
        let e = h.forward(&m).unwrap();
        assert_eq!(e.dims(), &[3, 5]);
        for n in e.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap() {
            assert!((n - 1.0).abs() < 1e-5);
        }
        let names: Vec<String> = p.named_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["embedding.bias", "embedding.weight"]);
    }

    #[test]
    fn initialisations_follow_the_reference_repositories() {
        let stats = |init| {
            let p = nofuss_tensor::SeededVarMap::new(0);
            let vb = p.var_builder(DType::F32, &Device::Cpu);
            let cfg = HeadConfig {
                dim: 64,
                init,
                ..Default::default()
            };
            EmbeddingHead::new(1024, &cfg, vb).unwrap();
            let get = |n: &str| {
                p.named_vars()
                    .into_iter()
                    .find(|(k, _)| k == n)
                    .unwrap()
                    .1
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            (get("embedding.weight"), get("embedding.bias"))
        };
        let (w, b) = stats(HeadInit::TorchLinear);
        let bound = 1.0 / 32.0;
        assert!(w.iter().chain(&b).all(|v| v.abs() <= bound));
        assert!(w.iter().any(|v| v.abs() > 0.9 * bound));
        let (w, b) = stats(HeadInit::KaimingFanOut);
        let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        assert!((var - 2.0 / 64.0).abs() < 0.002, "{var}");
        assert!(b.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn empty_head_is_an_error() {
        let p = nofuss_tensor::SeededVarMap::new(0);
        let vb = p.var_builder(DType::F32, &Device::Cpu);
        assert!(EmbeddingHead::new(
            8,
            &HeadConfig {
                dim: 0,
                ..Default::default()
            },
            vb
        )
        .is_err());
    }
}
