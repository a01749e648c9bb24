//! A small two-branch network trained on nofuss's tape: the layers recorded as they run,
//! a loss in candle's graph on top of the tape's output (through a leaf variable), the
//! tape walked back into the same gradient store, one Adam step. The same network also
//! runs in candle's graph (`Graph`); the crate's tests check that both give the same
//! gradients.
//!
//! ```sh
//! cargo run --release -p nofuss-tensor --example tape             # auto: GPU if built with it
//! ```

use candle_core::{DType, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use nofuss_tensor::batch_norm::BatchNorm2d;
use nofuss_tensor::conv::Conv2d;
use nofuss_tensor::optim::{Optimizer, OptimizerKind, ParamGroup};
use nofuss_tensor::pool::Pool2d;
use nofuss_tensor::tape::{Graph, Layers, Tape};
use nofuss_tensor::DeviceSpec;

/// A stem and two branches over its output, concatenated, then pooled.
struct Net {
    stem: (Conv2d, BatchNorm2d),
    left: (Conv2d, BatchNorm2d),
    right: (Conv2d, BatchNorm2d),
}

impl Net {
    fn new(vb: &VarBuilder) -> candle_core::Result<Self> {
        let layer = |name: &str, c_in, c_out, k: usize| -> candle_core::Result<_> {
            let cfg = Conv2dConfig {
                padding: k / 2,
                ..Default::default()
            };
            Ok((
                Conv2d::new(c_in, c_out, k, cfg, true, vb.pp(name))?,
                BatchNorm2d::new(c_out, 1e-5, 0.1, vb.pp(format!("{name}_bn")))?,
            ))
        };
        Ok(Self {
            stem: layer("stem", 3, 8, 3)?,
            left: layer("left", 8, 4, 1)?,
            right: layer("right", 8, 4, 3)?,
        })
    }

    /// Written once for both: `L` is candle's graph or a tape.
    fn forward<L: Layers>(&self, l: &mut L, x: &L::Act) -> candle_core::Result<L::Act> {
        let h = l.conv_bn(x, &self.stem.0, &self.stem.1, true)?;
        let a = l.conv_bn(&h, &self.left.0, &self.left.1, true)?;
        let b = l.conv_bn(&h, &self.right.0, &self.right.1, true)?;
        let y = l.cat(&[a, b])?;
        l.max_pool(&y, &Pool2d::new(2, 2))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec: DeviceSpec = std::env::args().nth(1).unwrap_or("auto".into()).parse()?;
    let picked = spec.select()?;
    println!("device: {}", picked.description);
    let dev = &picked.device;
    let params = VarMap::new();
    let net = Net::new(&VarBuilder::from_varmap(&params, DType::F32, dev))?;
    let mut opt = Optimizer::new(
        OptimizerKind::adam(),
        1e-3,
        vec![ParamGroup::new("all", params.all_vars())],
    )?;
    let x = Tensor::randn(0f32, 1.0, (8, 3, 16, 16), dev)?;
    for step in 0..3 {
        let mut tape = Tape::new();
        let input = tape.input(&x);
        let out = net.forward(&mut tape, &input)?;
        // The loss in candle's graph, from a leaf holding the tape's output.
        let leaf = Var::from_tensor(out.tensor())?;
        let loss = leaf.as_tensor().sqr()?.mean_all()?;
        let mut grads = loss.backward()?;
        if let Some(g) = grads.remove(leaf.as_tensor()) {
            tape.backward_into(&out, &g, &mut grads)?;
        }
        opt.step(&grads)?;
        println!("step {step}: loss {:.5}", loss.to_scalar::<f32>()?);
    }
    // The same network in candle's graph (running statistics updated there too).
    let y = net.forward(&mut Graph { train: true }, &x)?;
    println!("graph output {:?}", y.dims());
    Ok(())
}
