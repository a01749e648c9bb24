//! Reading weight files: PyTorch pickles and safetensors, by extension.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};

use crate::{BackboneError, Result};

/// Reads every tensor of a weight file into a map by name.
///
/// `.safetensors` files are read with candle's safetensors reader; `.pth`, `.pt` and
/// `.bin` files as PyTorch pickles (`torch.save` of a state dict, or of a dict holding
/// one under `state_dict` or `model`). Errors name the file.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let err = |message: String| BackboneError::Weights {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(err("no such file".into()));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "safetensors" => candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .map_err(|e| err(format!("not a readable safetensors file: {e}"))),
        "pth" | "pt" | "bin" | "ckpt" => {
            let read = |key: Option<&str>| {
                candle_core::pickle::read_all_with_key(path, key)
                    .map_err(|e| err(format!("not a readable PyTorch checkpoint: {e}")))
            };
            let mut tensors = read(None)?;
            for key in ["state_dict", "model"] {
                if tensors.is_empty() {
                    tensors = read(Some(key)).unwrap_or_default();
                }
            }
            if tensors.is_empty() {
                return Err(err("the checkpoint holds no tensors".into()));
            }
            Ok(tensors.into_iter().collect())
        }
        _ => Err(err(format!(
            "unknown weight format '.{ext}': expected .safetensors or .pth/.pt/.bin"
        ))),
    }
}

/// Picks the `expected` tensors (name, shape) out of `tensors` read from `path`, each
/// reshaped to its expected shape (see [`squeeze_to`]). Extra tensors are ignored. A
/// missing or mis-shaped tensor is a [`BackboneError::Weights`] naming it and the file;
/// `model` names the network in the message.
pub fn select(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    expected: &[(String, Vec<usize>)],
    model: &str,
) -> Result<HashMap<String, Tensor>> {
    let err = |message: String| BackboneError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let mut missing: Vec<&str> = expected
        .iter()
        .filter(|(n, _)| !tensors.contains_key(n))
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        missing.sort_unstable();
        let shown: Vec<String> = missing.iter().take(5).map(|n| format!("`{n}`")).collect();
        return Err(err(format!(
            "missing {} of {} tensors of {model}, e.g. {}",
            missing.len(),
            expected.len(),
            shown.join(", ")
        )));
    }
    expected
        .iter()
        .map(|(name, shape)| {
            let t = &tensors[name];
            let t = squeeze_to(t, shape).ok_or_else(|| {
                err(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                ))
            })?;
            Ok((name.clone(), t))
        })
        .collect()
}

/// Loads a weight file into existing variables: each `(name, var)` whose name starts
/// with `prefix` takes the file's tensor of the same name, with or without the prefix
/// (so both backbone-only files and whole nofuss checkpoints work), converted to the
/// variable's dtype and device. Returns how many variables were set.
pub fn load_into(path: &Path, vars: &[(String, Var)], prefix: &str, model: &str) -> Result<usize> {
    // Names with the prefix (a nofuss checkpoint) or without (a backbone-only file).
    let mut tensors = HashMap::new();
    let mut prefixed = HashMap::new();
    for (name, t) in read_weights(path)? {
        match name.strip_prefix(prefix) {
            Some(short) if !prefix.is_empty() => prefixed.insert(short.to_string(), t),
            _ => tensors.insert(name, t),
        };
    }
    tensors.extend(prefixed);
    let targets: Vec<(&Var, String, Vec<usize>)> = vars
        .iter()
        .filter_map(|(n, v)| {
            n.strip_prefix(prefix)
                .map(|short| (v, short.to_string(), v.dims().to_vec()))
        })
        .collect();
    let expected: Vec<(String, Vec<usize>)> = targets
        .iter()
        .map(|(_, n, s)| (n.clone(), s.clone()))
        .collect();
    let picked = select(path, &tensors, &expected, model)?;
    for (var, name, _) in &targets {
        let t = picked[name]
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        var.set(&t)?;
    }
    Ok(targets.len())
}

/// `t` with shape `want`, if it has that shape up to leading or trailing dimensions
/// of size one (the public BN-Inception checkpoint stores batch-norm vectors as `[1, C]`).
pub fn squeeze_to(t: &Tensor, want: &[usize]) -> Option<Tensor> {
    let core = |s: &[usize]| -> Vec<usize> { s.iter().copied().filter(|&d| d != 1).collect() };
    if t.dims() == want {
        return Some(t.clone());
    }
    if core(t.dims()) == core(want) && t.elem_count() == want.iter().product::<usize>() {
        return t.reshape(want).ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn squeeze_accepts_unit_dims_only() {
        let t = Tensor::zeros((1, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(squeeze_to(&t, &[5]).unwrap().dims(), &[5]);
        assert!(squeeze_to(&t, &[6]).is_none());
        let w = Tensor::zeros((4, 3, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(squeeze_to(&w, &[3, 4, 1, 1]).is_none());
        assert_eq!(squeeze_to(&w, &[4, 3, 1, 1]).unwrap().dims(), &[4, 3, 1, 1]);
    }

    #[test]
    fn load_into_takes_prefixed_or_bare_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = Var::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Var::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        let head = Var::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let vars = vec![
            ("backbone.a".to_string(), a.clone()),
            ("backbone.b".to_string(), b.clone()),
            ("head.w".to_string(), head.clone()),
        ];
        let ones = |shape: &[usize]| Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu);
        let mut file = HashMap::new();
        file.insert("backbone.a".to_string(), ones(&[2, 3]).unwrap());
        file.insert("b".to_string(), ones(&[1, 4]).unwrap());
        file.insert("unrelated".to_string(), ones(&[7]).unwrap());
        let p = dir.path().join("w.safetensors");
        candle_core::safetensors::save(&file, &p).unwrap();
        assert_eq!(load_into(&p, &vars, "backbone.", "test").unwrap(), 2);
        assert_eq!(
            a.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            6.0
        );
        assert_eq!(
            b.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            4.0
        );
        assert_eq!(
            head.as_tensor()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        file.remove("b");
        candle_core::safetensors::save(&file, &p).unwrap();
        let e = load_into(&p, &vars, "backbone.", "test")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing 1 of 2 tensors of test, e.g. `b`"),
            "{e}"
        );
    }

    #[test]
    fn unreadable_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.pth");
        std::fs::write(&p, b"not a pickle").unwrap();
        let e = read_weights(&p).unwrap_err().to_string();
        assert!(e.contains("w.pth"), "{e}");
        let p = dir.path().join("w.onnx");
        std::fs::write(&p, b"x").unwrap();
        assert!(read_weights(&p).unwrap_err().to_string().contains(".onnx"));
        assert!(read_weights(&dir.path().join("missing.safetensors"))
            .unwrap_err()
            .to_string()
            .contains("no such file"));
    }
}
