use std::fmt;
use std::str::FromStr;

use candle_core::DType;

use crate::{Error, Result};

/// The dtype policy of a run: parameters, losses and proxies stay in f32 (the
/// "master" precision); only the backbone's activations may run in bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Backbone compute in bf16, parameters, loss and proxies in f32.
    Bf16,
}

impl Precision {
    /// Dtype in which parameters (and optimizer state) are stored.
    pub fn param_dtype(self) -> DType {
        DType::F32
    }

    /// Dtype in which the backbone computes.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    /// Dtype of embeddings, proxies and the loss: always f32, so that the
    /// log-sum-exp of the proxy losses is computed at full precision.
    pub fn loss_dtype(self) -> DType {
        DType::F32
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(Error::BadPrecision(s.to_string())),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        assert_eq!(
            "bf16".parse::<Precision>().unwrap().compute_dtype(),
            DType::BF16
        );
        assert_eq!(Precision::Bf16.param_dtype(), DType::F32);
        assert_eq!(Precision::Bf16.loss_dtype(), DType::F32);
        assert_eq!(Precision::F32.compute_dtype(), DType::F32);
        assert!("f16".parse::<Precision>().is_err());
        assert_eq!(Precision::Bf16.to_string(), "bf16");
    }
}
