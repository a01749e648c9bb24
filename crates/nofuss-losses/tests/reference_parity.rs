//! Every loss against pytorch-metric-learning or a PyTorch transcription of its formula:
//! value and gradients (embeddings and proxies), in f64 (relative error <= 1e-5) and in
//! f32 (<= 1e-4). Fixture: `tests/reference/losses.py`. On a GPU
//! (`NOFUSS_TEST_DEVICE=cuda`) also: dynamic assignment's device selection replayed from a
//! CUDA graph over new batches gives the eager loss and gradients.

use candle_core::{DType, Device, Tensor, Var};
use nofuss_losses::{
    nca_loss, proxy_nca, proxy_triplet, triplet_loss, NcaConfig, ProxyNcaConfig,
    ProxyTripletConfig, TripletConfig,
};
use serde_json::Value;

fn fixture() -> Value {
    let dir = nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(dir.join("losses.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn device() -> Device {
    nofuss_tensor::test_device().unwrap()
}

fn matrix(v: &Value) -> (Vec<f64>, usize, usize) {
    let rows = v.as_array().unwrap();
    let cols = rows[0].as_array().unwrap().len();
    let flat = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect();
    (flat, rows.len(), cols)
}

fn var(v: &Value, dtype: DType, dev: &Device) -> Var {
    let (flat, r, c) = matrix(v);
    let t = Tensor::from_vec(flat, (r, c), dev).unwrap();
    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// One case with the losses' finiteness checks on and off: on a GPU they decide how much
/// is read back (dynamic assignment picks on the device either way, and with the checks
/// on also reads the labels and the anchor count), not the result.
fn run_case(case: &Value, dtype: DType, tol: f64) {
    for check in [true, false] {
        let mut case = case.clone();
        case["config"]["check_finite"] = Value::Bool(check);
        run_case_once(&case, dtype, tol);
    }
}

fn run_case_once(case: &Value, dtype: DType, tol: f64) {
    let dev = device();
    let name = format!(
        "{} / {} ({dtype:?}, checks {})",
        case["loss"], case["name"], case["config"]["check_finite"]
    );
    let x = var(&case["embeddings"], dtype, &dev);
    let labels: Vec<u32> = case["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let n = labels.len();
    let y = Tensor::from_vec(labels, n, &dev).unwrap();
    let p = case.get("proxies").map(|v| var(v, dtype, &dev));
    let cfg = case["config"].clone();
    let loss = match case["loss"].as_str().unwrap() {
        "proxy-nca" => {
            let c: ProxyNcaConfig = serde_json::from_value(cfg).unwrap();
            proxy_nca(x.as_tensor(), &y, p.as_ref().unwrap().as_tensor(), &c)
        }
        "proxy-triplet" => {
            let c: ProxyTripletConfig = serde_json::from_value(cfg).unwrap();
            proxy_triplet(x.as_tensor(), &y, p.as_ref().unwrap().as_tensor(), &c)
        }
        "triplet" => {
            let c: TripletConfig = serde_json::from_value(cfg).unwrap();
            triplet_loss(x.as_tensor(), &y, &c)
        }
        "nca" => {
            let c: NcaConfig = serde_json::from_value(cfg).unwrap();
            nca_loss(x.as_tensor(), &y, &c)
        }
        other => panic!("unknown loss {other}"),
    }
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        loss.dtype(),
        dtype,
        "{name}: computed in the input's precision"
    );
    let got = values(&loss)[0];
    let want = case["value"].as_f64().unwrap();
    assert!(
        ((got - want) / want.abs().max(1e-12)).abs() <= tol,
        "{name}: loss {got} vs {want}"
    );
    let grads = loss.backward().unwrap();
    let gx = values(grads.get(x.as_tensor()).unwrap());
    let err = max_rel(&gx, &matrix(&case["grad_embeddings"]).0);
    assert!(err <= tol, "{name}: embedding gradient error {err}");
    if let Some(p) = &p {
        let gp = values(grads.get(p.as_tensor()).unwrap());
        let err = max_rel(&gp, &matrix(&case["grad_proxies"]).0);
        assert!(err <= tol, "{name}: proxy gradient error {err}");
    }
}

#[test]
fn every_loss_matches_the_reference_in_f64() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        run_case(case, DType::F64, 1e-5);
    }
}

#[test]
fn every_loss_matches_the_reference_in_f32() {
    for case in fixture()["cases"].as_array().unwrap() {
        run_case(case, DType::F32, 1e-4);
    }
}

/// Dynamic assignment picks on the device, so a step of it can be captured into a CUDA
/// graph and replayed over new batches (copied into the captured input): each replay
/// picks again and gives the eager step's loss and proxy gradient. On the CPU (where the
/// host selects; the device selection's CPU test is `on_device`'s) only the refused
/// capture is checked.
#[test]
fn dynamic_assignment_replays_from_a_cuda_graph() {
    use nofuss_tensor::graph::{graphs_available, StepGraph};
    let dev = device();
    let (n, p, d) = (32usize, 1500usize, 8usize);
    let batch = |seed: u64| -> (Tensor, Tensor) {
        let cpu = Device::Cpu;
        let x: Vec<f32> = (0..n * d)
            .map(|i| ((i as f32 * 0.731 + seed as f32 * 1.37).sin() * 43758.547).fract())
            .collect();
        let x = Tensor::from_vec(x, (n, d), &cpu).unwrap();
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 7 + seed as u32) % 11).collect();
        (x.to_device(&dev).unwrap(), Tensor::new(y, &dev).unwrap())
    };
    let proxies = Var::from_tensor(
        &Tensor::randn(0f32, 1.0, (p, d), &Device::Cpu)
            .unwrap()
            .to_device(&dev)
            .unwrap(),
    )
    .unwrap();
    let nca = ProxyNcaConfig {
        assignment: nofuss_losses::Assignment::Dynamic,
        check_finite: false,
        ..Default::default()
    };
    let triplet = ProxyTripletConfig {
        assignment: nofuss_losses::Assignment::Dynamic,
        hardest_negatives: Some(3),
        check_finite: false,
        ..Default::default()
    };
    // The step: both losses, their sum's proxy gradient written out.
    let (x_in, y_in) = batch(0);
    let x_in = Var::from_tensor(&x_in).unwrap();
    let loss_out = Tensor::zeros(1, DType::F32, &dev).unwrap();
    let grad_out = Tensor::zeros((p, d), DType::F32, &dev).unwrap();
    let step = || -> Result<(), Box<dyn std::error::Error>> {
        let a = proxy_nca(x_in.as_tensor(), &y_in, proxies.as_tensor(), &nca)?;
        let b = proxy_triplet(x_in.as_tensor(), &y_in, proxies.as_tensor(), &triplet)?;
        let loss = (a + b)?;
        let g = loss.backward()?;
        let gp = g.get(proxies.as_tensor()).expect("proxy gradient");
        loss_out.slice_set(&loss.reshape(1)?, 0, 0)?;
        grad_out.slice_set(gp, 0, 0)?;
        Ok(())
    };
    let load = |seed: u64| {
        let (x, y) = batch(seed);
        x_in.set(&x).unwrap();
        y_in.slice_set(&y, 0, 0).unwrap();
    };
    let read = || (values(&loss_out)[0], values(&grad_out));
    let mut eager = Vec::new();
    for seed in 1..=3 {
        load(seed);
        nofuss_tensor::with_cached_layouts(&dev, step).unwrap();
        eager.push(read());
    }
    // Different batches, different picks: the losses differ.
    assert!(
        eager[0].0 != eager[1].0 && eager[1].0 != eager[2].0,
        "{:?}",
        eager.iter().map(|e| e.0).collect::<Vec<_>>()
    );
    if !graphs_available(&dev) {
        assert!(StepGraph::capture(&dev, step).is_err());
        eprintln!(
            "dynamic_assignment_replays_from_a_cuda_graph: capture needs a CUDA device; skipped"
        );
        return;
    }
    load(1);
    let graph =
        nofuss_tensor::with_cached_layouts(&dev, || StepGraph::capture(&dev, step)).unwrap();
    for (seed, (loss, grad)) in (1..=3).zip(&eager) {
        load(seed);
        graph.replay().unwrap();
        let (l, g) = read();
        assert!(
            (l - loss).abs() <= 1e-5 * (1.0 + loss.abs()),
            "batch {seed}: replay {l}, eager {loss}"
        );
        let err = max_rel(&g, grad);
        assert!(err <= 1e-5, "batch {seed}: proxy gradient error {err}");
    }
}
