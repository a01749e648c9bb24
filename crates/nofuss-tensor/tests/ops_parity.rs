//! The custom operations (cuDNN/candle convolution, pooling, fused batch norm) against
//! PyTorch, forward and backward: `tests/reference/tensor_ops.py` wrote the fixture.
//! Runs on `NOFUSS_TEST_DEVICE` (the CPU by default; `cuda` on a GPU machine). Also the
//! kNN row selection, the fused row normalisation and squared distances and the 8-bit
//! pixel normalisation, on that device against the CPU, and uploads through the staging
//! buffers.
//!
//! Tolerances, relative to the largest reference value of each tensor: 1e-9 in f64,
//! 1e-4 in f32 (TF32 is switched off for this test), 4e-2 in bf16 (pooling and batch
//! norm everywhere, convolution on CUDA only: candle's CPU matmul has no bf16).

use candle_core::{DType, Device, Tensor, Var};
use nofuss_tensor::batch_norm::{batch_norm_fixed, batch_norm_train};
use nofuss_tensor::conv::{conv2d, set_algo_search, set_tf32, AlgoSearch};
use nofuss_tensor::pool::{avg_pool2d, max_pool2d, Pool2d};
use serde_json::Value;

fn fixture() -> Value {
    let path = nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("tensor_ops.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tests/reference/tensor_ops.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("fixture parses")
}

fn nums(c: &Value, key: &str) -> Vec<f64> {
    c[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing"))
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

fn shape(c: &Value, key: &str) -> Vec<usize> {
    c[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

fn tensor(c: &Value, key: &str, shape: &[usize], dt: DType, dev: &Device) -> Tensor {
    Tensor::from_vec(nums(c, key), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

fn var(c: &Value, key: &str, shape: &[usize], dt: DType, dev: &Device) -> Var {
    Var::from_tensor(&tensor(c, key, shape, dt, dev)).unwrap()
}

fn check(got: &Tensor, c: &Value, key: &str, tol: f64) {
    let want = nums(c, key);
    let got: Vec<f64> = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let name = c["name"].as_str().unwrap();
    assert_eq!(got.len(), want.len(), "{name}: {key} length");
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{name}: {key}[{i}] = {a}, PyTorch {b} (tolerance {tol} x {scale})"
        );
    }
}

/// Runs one case in `dt`; `grads: false` checks the forward pass only.
fn run_case(c: &Value, dt: DType, dev: &Device, tol: f64, grads: bool) {
    let op = c["op"].as_str().unwrap();
    let xs = shape(c, "x_shape");
    let x = var(c, "x", &xs, dt, dev);
    match op {
        "conv2d" => {
            let ws = shape(c, "w_shape");
            let w = var(c, "w", &ws, dt, dev);
            let b = c.get("b").map(|_| var(c, "b", &[ws[0]], dt, dev));
            let cfg = candle_nn::Conv2dConfig {
                padding: c["padding"].as_u64().unwrap() as usize,
                stride: c["stride"].as_u64().unwrap() as usize,
                dilation: 1,
                groups: c["groups"].as_u64().unwrap() as usize,
                cudnn_fwd_algo: None,
            };
            let y = conv2d(
                x.as_tensor(),
                w.as_tensor(),
                b.as_ref().map(|b| b.as_tensor()),
                &cfg,
            )
            .unwrap();
            check(&y, c, "y", tol);
            let r = tensor(c, "r", y.dims(), dt, dev);
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            check(g.get(x.as_tensor()).unwrap(), c, "dx", tol);
            check(g.get(w.as_tensor()).unwrap(), c, "dw", tol);
            if let Some(b) = &b {
                check(g.get(b.as_tensor()).unwrap(), c, "db", tol);
            }
        }
        "max_pool2d" | "avg_pool2d" => {
            let p = Pool2d {
                kernel: c["kernel"].as_u64().unwrap() as usize,
                stride: c["stride"].as_u64().unwrap() as usize,
                padding: c["padding"].as_u64().unwrap() as usize,
                ceil_mode: c["ceil_mode"].as_bool().unwrap(),
            };
            let y = if op == "max_pool2d" {
                max_pool2d(x.as_tensor(), &p).unwrap()
            } else {
                avg_pool2d(x.as_tensor(), &p, c["count_include_pad"].as_bool().unwrap()).unwrap()
            };
            assert_eq!(y.dims(), shape(c, "y_shape").as_slice());
            check(&y, c, "y", tol);
            let r = tensor(c, "r", y.dims(), dt, dev);
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            check(g.get(x.as_tensor()).unwrap(), c, "dx", tol);
        }
        "batch_norm" => {
            let ch = xs[1];
            // Scale and shift are f32 master parameters (f64 with f64 input).
            let pdt = if dt == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let gamma = var(c, "gamma", &[ch], pdt, dev);
            let beta = var(c, "beta", &[ch], pdt, dev);
            let relu = c["relu"].as_bool().unwrap();
            let eps = c["eps"].as_f64().unwrap();
            let y = if c["train"].as_bool().unwrap() {
                let out = batch_norm_train(
                    x.as_tensor(),
                    gamma.as_tensor(),
                    beta.as_tensor(),
                    eps,
                    relu,
                )
                .unwrap();
                // PyTorch's running-statistics update, from the returned batch statistics.
                let m = c["momentum"].as_f64().unwrap();
                let count = (xs[0] * xs[2] * xs[3]) as f64;
                let rm = tensor(c, "running_mean", &[ch], pdt, dev);
                let rv = tensor(c, "running_var", &[ch], pdt, dev);
                let new_rm = ((rm * (1.0 - m)).unwrap() + (&out.mean * m).unwrap()).unwrap();
                let unbiased = (&out.var * (count / (count - 1.0))).unwrap();
                let new_rv = ((rv * (1.0 - m)).unwrap() + (unbiased * m).unwrap()).unwrap();
                check(&new_rm, c, "new_running_mean", tol);
                check(&new_rv, c, "new_running_var", tol);
                out.y
            } else {
                let rm = tensor(c, "running_mean", &[ch], pdt, dev);
                let rv = tensor(c, "running_var", &[ch], pdt, dev);
                batch_norm_fixed(
                    x.as_tensor(),
                    gamma.as_tensor(),
                    beta.as_tensor(),
                    &rm,
                    &rv,
                    eps,
                    relu,
                )
                .unwrap()
            };
            assert_eq!(y.dtype(), dt);
            check(&y, c, "y", tol);
            if !grads {
                return;
            }
            let r = tensor(c, "r", y.dims(), dt, dev);
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            check(g.get(x.as_tensor()).unwrap(), c, "dx", tol);
            check(g.get(gamma.as_tensor()).unwrap(), c, "dgamma", tol);
            check(g.get(beta.as_tensor()).unwrap(), c, "dbeta", tol);
        }
        other => panic!("unknown op {other}"),
    }
}

#[test]
fn custom_ops_match_pytorch_in_f64_and_f32() {
    set_tf32(false);
    let dev = nofuss_tensor::test_device().unwrap();
    let f = fixture();
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for c in cases {
        run_case(c, DType::F64, &dev, 1e-9, true);
        run_case(c, DType::F32, &dev, 1e-4, true);
    }
    // The convolutions again with cuDNN's algorithms chosen by timing (on the CPU the
    // same path twice).
    set_algo_search(AlgoSearch::Benchmark);
    for c in cases.iter().filter(|c| c["op"] == "conv2d") {
        run_case(c, DType::F64, &dev, 1e-9, true);
        run_case(c, DType::F32, &dev, 1e-4, true);
    }
    set_algo_search(AlgoSearch::Heuristic);
}

#[test]
fn bf16_stays_close_to_pytorch() {
    let dev = nofuss_tensor::test_device().unwrap();
    let f = fixture();
    for c in f["cases"].as_array().unwrap() {
        if c["op"] == "conv2d" && dev.is_cpu() {
            continue;
        }
        // Batch norm's input gradient subtracts two bf16-rounded means from the output
        // gradient, cancelling most digits: its forward pass is the bf16 check.
        let grads = c["op"] != "batch_norm";
        run_case(c, DType::BF16, &dev, 4e-2, grads);
    }
}

/// The kNN row selection on the test device against its CPU twin (whose order is checked
/// against a full sort in the crate's unit tests and against `torch.sort` on the host):
/// a SOP-like block (a query block that is not the first, so the skipped column is
/// offset), ties, NaN, and the largest K.
#[test]
fn row_selection_matches_the_cpu() {
    use nofuss_tensor::select::{smallest_k, MAX_K};
    let dev = nofuss_tensor::test_device().unwrap();
    for (rows, cols, k, skip) in [
        (37usize, 6000usize, 1000usize, Some(100usize)),
        (5, 300, 1, Some(0)),
        (3, MAX_K + 3, MAX_K, None),
    ] {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| match i % 97 {
                13 => f32::NAN,
                _ => ((i * 7919 % 4099) as f32 / 16.0).round() / 4.0,
            })
            .collect();
        let cpu = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        let (cv, ci) = smallest_k(&cpu, k, skip).unwrap();
        let (dv, di) = smallest_k(&cpu.to_device(&dev).unwrap(), k, skip).unwrap();
        assert_eq!(
            di.to_device(&Device::Cpu)
                .unwrap()
                .to_vec2::<u32>()
                .unwrap(),
            ci.to_vec2::<u32>().unwrap(),
            "{rows}x{cols} k {k}: columns"
        );
        let same = host_f32(&dv)
            .iter()
            .zip(host_f32(&cv))
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{rows}x{cols} k {k}: values");
    }
}

/// 8-bit pixels normalised on the test device give the host's f32 values to the bit.
#[test]
fn byte_normalisation_matches_the_host() {
    let dev = nofuss_tensor::test_device().unwrap();
    let norm = nofuss_tensor::Normalization::bn_inception_bgr();
    let bytes: Vec<u8> = (0..4 * 3 * 5 * 5).map(|i| (i * 53 % 256) as u8).collect();
    let t = Tensor::from_vec(bytes.clone(), (4, 3, 5, 5), &dev).unwrap();
    let got = host_f32(&norm.normalize_bytes(&t).unwrap());
    let coef = norm.coefficients();
    for (i, (&b, g)) in bytes.iter().zip(&got).enumerate() {
        let (mul, add) = coef[(i / 25) % 3];
        assert_eq!(g.to_bits(), (b as f32 * mul + add).to_bits(), "{i}");
    }
}

/// Uploads through the staging buffers arrive intact: more uploads than buffers, of
/// growing sizes and three types, queued (on a GPU) behind long work, so each buffer
/// is written again while earlier transfers still wait their turn in the stream.
#[test]
fn staged_uploads_arrive_intact() {
    let dev = nofuss_tensor::test_device().unwrap();
    let busy = if dev.is_cuda() {
        let m = Tensor::ones((4096, 4096), DType::F32, &dev).unwrap();
        Some((0..8).try_fold(m.clone(), |a, _| a.matmul(&m)).unwrap())
    } else {
        None
    };
    let mut up = nofuss_tensor::upload::Uploader::default();
    let bytes: Vec<Vec<u8>> = (0..9)
        .map(|k| {
            (0..1000 + k * 70_000)
                .map(|i| ((i * 7 + k * 13) % 251) as u8)
                .collect()
        })
        .collect();
    let words: Vec<u32> = (0..5000u32)
        .map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(i))
        .collect();
    let floats: Vec<f32> = (0..3000).map(|i| i as f32 * 0.25 - 100.0).collect();
    let mut sent = Vec::new();
    for (k, b) in bytes.iter().enumerate() {
        sent.push(up.upload(b, b.len(), &dev).unwrap());
        if k % 3 == 0 {
            sent.push(up.upload(&words, (50, 100), &dev).unwrap());
            sent.push(up.upload(&floats, 3000, &dev).unwrap());
        }
    }
    drop(busy);
    let mut i = 0;
    for (k, b) in bytes.iter().enumerate() {
        assert_eq!(&sent[i].to_vec1::<u8>().unwrap(), b, "bytes {k}");
        i += 1;
        if k % 3 == 0 {
            let w = sent[i].flatten_all().unwrap().to_vec1::<u32>().unwrap();
            assert_eq!(w, words, "words after {k}");
            assert_eq!(
                sent[i + 1].to_vec1::<f32>().unwrap(),
                floats,
                "floats after {k}"
            );
            i += 2;
        }
    }
}

/// A tensor's values on the host, flattened, as f32.
fn host_f32(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// The fused scaled row normalisation on the test device against the CPU, forward and
/// backward (the CPU op is checked against candle's composite and PyTorch's F.normalize).
#[test]
fn row_normalisation_matches_the_cpu() {
    use nofuss_tensor::ops::scaled_l2_normalize_rows;
    let dev = nofuss_tensor::test_device().unwrap();
    let (n, d) = (300usize, 64usize);
    let mut v: Vec<f32> = (0..n * d)
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
        .collect();
    v[d..2 * d].iter_mut().for_each(|x| *x = 0.0);
    let g: Vec<f32> = (0..n * d)
        .map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0)
        .collect();
    let run = |dev: &Device| {
        let x = Var::from_vec(v.clone(), (n, d), dev).unwrap();
        let y = scaled_l2_normalize_rows(x.as_tensor(), 3.0).unwrap();
        let gt = Tensor::from_vec(g.clone(), (n, d), dev).unwrap();
        let grads = (&y * gt).unwrap().sum_all().unwrap().backward().unwrap();
        (host_f32(&y), host_f32(grads.get(x.as_tensor()).unwrap()))
    };
    let (cy, cg) = run(&Device::Cpu);
    let (dy, dg) = run(&dev);
    for (what, a, b) in [("y", &dy, &cy), ("dx", &dg, &cg)] {
        assert_near(what, a, b, 1e-5);
    }
}

/// `got` element by element within `tol` of `want`, relative to each value's magnitude
/// (absolute below 1).
fn assert_near(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * b.abs().max(1.0),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

/// The fused squared distances on the test device against the CPU, forward and backward.
#[test]
fn squared_distances_match_the_cpu() {
    use nofuss_tensor::ops::pairwise_squared_distances;
    let dev = nofuss_tensor::test_device().unwrap();
    let (n, p, d) = (33usize, 500usize, 64usize);
    let a: Vec<f32> = (0..n * d)
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0)
        .collect();
    let mut b: Vec<f32> = (0..p * d)
        .map(|i| ((i * 104729 % 997) as f32 - 498.0) / 300.0)
        .collect();
    b[..d].copy_from_slice(&a[..d]);
    let g: Vec<f32> = (0..n * p)
        .map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0)
        .collect();
    let run = |dev: &Device| {
        let av = Var::from_vec(a.clone(), (n, d), dev).unwrap();
        let bv = Var::from_vec(b.clone(), (p, d), dev).unwrap();
        let dist = pairwise_squared_distances(av.as_tensor(), bv.as_tensor()).unwrap();
        let gt = Tensor::from_vec(g.clone(), (n, p), dev).unwrap();
        let grads = (&dist * gt).unwrap().sum_all().unwrap().backward().unwrap();
        [
            host_f32(&dist),
            host_f32(grads.get(av.as_tensor()).unwrap()),
            host_f32(grads.get(bv.as_tensor()).unwrap()),
        ]
    };
    set_tf32(false);
    let (cpu, gpu) = (run(&Device::Cpu), run(&dev));
    for (what, c, g) in [
        ("d", &cpu[0], &gpu[0]),
        ("da", &cpu[1], &gpu[1]),
        ("db", &cpu[2], &gpu[2]),
    ] {
        let scale = c.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in g.iter().zip(c.iter()).enumerate() {
            assert!((x - y).abs() <= 1e-4 * scale, "{what}[{i}]: {x} vs {y}");
        }
    }
}

/// A batch norm over more channels than a CUDA grid has rows (65,535; the reductions fold
/// the channels into grid planes there) on the test device against the CPU: statistics,
/// output and all three gradients.
#[test]
fn batch_norm_over_more_channels_than_a_grid_row_matches_the_cpu() {
    let dev = nofuss_tensor::test_device().unwrap();
    let (n, c) = (3usize, 65_535 * 2 + 7);
    let x: Vec<f32> = (0..n * c)
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
        .collect();
    let dy: Vec<f32> = (0..n * c)
        .map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0)
        .collect();
    let gamma: Vec<f32> = (0..c).map(|i| 0.5 + (i % 7) as f32 / 4.0).collect();
    let beta: Vec<f32> = (0..c).map(|i| (i % 5) as f32 / 8.0 - 0.25).collect();
    let run = |dev: &Device| {
        let xv = Var::from_vec(x.clone(), (n, c, 1, 1), dev).unwrap();
        let gv = Var::from_vec(gamma.clone(), c, dev).unwrap();
        let bv = Var::from_vec(beta.clone(), c, dev).unwrap();
        let out =
            batch_norm_train(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), 1e-5, true).unwrap();
        let g = Tensor::from_vec(dy.clone(), (n, c, 1, 1), dev).unwrap();
        let grads = (&out.y * g).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| host_f32(grads.get(v.as_tensor()).unwrap());
        [
            ("mean", host_f32(&out.mean)),
            ("var", host_f32(&out.var)),
            ("y", host_f32(&out.y)),
            ("dx", grad(&xv)),
            ("dgamma", grad(&gv)),
            ("dbeta", grad(&bv)),
        ]
    };
    let want = run(&Device::Cpu);
    // hw is 1: element i of y and dx is channel i % c.
    for ((what, got), (_, want)) in run(&dev).iter().zip(&want) {
        assert_near(what, got, want, 1e-4);
    }
}
