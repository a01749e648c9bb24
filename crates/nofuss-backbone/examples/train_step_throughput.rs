//! Measures forward+backward throughput of the small CNN on random input (CPU).
//!
//! `cargo run --release -p nofuss-backbone --example train_step_throughput -- [BATCH] [WIDTHS, e.g. 32,64,128]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use nofuss_backbone::{Backbone, Embedder, EmbeddingHead, HeadConfig, SmallCnn, SmallCnnConfig};
use nofuss_tensor::SeededVarMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batch: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(64);
    let widths: Vec<usize> = match std::env::args().nth(2) {
        Some(w) => w.split(',').map(|v| v.parse()).collect::<Result<_, _>>()?,
        None => SmallCnnConfig::default().widths,
    };
    let dev = Device::Cpu;
    let params = SeededVarMap::new(0);
    let vb = params.var_builder(DType::F32, &dev);
    let cnn = SmallCnn::new(
        &SmallCnnConfig {
            widths: widths.clone(),
            ..Default::default()
        },
        vb.pp("backbone"),
    )?;
    let head = EmbeddingHead::new(cnn.out_channels(), &HeadConfig::default(), vb.pp("head"))?;
    let model = Embedder::new(Box::new(cnn), head);
    let mut opt = candle_nn::AdamW::new_lr(params.var_map().all_vars(), 1e-3)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 1, 32, 32), &dev)?;
    let mut times = Vec::new();
    for _ in 0..12 {
        let t = Instant::now();
        let e = model.forward(&x, true)?;
        opt.backward_step(&e.sqr()?.mean_all()?)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "widths {widths:?}, batch {batch}: median step {:.1} ms, {:.0} images/s",
        med * 1e3,
        batch as f64 / med
    );
    Ok(())
}
