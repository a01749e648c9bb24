//! Learn proxies for three 2-D clusters with Proxy-NCA and print the loss as it falls.
//!
//! `cargo run -p nofuss-losses --example proxy_nca_toy`

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use nofuss_losses::{ProxyInit, ProxyNca, ProxyNcaConfig};
use nofuss_tensor::SeededVarMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    // Fixed embeddings (think: the output of a frozen network), three classes.
    let emb = Tensor::new(
        &[
            [1.0f32, 0.1],
            [0.9, -0.1],
            [-0.1, 1.0],
            [0.1, 0.8],
            [-1.0, -0.9],
            [-0.8, -1.1],
        ],
        &dev,
    )?;
    let labels = Tensor::new(&[0u32, 0, 1, 1, 2, 2], &dev)?;
    let params = SeededVarMap::new(0);
    let loss_fn = ProxyNca::new(
        3,
        2,
        ProxyInit::Normal,
        ProxyNcaConfig::default(),
        params.var_builder(DType::F32, &dev),
    )?;
    let mut opt = candle_nn::AdamW::new_lr(params.var_map().all_vars(), 0.05)?;
    for step in 0..=100 {
        let loss = loss_fn.loss(&emb, &labels)?;
        if step % 20 == 0 {
            println!("step {step:3}: loss {:.4}", loss.to_scalar::<f32>()?);
        }
        opt.backward_step(&loss)?;
    }
    println!("learned proxies:\n{}", loss_fn.proxies());
    Ok(())
}
