//! Every loss against pytorch-metric-learning or a PyTorch transcription of its formula:
//! value and gradients (embeddings and proxies), in f64 (relative error <= 1e-5) and in
//! f32 (<= 1e-4). Fixture: `tests/reference/losses.py`.

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

fn run_case(case: &Value, dtype: DType, tol: f64) {
    let dev = device();
    let name = format!("{} / {} ({dtype:?})", case["loss"], case["name"]);
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
