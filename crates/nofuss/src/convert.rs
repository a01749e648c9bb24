//! `nofuss convert-weights`: PyTorch checkpoints to safetensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::run_dir::write_atomic_with;
use crate::{Result, TrainError};

/// Reads every tensor of `input` (a `.pth`/`.pt`/`.bin` pickle, or `.safetensors`) and
/// writes them, names unchanged, to the safetensors file `output` (atomically).
/// Returns the number of tensors.
pub fn convert_weights(input: &Path, output: &Path) -> Result<usize> {
    let tensors = nofuss_backbone::weights::read_weights(input)?;
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let n = tensors.len();
    write_atomic_with(output, |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(|e| TrainError::Input {
            path: output.to_path_buf(),
            message: format!("cannot write safetensors: {e}"),
        })
    })?;
    Ok(n)
}
