//! A training step captured into a CUDA graph and replayed takes the same steps as the
//! same step run eagerly: a small two-branch network on the tape (cuDNN convolutions,
//! batch norm with running statistics, pooling, concatenation), a loss in candle's graph
//! above it (a squared error, or Proxy-Triplet over 2,000 fixed proxies, with all
//! negatives or the hardest two picked on the device),
//! Adam with its per-step scalars on the device, unclipped and clipped. On a GPU
//! (`NOFUSS_TEST_DEVICE=cuda`, as `xtask/scripts/gpu-check.sh` runs it) both runs are
//! compared parameter by parameter, and failed captures leave the stream usable; on the
//! CPU the capture is refused, which is checked.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder};
use nofuss_tensor::batch_norm::BatchNorm2d;
use nofuss_tensor::conv::Conv2d;
use nofuss_tensor::graph::{graphs_available, StepGraph};
use nofuss_tensor::optim::{Optimizer, OptimizerKind, ParamGroup};
use nofuss_tensor::pool::Pool2d;
use nofuss_tensor::tape::{Layers, Tape};
use nofuss_tensor::{test_device, SeededVarMap};

type Layer = (Conv2d, BatchNorm2d);

/// A stem and two branches over it, concatenated, max-pooled and average-pooled.
struct Net {
    stem: Layer,
    left: Layer,
    right: Layer,
}

impl Net {
    fn new(vb: &VarBuilder) -> candle_core::Result<Self> {
        let layer = |name: &str, c_in, c_out, k: usize| -> candle_core::Result<Layer> {
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
            right: layer("right", 8, 6, 3)?,
        })
    }

    fn forward<L: Layers>(&self, l: &mut L, x: &L::Act) -> candle_core::Result<L::Act> {
        let h = l.conv_bn(x, &self.stem.0, &self.stem.1, true)?;
        let a = l.conv_bn(&h, &self.left.0, &self.left.1, true)?;
        let b = l.conv_bn(&h, &self.right.0, &self.right.1, true)?;
        let y = l.cat(&[a, b])?;
        let y = l.max_pool(&y, &Pool2d::new(2, 2))?;
        let same = Pool2d {
            padding: 1,
            ..Pool2d::new(3, 1)
        };
        l.avg_pool(&y, &same, true)
    }
}

/// The network, its variables (sorted by name) and an Adam optimiser over them,
/// clipping the gradients' norm to `clip` if given.
fn model(dev: &Device, clip: Option<f64>) -> (Net, Vec<(String, Var)>, Optimizer) {
    let params = SeededVarMap::new(7);
    let net = Net::new(&params.var_builder(DType::F64, dev)).unwrap();
    let mut vars = params
        .var_map()
        .data()
        .lock()
        .unwrap()
        .clone()
        .into_iter()
        .collect::<Vec<_>>();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let trained = vars
        .iter()
        .filter(|(n, _)| !n.contains("running_"))
        .map(|(_, v)| v.clone())
        .collect();
    let mut opt = Optimizer::new(
        OptimizerKind::adam(),
        1e-2,
        vec![ParamGroup::new("all", trained).weight_decay(1e-3)],
    )
    .unwrap();
    if let Some(c) = clip {
        opt = opt.with_clip_norm(c);
    }
    (net, vars, opt)
}

/// The loss above the network.
enum Loss {
    /// The mean squared distance of the outputs from 0.5.
    Mse,
    /// Proxy-Triplet against fixed proxies, over every other proxy
    /// (`triplet_rows_from_points`) or each output's `hardest` nearest negatives
    /// (`hardest_triplet_rows_from_points`: picked on the device by `smallest_k`), the
    /// masks made on the device: nothing is read back or uploaded, so the capture holds it.
    Triplet {
        proxies: Tensor,
        labels: Tensor,
        hardest: Option<usize>,
    },
}

impl Loss {
    fn of(&self, out: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Mse => (out - 0.5)?.sqr()?.mean_all(),
            Self::Triplet {
                proxies,
                labels,
                hardest,
            } => {
                let x = out.flatten_from(1)?;
                match hardest {
                    Some(k) => nofuss_tensor::ops::hardest_triplet_rows_from_points(
                        &x, proxies, labels, 1.0, *k,
                    )?,
                    None => nofuss_tensor::ops::triplet_rows_from_points(&x, proxies, labels, 1.0)?,
                }
                .mean_all()
            }
        }
    }
}

