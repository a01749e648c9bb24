//! BN-Inception against the `pretrainedmodels` PyTorch port: features, logits,
//! training-mode batch statistics and gradients, from the fixture written by
//! `tests/reference/bn_inception.py` (weights generated from the same rule here).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use nofuss_backbone::{Backbone, BackboneError, BnInception, BnInceptionConfig, Pooling};
use nofuss_tensor::tape::Tape;
use serde_json::Value;

fn fixtures() -> PathBuf {
    nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR"))
}

fn device() -> Device {
    nofuss_tensor::test_device().unwrap()
}

fn fixture() -> Value {
    let text = std::fs::read_to_string(fixtures().join("bn_inception.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

/// The weight rule of `tests/reference/bn_inception.py:seeded`.
fn seeded(name: &str, shape: &[usize]) -> Tensor {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    let n: usize = shape.iter().product();
    let key = fnv1a64(name);
    let fan_in: usize = shape.iter().skip(1).product();
    let vals: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut z = key
                .wrapping_add(i.wrapping_mul(GOLDEN))
                .wrapping_add(GOLDEN);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let v = (z >> 11) as f64 * 2f64.powi(-53) * 2.0 - 1.0;
            let v = if name.ends_with("running_var") {
                1.0 + 0.5 * v
            } else if name.ends_with("running_mean") {
                0.2 * v
            } else if name.contains("_bn.") && name.ends_with(".weight") {
                1.0 + 0.25 * v
            } else if name.ends_with(".bias") {
                0.1 * v
            } else if name.ends_with(".weight") {
                v * (6.0 / fan_in as f64).sqrt()
            } else if name.starts_with("input") {
                64.0 * v
            } else {
                v
            };
            v as f32
        })
        .collect();
    Tensor::from_vec(vals, shape, &Device::Cpu).unwrap()
}

/// A network with the seeded weights, its variables kept for inspection.
/// [`seeded`] in f64 on the test device.
fn seeded_f64(name: &str, shape: &[usize]) -> Tensor {
    seeded(name, shape)
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&device())
        .unwrap()
}

fn seeded_net(cfg: &BnInceptionConfig, dtype: DType) -> (BnInception, VarMap) {
    let vars = VarMap::new();
    let dev = device();
    let net = BnInception::new(VarBuilder::from_varmap(&vars, dtype, &dev), cfg).unwrap();
    for (name, var) in vars.data().lock().unwrap().iter() {
        let t = seeded(name, var.dims())
            .to_dtype(dtype)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        var.set(&t).unwrap();
    }
    (net, vars)
}

fn var(vars: &VarMap, name: &str) -> Var {
    vars.data().lock().unwrap()[name].clone()
}

/// Max absolute error relative to the reference's largest magnitude.
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max abs error {err} > {tol} x scale {scale}"
    );
}

#[test]
fn eval_features_and_logits_match_the_port() {
    let fx = fixture();
    let cfg = BnInceptionConfig {
        num_classes: 1000,
        ..Default::default()
    };
    let (net, _vars) = seeded_net(&cfg, DType::F32);
    let x = seeded("input", &[2, 3, 224, 224])
        .to_device(&device())
        .unwrap();
    let feats = net.forward_features(&x, false).unwrap();
    assert_eq!(feats.dims(), &[2, 1024]);
    assert_eq!(net.forward_map(&x, false).unwrap().dims(), &[2, 1024, 7, 7]);
    // On CUDA the f32 convolutions use TF32 tensor cores (the default, as in PyTorch):
    // inputs rounded to 10 mantissa bits (2^-11 = 4.9e-4 relative) through 60 layers
    // measured 4.6e-4 x the largest feature on an H100, so 2e-3 there. The exact f32
    // arithmetic of the CUDA convolutions is checked at 1e-4 in nofuss-tensor's
    // ops_parity with TF32 off.
    let tol = if device().is_cuda() { 2e-3 } else { 1e-4 };
    assert_close(
        &values(&feats),
        &floats(&fx["eval"]["features"]),
        tol,
        "features",
    );
    let logits = net.forward_logits(&x).unwrap();
    assert_close(
        &values(&logits),
        &floats(&fx["eval"]["logits"]),
        tol,
        "logits",
    );
}

