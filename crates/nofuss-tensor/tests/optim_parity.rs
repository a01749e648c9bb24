//! nofuss-tensor's optimisers against torch.optim on the same problem
//! (`tests/reference/optim.py`): six steps, two parameter groups with their own learning
//! rates and weight decays, float64, every intermediate parameter compared. Runs on
//! `NOFUSS_TEST_DEVICE` (CPU by default).

use candle_core::{DType, Tensor, Var};
use nofuss_tensor::optim::{Optimizer, OptimizerKind, ParamGroup};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|x| match x.as_array() {
            Some(row) => row.iter().map(|y| y.as_f64().unwrap()).collect(),
            None => vec![x.as_f64().unwrap()],
        })
        .collect()
}

#[test]
fn trajectories_match_torch_optim() {
    let path = nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("optim.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dev = nofuss_tensor::test_device().unwrap();
    let c = Tensor::from_vec(floats(&fx["c"]), (2, 3), &dev).unwrap();
    let d = Tensor::from_vec(floats(&fx["d"]), 3, &dev).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let kind: OptimizerKind = serde_json::from_value(case["kind"].clone()).unwrap();
        let lr = case["lr"].as_f64().unwrap();
        let w =
            Var::from_tensor(&Tensor::from_vec(floats(&fx["w0"]), (2, 3), &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&Tensor::from_vec(floats(&fx["v0"]), 3, &dev).unwrap()).unwrap();
        let mut opt = Optimizer::new(
            kind,
            lr,
            vec![
                ParamGroup::new("w", vec![w.clone()]).weight_decay(case["wd_w"].as_f64().unwrap()),
                ParamGroup::new("v", vec![v.clone()])
                    .lr_scale(0.5)
                    .weight_decay(case["wd_v"].as_f64().unwrap()),
            ],
        )
        .unwrap();
        for (step, want) in case["steps"].as_array().unwrap().iter().enumerate() {
            let loss = ((w.as_tensor().sin().unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                + ((v.as_tensor() - 1.0).unwrap().sqr().unwrap() * &d)
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            for (got, key) in [(&w, "w"), (&v, "v")] {
                let got = got
                    .as_tensor()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                for (a, b) in got.iter().zip(floats(&want[key])) {
                    assert!(
                        (a - b).abs() < 1e-10,
                        "{name} step {} {key}: {a} vs torch {b}",
                        step + 1
                    );
                }
            }
        }
    }
}

/// Clipped steps on the test device equal clipped steps on the CPU, where the norm is
/// read on the host: on a GPU the update kernels take the scale from the norm on the
/// device instead. The bound is tight enough to clip every step.
#[test]
fn clipped_steps_match_the_cpu() {
    let trajectory = |dev: &candle_core::Device| {
        let w = Var::from_tensor(
            &Tensor::from_vec(vec![0.3f64, -1.2, 2.0, 0.7, -0.4, 1.5], (2, 3), dev).unwrap(),
        )
        .unwrap();
        let v =
            Var::from_tensor(&Tensor::from_vec(vec![2.0f64, -3.0, 0.5], 3, dev).unwrap()).unwrap();
        let mut opt = Optimizer::new(
            OptimizerKind::adam(),
            0.05,
            vec![
                ParamGroup::new("w", vec![w.clone()]).weight_decay(0.01),
                ParamGroup::new("v", vec![v.clone()]).lr_scale(0.5),
            ],
        )
        .unwrap()
        .with_clip_norm(0.25);
        let mut out = Vec::new();
        for step in 0..6 {
            let k = 1.0 + step as f64;
            let loss = ((w.as_tensor().sin().unwrap() * k)
                .unwrap()
                .sum_all()
                .unwrap()
                + (v.as_tensor() - 1.0)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
            let norm = opt.step(&loss.backward().unwrap()).unwrap();
            if let Some(n) = norm {
                assert!(n > 0.25, "the bound clips: {n}");
            }
            for t in [&w, &v] {
                out.extend(
                    t.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap(),
                );
            }
        }
        out
    };
    let dev = nofuss_tensor::test_device().unwrap();
    let (got, want) = (trajectory(&dev), trajectory(&candle_core::Device::Cpu));
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-10, "value {i}: {a} on {dev:?}, CPU {b}");
    }
}

/// 150 f32 parameters on `dev`: one empty, two around a block's chunk (4,096 elements),
/// one of `big`, the rest below `modulo`.
fn many_vars(dev: &candle_core::Device, big: usize, modulo: usize) -> Vec<Var> {
    (0..150usize)
        .map(|i| {
            let n = match i {
                0 => 0,
                1 => 4096,
                2 => 4097,
                3 => big,
                _ => (i * 613) % modulo,
            };
            let v: Vec<f32> = (0..n)
                .map(|j| (((j * 31 + i * 17) % 199) as f32 - 99.0) / 37.0)
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, n, dev).unwrap()).unwrap()
        })
        .collect()
}

