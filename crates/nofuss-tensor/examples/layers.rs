//! The custom layers on any device: a convolution, fused batch norm + ReLU and a ceil-mode
//! max pool, forward and backward, then one fused Adam step.
//!
//! ```sh
//! cargo run --release -p nofuss-tensor --example layers             # auto: GPU if built with it
//! cargo run --release -p nofuss-tensor --features cuda --example layers -- cuda
//! ```

use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use nofuss_tensor::batch_norm::BatchNorm2d;
use nofuss_tensor::conv::Conv2d;
use nofuss_tensor::optim::{Optimizer, OptimizerKind, ParamGroup};
use nofuss_tensor::pool::{max_pool2d, Pool2d};
use nofuss_tensor::DeviceSpec;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec: DeviceSpec = std::env::args().nth(1).unwrap_or("auto".into()).parse()?;
    let picked = spec.select()?;
    println!("device: {}", picked.description);
    let dev = &picked.device;
    let params = VarMap::new();
    let vb = VarBuilder::from_varmap(&params, DType::F32, dev);
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = Conv2d::new(3, 16, 3, cfg, true, vb.pp("conv"))?;
    let bn = BatchNorm2d::new(16, 1e-5, 0.1, vb.pp("bn"))?;
    let pool = Pool2d {
        kernel: 3,
        stride: 2,
        padding: 0,
        ceil_mode: true,
    };
    let mut opt = Optimizer::new(
        OptimizerKind::adam(),
        1e-3,
        vec![ParamGroup::new("all", params.all_vars())],
    )?;
    let x = Tensor::randn(0f32, 1.0, (8, 3, 32, 32), dev)?;
    for step in 0..3 {
        let t = Instant::now();
        let y = max_pool2d(&bn.forward_t(&conv.forward(&x)?, true, true)?, &pool)?;
        let loss = y.sqr()?.mean_all()?;
        opt.step(&loss.backward()?)?;
        let value = loss.to_scalar::<f32>()?;
        println!(
            "step {step}: output {:?}, loss {value:.4}, {:.2} ms",
            y.dims(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
