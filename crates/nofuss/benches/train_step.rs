//! Training-step throughput of the default model, for side-by-side comparison with
//! `benches/torch_train_step.py` (same model, loss, optimiser and input).
//!
//! `cargo bench -p nofuss --bench train_step -- [BATCH] [STEPS]` prints one JSON line:
//! median milliseconds per step and images per second over STEPS timed steps (after 3
//! warm-up steps), on synthetic device-resident input. `cargo xtask bench` runs both.

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::Optimizer;
use nofuss::config::TrainConfig;
use nofuss::train::Model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; keep only numbers.
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let batch = nums.first().copied().unwrap_or(64);
    let steps = nums.get(1).copied().unwrap_or(20);
    let cfg = TrainConfig::default();
    let classes = 124; // training classes of the default dataset
    let dev = Device::Cpu;
    let model = Model::new(&cfg, classes, &dev)?;
    let (mut opt, mut popt) = model.optimizers(&cfg.optim)?;
    let size = cfg.data.image_size;
    let x = Tensor::randn(0f32, 1.0, (batch, 1, size, size), &dev)?;
    let y = Tensor::from_vec(
        (0..batch as u32).map(|i| i % classes as u32).collect(),
        batch,
        &dev,
    )?;
    let mut times = Vec::new();
    for i in 0..steps + 3 {
        let t = Instant::now();
        let loss = model.loss.loss(&model.embedder.forward(&x, true)?, &y)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        popt.step(&grads)?;
        loss.to_scalar::<f32>()?;
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let line = serde_json::json!({
        "impl": "nofuss (candle 0.11.1)",
        "batch": batch,
        "steps": steps,
        "median_ms": (med * 1e5).round() / 100.0,
        "images_per_sec": (batch as f64 / med * 10.0).round() / 10.0,
    });
    println!("{line}");
    Ok(())
}
