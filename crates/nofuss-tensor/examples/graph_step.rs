//! A training step captured once into a CUDA graph and replayed: a convolution + batch
//! norm + ReLU layer on the tape, a loss in candle's graph, Adam with its per-step
//! scalars on the device. Without a GPU the same steps run eagerly (a capture needs
//! CUDA), which is what the output says.
//!
//! ```sh
//! cargo run --release -p nofuss-tensor --example graph_step                   # CPU: eager
//! cargo run --release -p nofuss-tensor --features cuda --example graph_step   # GPU: replayed
//! ```

use candle_core::{DType, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use nofuss_tensor::batch_norm::BatchNorm2d;
use nofuss_tensor::conv::Conv2d;
use nofuss_tensor::graph::{graphs_available, StepGraph};
use nofuss_tensor::optim::{Optimizer, OptimizerKind, ParamGroup};
use nofuss_tensor::tape::{Layers, Tape};
use nofuss_tensor::{with_cached_layouts, DeviceSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let picked = DeviceSpec::Auto.select()?;
    let dev = &picked.device;
    println!("device: {}", picked.description);
    let params = VarMap::new();
    let vb = VarBuilder::from_varmap(&params, DType::F32, dev);
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = Conv2d::new(3, 8, 3, cfg, false, vb.pp("conv"))?;
    let bn = BatchNorm2d::new(8, 1e-5, 0.1, vb.pp("bn"))?;
    // The running statistics get no gradient, so the optimiser leaves them alone.
    let mut opt = Optimizer::new(
        OptimizerKind::adam(),
        1e-2,
        vec![ParamGroup::new("all", params.all_vars())],
    )?;
    // Inputs and outputs of a captured step live in buffers made before the capture.
    let x = Tensor::randn(0f32, 1.0, (16, 3, 16, 16), dev)?;
    let loss = Tensor::zeros(1, DType::F32, dev)?;
    let step = |opt: &mut Optimizer| -> nofuss_tensor::Result<()> {
        let mut tape = Tape::new();
        let input = tape.input(&x);
        let out = tape.conv_bn(&input, &conv, &bn, true)?;
        let leaf = Var::from_tensor(out.tensor())?;
        let l = (leaf.as_tensor() - 1.0)?.sqr()?.mean_all()?;
        let mut grads = l.backward()?;
        if let Some(g) = grads.remove(leaf.as_tensor()) {
            tape.backward_into(&out, &g, &mut grads)?;
        }
        opt.step(&grads)?;
        loss.slice_set(&l.reshape(1)?, 0, 0)?;
        Ok(())
    };
    // One ordinary step makes the optimiser's state and fills candle's layout cache.
    with_cached_layouts(dev, || step(&mut opt))?;
    println!("step 0 (eager): loss {:.5}", loss.to_vec1::<f32>()?[0]);
    opt.use_device_scalars()?;
    let graph = if graphs_available(dev) {
        opt.advance()?;
        Some(StepGraph::capture(dev, || step(&mut opt))?)
    } else {
        println!(
            "(no CUDA graphs on {}: the steps below run eagerly)",
            picked.description
        );
        None
    };
    for i in 1..6 {
        match &graph {
            Some(g) => {
                if i > 1 {
                    opt.advance()?;
                }
                g.replay()?;
            }
            None => {
                opt.advance()?;
                with_cached_layouts(dev, || step(&mut opt))?;
            }
        }
        let how = if graph.is_some() { "replayed" } else { "eager" };
        println!("step {i} ({how}): loss {:.5}", loss.to_vec1::<f32>()?[0]);
    }
    Ok(())
}