/// Checks a training-mode pass of the seeded network (`seeded_net`, f64) on
/// `input_small` against the port: the pooled features `feats`, the running statistics
/// it left, and the gradients of `Σ feats ⊙ grad_weights` that `backward` makes of that
/// loss (the convolution biases get none: the batch norms' statistics cancel them, so
/// their exact gradient is zero, where PyTorch's is rounding noise).
fn check_train_pass(
    vars: &VarMap,
    feats: &Tensor,
    backward: impl FnOnce(&Tensor) -> GradStore,
    what: &str,
) {
    let fx = fixture();
    let train = &fx["train"];
    let features = format!("{what}: train features");
    assert_close(&values(feats), &floats(&train["features"]), 1e-9, &features);
    for stat in ["running_mean", "running_var"] {
        for (layer, want) in train[stat].as_object().unwrap() {
            let v = var(vars, &format!("{layer}.{stat}"));
            let name = format!("{what}: {layer}.{stat}");
            assert_close(&values(v.as_tensor()), &floats(want), 1e-9, &name);
        }
    }
    let r = seeded_f64("grad_weights", &[2, 1024]);
    let grads = backward(&(feats * r).unwrap().sum_all().unwrap());
    for (name, want) in train["grads"].as_object().unwrap() {
        let g = grads.get(var(vars, name).as_tensor()).unwrap();
        assert_close(
            &values(g),
            &floats(want),
            1e-9,
            &format!("{what}: grad {name}"),
        );
    }
    assert!(grads.get(var(vars, "conv2_3x3.bias").as_tensor()).is_none());
}

#[test]
fn train_mode_statistics_and_gradients_match_the_port() {
    // Float64 on both sides (see the reference script: this case is ill-conditioned).
    let (net, vars) = seeded_net(&BnInceptionConfig::default(), DType::F64);
    let x = seeded_f64("input_small", &[2, 3, 64, 64]);
    let feats = net.forward_features(&x, true).unwrap();
    check_train_pass(&vars, &feats, |loss| loss.backward().unwrap(), "graph");
}

/// The same case with the network on nofuss's tape, as the trainer runs it: the
/// features' gradient comes from candle's graph above a leaf, the rest from the tape, and
/// on a GPU candle's layout uploads are cached (`with_cached_layouts`; the graph case
/// above runs without).
#[test]
fn train_mode_on_the_tape_matches_the_port() {
    use nofuss_tensor::with_cached_layouts as cached;
    let (net, vars) = seeded_net(&BnInceptionConfig::default(), DType::F64);
    let x = seeded_f64("input_small", &[2, 3, 64, 64]);
    let dev = x.device().clone();
    let mut tape = Tape::new();
    let input = tape.input(&x);
    let (map, leaf, feats) = cached(&dev, || {
        let map = net.forward_tape(&mut tape, &input).unwrap().unwrap();
        let leaf = Var::from_tensor(map.tensor()).unwrap();
        let feats = Pooling::Average.apply(leaf.as_tensor()).unwrap();
        (map, leaf, feats)
    });
    let backward = |loss: &Tensor| {
        cached(&dev, || {
            let mut grads = loss.backward().unwrap();
            let g = grads.remove(leaf.as_tensor()).unwrap();
            tape.backward_into(&map, &g, &mut grads).unwrap();
            grads
        })
    };
    check_train_pass(&vars, &feats, backward, "tape");
}

#[test]
fn pytorch_pickle_loads_and_missing_tensors_are_named() {
    let pth = fixtures().join("bn_inception_stem.pth");
    let tensors = nofuss_backbone::weights::read_weights(&pth).unwrap();
    // Batch-norm vectors are stored [1, 64], as in the public checkpoint.
    assert_eq!(tensors["conv1_7x7_s2_bn.running_var"].dims(), &[1, 64]);
    let w = tensors["conv1_7x7_s2.weight"].flatten_all().unwrap();
    let want = seeded("conv1_7x7_s2.weight", &[64, 3, 7, 7]);
    assert_eq!(
        w.to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let err = BnInception::load(&pth, &Device::Cpu, &BnInceptionConfig::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BackboneError::Weights { .. }), "{msg}");
    assert!(msg.contains("bn_inception_stem.pth"), "{msg}");
    assert!(
        msg.contains("missing 408 of 414 tensors of BN-Inception"),
        "{msg}"
    );
    assert!(msg.contains("`conv2_3x3.bias`"), "{msg}");
}

#[test]
fn safetensors_round_trip_and_shape_errors() {
    let cfg = BnInceptionConfig::default();
    let (net, vars) = seeded_net(&cfg, DType::F32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    // Store batch-norm vectors as [1, C] to exercise the squeeze on load.
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (n, v) in vars.data().lock().unwrap().iter() {
        let t = v.as_tensor().to_device(&Device::Cpu).unwrap();
        let t = if n.contains("_bn.") {
            t.unsqueeze(0).unwrap()
        } else {
            t
        };
        map.insert(n.clone(), t);
    }
    candle_core::safetensors::save(&map, &path).unwrap();
    let loaded = BnInception::load(&path, &device(), &cfg).unwrap();
    let x = seeded("input", &[1, 3, 64, 64])
        .to_device(&device())
        .unwrap();
    let a = net.forward_features(&x, false).unwrap();
    let b = loaded.forward_features(&x, false).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    map.insert(
        "inception_4a_1x1.weight".into(),
        Tensor::zeros((224, 576, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, &path).unwrap();
    let msg = BnInception::load(&path, &Device::Cpu, &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`inception_4a_1x1.weight` has shape [224, 576, 3, 3]"),
        "{msg}"
    );
}
