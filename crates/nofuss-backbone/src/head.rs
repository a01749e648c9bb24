use candle_core::{Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};
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
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            dim: 64,
            pooling: Pooling::Average,
            l2_normalize: true,
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
        let linear = candle_nn::linear(in_features, cfg.dim, vb.pp("embedding"))?;
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