/// The global gradient norm over many tensors (more than one launch's table on a GPU;
/// empty ones and lengths around a block's chunk among them) is the CPU's, and the same
/// to the bit when summed again.
#[test]
fn gradient_norms_of_many_tensors_match_the_cpu() {
    let norms = |dev: &candle_core::Device| {
        let vars = many_vars(dev, 100_003, 9001);
        let loss = vars
            .iter()
            .map(|v| (v.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        let grads = loss.backward().unwrap();
        let opt = Optimizer::new(
            OptimizerKind::sgd(0.0, false),
            0.1,
            vec![ParamGroup::new("all", vars)],
        )
        .unwrap();
        (
            opt.grad_norm(&grads).unwrap(),
            opt.grad_norm(&grads).unwrap(),
        )
    };
    let dev = nofuss_tensor::test_device().unwrap();
    let ((got, again), (want, _)) = (norms(&dev), norms(&candle_core::Device::Cpu));
    assert_eq!(got.to_bits(), again.to_bits(), "summed twice on {dev:?}");
    assert!(
        (got - want).abs() <= 1e-12 * want,
        "gradient norm on {dev:?} {got}, CPU {want}"
    );
}

/// One step of many parameters at once (on a GPU, a launch per table of up to 64 of a
/// group: empty ones, lengths around a block's chunk and more than a table among them)
/// moves every parameter as the CPU's per-parameter steps do: three steps of AdamW and
/// of SGD with momentum (whose first step differs), two groups.
#[test]
fn steps_of_many_parameters_match_the_cpu() {
    let run = |dev: &candle_core::Device, kind: OptimizerKind| {
        let vars = many_vars(dev, 20_003, 3001);
        let (a, b): (Vec<_>, Vec<_>) = vars
            .iter()
            .cloned()
            .enumerate()
            .partition(|(i, _)| i % 3 != 0);
        let strip = |v: Vec<(usize, Var)>| v.into_iter().map(|(_, v)| v).collect::<Vec<_>>();
        let mut opt = Optimizer::new(
            kind,
            0.01,
            vec![
                ParamGroup::new("a", strip(a)).weight_decay(0.05),
                ParamGroup::new("b", strip(b)).lr_scale(0.5),
            ],
        )
        .unwrap();
        for step in 0..3 {
            let loss = vars
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let w = 0.5 + ((i + step) % 7) as f64 / 3.0;
                    (v.as_tensor().sqr().unwrap().sum_all().unwrap() * w).unwrap()
                })
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        vars.iter()
            .map(|v| v.as_tensor().to_vec1::<f32>().unwrap())
            .collect::<Vec<_>>()
    };
    let dev = nofuss_tensor::test_device().unwrap();
    for kind in [OptimizerKind::adamw(), OptimizerKind::sgd(0.9, false)] {
        let (got, want) = (run(&dev, kind), run(&candle_core::Device::Cpu, kind));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len());
            for (j, (x, y)) in g.iter().zip(w).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                    "{kind:?}: parameter {i}[{j}] on {dev:?} {x}, CPU {y}"
                );
            }
        }
        let start = run(&candle_core::Device::Cpu, OptimizerKind::sgd(0.0, false));
        assert_ne!(want, start, "{kind:?} moved the parameters");
    }
}