/// One training step: forward on a tape, loss in candle's graph, backward, update; the
/// loss written into `loss_out`.
fn step(
    net: &Net,
    opt: &mut Optimizer,
    (x, what): (&Tensor, &Loss),
    loss_out: &Tensor,
) -> nofuss_tensor::Result<()> {
    let mut tape = Tape::new();
    let input = tape.input(x);
    let out = net.forward(&mut tape, &input)?;
    let leaf = Var::from_tensor(out.tensor())?;
    let loss = what.of(leaf.as_tensor())?;
    let mut grads = loss.backward()?;
    if let Some(g) = grads.remove(leaf.as_tensor()) {
        tape.backward_into(&out, &g, &mut grads)?;
    }
    opt.step(&grads)?;
    loss_out.slice_set(&loss.reshape(1)?, 0, 0)?;
    Ok(())
}

fn values(vars: &[(String, Var)]) -> Vec<(String, Vec<f64>)> {
    vars.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

#[test]
fn replayed_steps_match_eager_steps() {
    // Unclipped, and clipped to a bound every step's gradients exceed (on a GPU the
    // scale comes from the norm on the device, inside the captured step).
    // And Proxy-Triplet losses, one of them picking each output's hardest negatives on
    // the device.
    for (clip, triplet) in [
        (None, None),
        (Some(1e-3), None),
        (None, Some(None)),
        (None, Some(Some(2))),
    ] {
        replays_match(clip, triplet);
    }
}

/// Where `dev` has no CUDA graphs: checks that a capture is refused there, says the GPU
/// part is skipped, and returns true.
fn refused_without_graphs(dev: &Device) -> bool {
    if graphs_available(dev) {
        return false;
    }
    let e = StepGraph::capture(dev, || -> nofuss_tensor::Result<()> { Ok(()) });
    assert!(e.is_err(), "no graphs on {dev:?}");
    eprintln!("graph_replay: capture needs a CUDA device (NOFUSS_TEST_DEVICE=cuda); skipped");
    true
}

/// Proxies of the triplet losses.
const PROXIES: usize = 2000;

/// `triplet`: `None` for the squared error, else Proxy-Triplet with these hardest negatives.
fn replays_match(clip: Option<f64>, triplet: Option<Option<usize>>) {
    let dev = test_device().unwrap();
    let x = Tensor::randn(0f64, 1.0, (4, 3, 12, 12), &Device::Cpu)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    // The network's outputs are [4, 10, 6, 6]: 360 values a row.
    let what = if let Some(hardest) = triplet {
        Loss::Triplet {
            // More proxies than a 4 KiB upload holds as u32 (candle's cache for what a
            // capture may find uploaded): SOP has 11,318; the masks must be made on the
            // device.
            proxies: Tensor::randn(0f64, 0.1, (PROXIES, 360), &Device::Cpu)
                .unwrap()
                .to_device(&dev)
                .unwrap(),
            labels: Tensor::new(&[0u32, PROXIES as u32 - 1, 1, 1500], &dev).unwrap(),
            hardest,
        }
    } else {
        Loss::Mse
    };
    if refused_without_graphs(&dev) {
        // The step itself runs anywhere.
        let (net, _, mut opt) = model(&dev, clip);
        let loss = Tensor::zeros(1, DType::F64, &dev).unwrap();
        step(&net, &mut opt, (&x, &what), &loss).unwrap();
        let l = loss.to_vec1::<f64>().unwrap()[0];
        assert!(l.is_finite() && l > 0.0, "loss {l}");
        return;
    }
    const STEPS: usize = 4;
    // Eager steps run as the trainer runs them, with candle's layout cache on: what they
    // upload is what a capture later finds there (it refuses a miss).
    let eager = |net: &Net, opt: &mut Optimizer, loss: &Tensor| {
        nofuss_tensor::with_cached_layouts(&dev, || step(net, opt, (&x, &what), loss)).unwrap()
    };
    // Eager: one ordinary step, then steps with the optimiser's scalars on the device.
    let (net, eager_vars, mut opt) = model(&dev, clip);
    let loss = Tensor::zeros(1, DType::F64, &dev).unwrap();
    let mut eager_losses = Vec::new();
    for i in 0..STEPS {
        if i == 1 {
            opt.use_device_scalars().unwrap();
        }
        if i >= 1 {
            opt.advance().unwrap();
        }
        eager(&net, &mut opt, &loss);
        eager_losses.push(loss.to_vec1::<f64>().unwrap()[0]);
    }
    // Captured: the same ordinary first step, then the second step captured and replayed,
    // the third and fourth replayed (each with its own bias corrections).
    let (net, graph_vars, mut opt) = model(&dev, clip);
    let mut graph_losses = Vec::new();
    eager(&net, &mut opt, &loss);
    graph_losses.push(loss.to_vec1::<f64>().unwrap()[0]);
    opt.use_device_scalars().unwrap();
    opt.advance().unwrap();
    let graph = StepGraph::capture(&dev, || step(&net, &mut opt, (&x, &what), &loss)).unwrap();
    for i in 1..STEPS {
        if i > 1 {
            opt.advance().unwrap();
        }
        graph.replay().unwrap();
        graph_losses.push(loss.to_vec1::<f64>().unwrap()[0]);
    }
    assert_eq!(opt.steps(), STEPS as u64);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-10 * (1.0 + a.abs().max(b.abs()));
    for (i, (a, b)) in eager_losses.iter().zip(&graph_losses).enumerate() {
        assert!(
            close(*a, *b),
            "clip {clip:?}, triplet {triplet:?}, loss of step {i}: eager {a}, replayed {b}"
        );
    }
    // The losses moved: the replays did train (a replay of stale scalars or of nothing
    // would leave the parameters or the losses where they were).
    assert!(
        graph_losses.windows(2).all(|w| w[0] != w[1]),
        "{graph_losses:?}"
    );
    for ((name, a), (_, b)) in values(&eager_vars).iter().zip(values(&graph_vars)) {
        for (j, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!(
                close(*p, *q),
                "clip {clip:?}, triplet {triplet:?}, {name}[{j}]: eager {p}, replayed {q}"
            );
        }
    }
}

/// A capture that fails, by the closure's error or by the driver's refusal of what it
/// queued (here: freeing a buffer made before the capture, which a capture cannot hold),
/// is an error, and the stream works afterwards: eager work runs, and a later capture
/// replays correctly.
#[test]
fn a_failed_capture_leaves_the_stream_usable() {
    let dev = test_device().unwrap();
    if refused_without_graphs(&dev) {
        return;
    }
    let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev).unwrap();
    let usable = |after: &str| {
        let y = (&x * 2.0).unwrap().to_vec1::<f32>();
        assert_eq!(
            y.as_ref().ok(),
            Some(&vec![2f32, 4.0, 6.0, 8.0]),
            "eager work after {after}: {y:?}"
        );
    };
    let out = Tensor::zeros(4, DType::F32, &dev).unwrap();
    // What the captures below queue, run once eagerly: their layouts are then cached.
    nofuss_tensor::with_cached_layouts(&dev, || -> candle_core::Result<()> {
        let _ = (&x + 1.0)?;
        out.slice_set(&(&x * 3.0)?, 0, 0)?;
        out.zero_set()
    })
    .unwrap();
    // The closure's own error, after it queued work.
    let e = StepGraph::capture(&dev, || -> nofuss_tensor::Result<()> {
        let _ = (&x + 1.0)?;
        Err(nofuss_tensor::Error::Graph("the closure's error".into()))
    })
    .unwrap_err();
    assert!(e.to_string().contains("the closure's error"), "{e}");
    usable("the closure's error");
    // A buffer made before the capture, freed inside it (cudarc records the driver's
    // refusal of the free instead of returning it).
    let before = Tensor::ones(1 << 16, DType::F32, &dev).unwrap();
    let e = StepGraph::capture(&dev, move || -> nofuss_tensor::Result<()> {
        drop(before);
        Ok(())
    });
    assert!(
        e.is_err(),
        "a capture that freed memory made before it was accepted"
    );
    usable("a refused free");
    // A correct capture still records and replays.
    let graph = StepGraph::capture(&dev, || -> nofuss_tensor::Result<()> {
        out.slice_set(&(&x * 3.0)?, 0, 0)?;
        Ok(())
    })
    .unwrap();
    graph.replay().unwrap();
    assert_eq!(out.to_vec1::<f32>().unwrap(), vec![3f32, 6.0, 9.0, 12.0]);
}
