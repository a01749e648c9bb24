//! A reverse-mode tape for convolutional networks, beside candle's autograd.
//!
//! candle's backward pass gives every input of every operation a gradient buffer filled
//! with zeros and then adds the operation's contribution into it: for BN-Inception 385
//! such edges per training step, a zero fill and an addition over each activation and
//! parameter (about 20 GB of memory traffic and 770 kernel launches per step at batch
//! 128 on a GPU), on top of sorting the whole graph on the host. A [`Tape`] records the
//! layers of a network as they run (convolution + batch norm (+ ReLU), max and average
//! pooling, channel concatenation) and walks them back itself: a value's first gradient
//! is kept as it comes, later ones (a block input read by several branches) are added,
//! and nothing is zero-filled. The passes are the same operations as the layers'
//! autograd ([`crate::conv::conv2d_backward`], [`crate::batch_norm::batch_norm_backward`],
//! [`crate::pool::max_pool2d_backward`], [`crate::pool::avg_pool2d_backward`]), so the
//! gradients are the same.
//!
//! A network written once against [`Layers`] runs in candle's graph ([`Graph`], for
//! evaluation and anything the tape does not cover) or on a tape (training). The tape's
//! output joins candle's graph through a leaf variable: the head and the loss above it
//! stay ordinary candle code, and the leaf's gradient starts [`Tape::backward`].
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::Conv2dConfig;
//! use nofuss_tensor::{batch_norm::BatchNorm2d, conv::Conv2d, SeededVarMap};
//! use nofuss_tensor::tape::{Layers, Tape};
//!
//! let params = SeededVarMap::new(0);
//! let vb = params.var_builder(DType::F32, &Device::Cpu);
//! let conv = Conv2d::new(1, 4, 3, Conv2dConfig { padding: 1, ..Default::default() }, false, vb.pp("conv"))?;
//! let bn = BatchNorm2d::new(4, 1e-5, 0.1, vb.pp("bn"))?;
//! let mut tape = Tape::new();
//! let x = tape.input(&Tensor::randn(0f32, 1.0, (2, 1, 6, 6), &Device::Cpu)?);
//! let y = tape.conv_bn(&x, &conv, &bn, true)?;
//! // The gradient of sum(y): one (parameter, gradient) pair per trained tensor.
//! let grads = tape.backward(&y, &y.tensor().ones_like()?)?;
//! assert_eq!(grads.len(), 3); // conv weight, batch-norm scale and shift
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use candle_nn::Conv2dConfig;

use crate::batch_norm::{batch_norm_backward, BatchNorm2d, BatchNormSaved};
use crate::conv::{conv2d, conv2d_backward, Conv2d};
use crate::pool::{
    avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward, max_pool2d_with_indices,
    MaxPoolIndices, Pool2d,
};

/// The layers a convolutional backbone is built from, run either in candle's graph
/// ([`Graph`]) or on a [`Tape`].
pub trait Layers {
    /// An activation.
    type Act: Clone;

    /// Convolution, then batch norm with the convolution's bias folded in
    /// ([`BatchNorm2d::forward_shifted_t`]), then a ReLU when `relu`.
    fn conv_bn(
        &mut self,
        x: &Self::Act,
        conv: &Conv2d,
        bn: &BatchNorm2d,
        relu: bool,
    ) -> Result<Self::Act>;

    /// Max pooling ([`crate::pool::max_pool2d`]).
    fn max_pool(&mut self, x: &Self::Act, p: &Pool2d) -> Result<Self::Act>;

    /// Average pooling ([`crate::pool::avg_pool2d`]).
    fn avg_pool(&mut self, x: &Self::Act, p: &Pool2d, count_include_pad: bool)
        -> Result<Self::Act>;

    /// Concatenation along the channels (dimension 1).
    fn cat(&mut self, xs: &[Self::Act]) -> Result<Self::Act>;
}

/// The layers in candle's graph, differentiable by `backward()`: batch norm with batch
/// statistics when `train` (updating the running ones), with the running ones otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Graph {
    /// Batch statistics (training mode) or running statistics.
    pub train: bool,
}

impl Layers for Graph {
    type Act = Tensor;

    fn conv_bn(
        &mut self,
        x: &Tensor,
        conv: &Conv2d,
        bn: &BatchNorm2d,
        relu: bool,
    ) -> Result<Tensor> {
        bn.forward_shifted_t(&conv.forward_unbiased(x)?, conv.bias(), self.train, relu)
    }

    fn max_pool(&mut self, x: &Tensor, p: &Pool2d) -> Result<Tensor> {
        max_pool2d(x, p)
    }

    fn avg_pool(&mut self, x: &Tensor, p: &Pool2d, count_include_pad: bool) -> Result<Tensor> {
        avg_pool2d(x, p, count_include_pad)
    }

    fn cat(&mut self, xs: &[Tensor]) -> Result<Tensor> {
        Tensor::cat(xs, 1)
    }
}

/// An activation recorded on a [`Tape`]: its value and its place on the tape.
#[derive(Debug, Clone)]
pub struct Act {
    id: usize,
    value: Tensor,
}

impl Act {
    /// The value (outside candle's graph).
    pub fn tensor(&self) -> &Tensor {
        &self.value
    }
}

/// One recorded layer with what its backward pass needs.
enum Node {
    ConvBn {
        x: Act,
        /// The trained weight and the copy the convolution used (cast to the input's dtype).
        weight: Tensor,
        used: Tensor,
        cfg: Conv2dConfig,
        conv_out: Tensor,
        y: Tensor,
        gamma: Tensor,
        beta: Tensor,
        /// The convolution's bias, folded into the batch norm.
        shift: Option<Tensor>,
        saved: BatchNormSaved,
        out: usize,
    },
    MaxPool {
        x: usize,
        indices: MaxPoolIndices,
        out: usize,
    },
    AvgPool {
        x: usize,
        dims: Vec<usize>,
        pool: Pool2d,
        include_pad: bool,
        out: usize,
    },
    Cat {
        /// Each part's activation and channel count.
        parts: Vec<(usize, usize)>,
        out: usize,
    },
}

impl Node {
    fn out(&self) -> usize {
        match self {
            Node::ConvBn { out, .. }
            | Node::MaxPool { out, .. }
            | Node::AvgPool { out, .. }
            | Node::Cat { out, .. } => *out,
        }
    }
}

/// Layers recorded for one backward pass, their batch norms in training mode (batch
/// statistics, running statistics updated) unless [`Tape::set_fixed_statistics`] says
/// otherwise. See the module documentation.
#[derive(Default)]
pub struct Tape {
    nodes: Vec<Node>,
    /// Whether each activation depends on a parameter (the inputs do not: no gradient
    /// is computed for them).
    needs_grad: Vec<bool>,
    /// Batch norms normalise with their running statistics ("frozen" batch norm).
    fixed_statistics: bool,
}

impl std::fmt::Debug for Tape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tape")
            .field("layers", &self.nodes.len())
            .field("activations", &self.needs_grad.len())
            .finish()
    }
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the batch norms recorded from now on normalise with their running
    /// statistics (scale, shift and the folded convolution biases still train: "frozen"
    /// batch norm, the usual choice for fine-tuning with small batches) instead of the
    /// batch's (the default).
    pub fn set_fixed_statistics(&mut self, fixed: bool) {
        self.fixed_statistics = fixed;
    }

    /// Layers recorded so far.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// An input of the network (no gradient is computed for it).
    pub fn input(&mut self, x: &Tensor) -> Act {
        self.value(x.detach(), false)
    }

    fn value(&mut self, value: Tensor, needs_grad: bool) -> Act {
        self.needs_grad.push(needs_grad);
        Act {
            id: self.needs_grad.len() - 1,
            value,
        }
    }

    /// The gradients of the parameters (every variable the recorded layers used, each
    /// with its gradient in its own dtype) for the gradient `grad` of the activation
    /// `out`, walking the tape back once. Activations that `out` does not depend on get
    /// nothing.
    pub fn backward(self, out: &Act, grad: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        if grad.dims() != out.value.dims() {
            candle_core::bail!(
                "tape backward: gradient {:?} for an activation {:?}",
                grad.dims(),
                out.value.dims()
            );
        }
        let Tape {
            nodes, needs_grad, ..
        } = self;
        let mut grads: Vec<Option<Tensor>> = vec![None; needs_grad.len()];
        grads[out.id] = Some(grad.detach().to_dtype(out.value.dtype())?);
        let mut params = Vec::new();
        let mut param = |p: Tensor, g: Tensor| -> Result<()> {
            // Only variables train (loaded or frozen tensors take no gradient, as in
            // candle's graph).
            if p.track_op() {
                let g = g.to_dtype(p.dtype())?;
                params.push((p, g));
            }
            Ok(())
        };
        for node in nodes.into_iter().rev() {
            let Some(g) = grads[node.out()].take() else {
                continue;
            };
            match node {
                Node::ConvBn {
                    x,
                    weight,
                    used,
                    cfg,
                    conv_out,
                    y,
                    gamma,
                    beta,
                    shift,
                    saved,
                    ..
                } => {
                    let bn = batch_norm_backward(&conv_out, &y, &g, &gamma, &saved, true)?;
                    drop((y, g));
                    param(gamma, bn.gamma)?;
                    param(beta, bn.beta)?;
                    if let (Some(p), Some(ds)) = (shift, bn.shift) {
                        param(p, ds)?;
                    }
                    let Some(d_out) = bn.x else {
                        candle_core::bail!("tape backward: batch norm gave no input gradient");
                    };
                    let need_x = needs_grad[x.id];
                    let (dx, dw) = conv2d_backward(&x.value, &used, &d_out, &cfg, need_x)?;
                    param(weight, dw)?;
                    if let Some(dx) = dx {
                        accumulate(&mut grads[x.id], dx)?;
                    }
                }
                Node::MaxPool { x, indices, .. } => {
                    if needs_grad[x] {
                        accumulate(&mut grads[x], max_pool2d_backward(&g, &indices)?)?;
                    }
                }
                Node::AvgPool {
                    x,
                    dims,
                    pool,
                    include_pad,
                    ..
                } => {
                    if needs_grad[x] {
                        let dx = avg_pool2d_backward(&g, &dims, &pool, include_pad)?;
                        accumulate(&mut grads[x], dx)?;
                    }
                }
                Node::Cat { parts, .. } => {
                    let mut at = 0;
                    for (x, c) in parts {
                        if needs_grad[x] {
                            accumulate(&mut grads[x], g.narrow(1, at, c)?)?;
                        }
                        at += c;
                    }
                }
            }
        }
        Ok(params)
    }

    /// [`Self::backward`] with the parameters' gradients added to `grads` (inserted
    /// where `grads` has none for a parameter yet).
    pub fn backward_into(self, out: &Act, grad: &Tensor, grads: &mut GradStore) -> Result<()> {
        for (p, g) in self.backward(out, grad)? {
            let mut slot = grads.remove(&p);
            accumulate(&mut slot, g)?;
            if let Some(g) = slot {
                grads.insert(&p, g);
            }
        }
        Ok(())
    }
}

/// Adds `g` to a gradient slot; the first gradient is kept as it is.
fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        None => g,
        Some(before) => (before + g)?,
    });
    Ok(())
}

impl Layers for Tape {
    type Act = Act;

    fn conv_bn(&mut self, x: &Act, conv: &Conv2d, bn: &BatchNorm2d, relu: bool) -> Result<Act> {
        let weight = conv.weight().clone();
        let used = weight.detach().to_dtype(x.value.dtype())?;
        let cfg = *conv.config();
        let conv_out = conv2d(&x.value, &used, None, &cfg)?;
        let train = !self.fixed_statistics;
        let (y, saved) = bn.forward_saved(&conv_out, conv.bias(), train, relu)?;
        let out = self.value(y.clone(), true);
        self.nodes.push(Node::ConvBn {
            x: x.clone(),
            weight,
            used,
            cfg,
            conv_out,
            y,
            gamma: bn.weight().clone(),
            beta: bn.bias().clone(),
            shift: conv.bias().cloned(),
            saved,
            out: out.id,
        });
        Ok(out)
    }

    fn max_pool(&mut self, x: &Act, p: &Pool2d) -> Result<Act> {
        let (y, indices) = max_pool2d_with_indices(&x.value, p)?;
        let out = self.value(y, self.needs_grad[x.id]);
        self.nodes.push(Node::MaxPool {
            x: x.id,
            indices,
            out: out.id,
        });
        Ok(out)
    }

    fn avg_pool(&mut self, x: &Act, p: &Pool2d, count_include_pad: bool) -> Result<Act> {
        let y = avg_pool2d(&x.value, p, count_include_pad)?;
        let out = self.value(y, self.needs_grad[x.id]);
        self.nodes.push(Node::AvgPool {
            x: x.id,
            dims: x.value.dims().to_vec(),
            pool: *p,
            include_pad: count_include_pad,
            out: out.id,
        });
        Ok(out)
    }

    fn cat(&mut self, xs: &[Act]) -> Result<Act> {
        let values: Vec<&Tensor> = xs.iter().map(|a| &a.value).collect();
        let y = Tensor::cat(&values, 1)?;
        let parts = xs
            .iter()
            .map(|a| Ok((a.id, a.value.dim(1)?)))
            .collect::<Result<Vec<_>>>()?;
        let needs = xs.iter().any(|a| self.needs_grad[a.id]);
        let out = self.value(y, needs);
        self.nodes.push(Node::Cat { parts, out: out.id });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeededVarMap;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarBuilder;

    /// A miniature inception network: a stem conv (with bias) + max pool, then a block
    /// whose input feeds a 1x1 branch, a 1x1 -> 3x3 branch and a padded average pool ->
    /// 1x1 branch, concatenated; a stride-2 ceil-mode max pool at the end.
    struct Net {
        stem: (Conv2d, BatchNorm2d),
        one: (Conv2d, BatchNorm2d),
        reduce: (Conv2d, BatchNorm2d),
        three: (Conv2d, BatchNorm2d),
        proj: (Conv2d, BatchNorm2d),
    }

    fn layer(
        vb: &VarBuilder,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
    ) -> (Conv2d, BatchNorm2d) {
        let cfg = Conv2dConfig {
            padding: k / 2,
            ..Default::default()
        };
        let conv = Conv2d::new(c_in, c_out, k, cfg, true, vb.pp(name)).unwrap();
        let bn = BatchNorm2d::new(c_out, 1e-5, 0.1, vb.pp(format!("{name}_bn"))).unwrap();
        (conv, bn)
    }

    impl Net {
        fn new(vb: &VarBuilder) -> Self {
            Self {
                stem: layer(vb, "stem", 2, 6, 3),
                one: layer(vb, "one", 6, 3, 1),
                reduce: layer(vb, "reduce", 6, 4, 1),
                three: layer(vb, "three", 4, 5, 3),
                proj: layer(vb, "proj", 6, 2, 1),
            }
        }

        fn forward<L: Layers>(&self, l: &mut L, x: &L::Act) -> Result<L::Act> {
            let same = Pool2d {
                kernel: 3,
                stride: 1,
                padding: 1,
                ceil_mode: true,
            };
            let reduce = Pool2d {
                kernel: 3,
                stride: 2,
                padding: 0,
                ceil_mode: true,
            };
            let h = l.conv_bn(x, &self.stem.0, &self.stem.1, true)?;
            let h = l.max_pool(&h, &reduce)?;
            let a = l.conv_bn(&h, &self.one.0, &self.one.1, true)?;
            let b = l.conv_bn(&h, &self.reduce.0, &self.reduce.1, true)?;
            let b = l.conv_bn(&b, &self.three.0, &self.three.1, false)?;
            let c = l.avg_pool(&h, &same, true)?;
            let c = l.conv_bn(&c, &self.proj.0, &self.proj.1, true)?;
            let y = l.cat(&[a, b, c])?;
            l.max_pool(&y, &reduce)
        }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        crate::cpu::values(t)
    }

    fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Gradients of Σ out ⊙ r over every variable, from candle's graph and from a tape,
    /// on two copies of the same parameters; also the outputs and running statistics.
    /// `fixed`: batch norms with (non-trivial) running statistics instead of the batch's.
    fn compare(dt: DType, tol: f64, fixed: bool) {
        let dev = Device::Cpu;
        let make = || {
            let params = SeededVarMap::new(7);
            let net = Net::new(&params.var_builder(dt, &dev));
            for (name, v) in params.named_vars() {
                let c = v.elem_count();
                let ramp = Tensor::arange(0u32, c as u32, &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                if name.ends_with("running_mean") {
                    v.set(&((ramp * 0.1).unwrap() - 0.2).unwrap()).unwrap();
                } else if name.ends_with("running_var") {
                    v.set(&((ramp * 0.3).unwrap() + 0.5).unwrap()).unwrap();
                }
            }
            (params, net)
        };
        let (p_graph, graph_net) = make();
        let (p_tape, tape_net) = make();
        let x = (Tensor::randn(0f64, 1.0, (3, 2, 11, 9), &dev).unwrap() + 0.3)
            .unwrap()
            .to_dtype(dt)
            .unwrap();

        let y_graph = graph_net.forward(&mut Graph { train: !fixed }, &x).unwrap();
        let r = Tensor::randn(0f64, 1.0, y_graph.dims(), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let grads = (&y_graph * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let mut tape = Tape::new();
        tape.set_fixed_statistics(fixed);
        let input = tape.input(&x);
        let y_tape = tape_net.forward(&mut tape, &input).unwrap();
        assert!(
            !y_tape.tensor().track_op(),
            "the tape's values stay out of the graph"
        );
        close(&values(y_tape.tensor()), &values(&y_graph), tol, "output");
        let taped = tape.backward(&y_tape, &r).unwrap();

        let by_name = |p: &SeededVarMap| -> Vec<(String, Var)> { p.named_vars() };
        let (graph_vars, tape_vars) = (by_name(&p_graph), by_name(&p_tape));
        let mut trained = 0;
        for ((name, gv), (name2, tv)) in graph_vars.iter().zip(&tape_vars) {
            assert_eq!(name, name2);
            if name.contains("running") {
                close(&values(tv.as_tensor()), &values(gv.as_tensor()), tol, name);
                continue;
            }
            let want = grads.get(gv.as_tensor());
            let got = taped
                .iter()
                .find(|(p, _)| p.id() == tv.as_tensor().id())
                .map(|(_, g)| g);
            match (want, got) {
                (Some(w), Some(g)) => {
                    assert_eq!(g.dtype(), tv.dtype(), "{name}");
                    close(&values(g), &values(w), tol, name);
                    trained += 1;
                }
                // The folded conv biases with batch statistics: no gradient either side.
                (None, None) => assert!(
                    !fixed && name.ends_with(".bias") && !name.contains("_bn"),
                    "{name}"
                ),
                (w, g) => panic!("{name}: graph {:?}, tape {:?}", w.is_some(), g.is_some()),
            }
        }
        // 5 weights, 5 scales, 5 shifts, and with fixed statistics the 5 conv biases.
        let want = if fixed { 20 } else { 15 };
        assert_eq!(trained, want);
        assert_eq!(taped.len(), want);
    }

    #[test]
    fn tape_matches_candle_autograd_f64() {
        compare(DType::F64, 1e-10, false);
        compare(DType::F64, 1e-10, true);
    }

    #[test]
    fn tape_matches_candle_autograd_f32() {
        compare(DType::F32, 1e-4, false);
        compare(DType::F32, 1e-4, true);
    }

    #[test]
    fn frozen_parameters_take_no_gradient_and_bad_gradients_are_refused() {
        let dev = Device::Cpu;
        // Plain tensors (as loaded from a checkpoint), not variables.
        let vb = VarBuilder::zeros(DType::F32, &dev);
        let (conv, bn) = layer(&vb, "l", 1, 2, 3);
        let x = Tensor::randn(0f32, 1.0, (2, 1, 5, 5), &dev).unwrap();
        let mut tape = Tape::new();
        let input = tape.input(&x);
        let y = tape.conv_bn(&input, &conv, &bn, true).unwrap();
        assert_eq!(tape.len(), 1);
        let bad = Tensor::ones((2, 2, 5, 4), DType::F32, &dev).unwrap();
        let mut other = Tape::new();
        let yo = {
            let i = other.input(&x);
            other.conv_bn(&i, &conv, &bn, true).unwrap()
        };
        assert!(other.backward(&yo, &bad).is_err());
        let g = y.tensor().ones_like().unwrap();
        assert!(tape.backward(&y, &g).unwrap().is_empty());
    }

    #[test]
    fn backward_into_adds_to_a_gradient_store() {
        let dev = Device::Cpu;
        let params = SeededVarMap::new(3);
        let vb = params.var_builder(DType::F64, &dev);
        let (conv, bn) = layer(&vb, "l", 1, 2, 1);
        let x = Tensor::randn(0f64, 1.0, (4, 1, 3, 3), &dev).unwrap();
        let run = || {
            let mut tape = Tape::new();
            let input = tape.input(&x);
            let y = tape.conv_bn(&input, &conv, &bn, false).unwrap();
            (tape, y)
        };
        let (tape, y) = run();
        let g = y.tensor().ones_like().unwrap();
        let once = tape.backward(&y, &g).unwrap();
        let w = conv.weight();
        let once_w = values(&once.iter().find(|(p, _)| p.id() == w.id()).unwrap().1);
        // A store that already holds the weight's gradient gets the sum.
        let mut store = (w * 0.0).unwrap().sum_all().unwrap().backward().unwrap();
        store.insert(w, Tensor::ones_like(w).unwrap());
        let (tape, y) = run();
        tape.backward_into(&y, &g, &mut store).unwrap();
        let got = values(store.get(w).unwrap());
        let want: Vec<f64> = once_w.iter().map(|v| v + 1.0).collect();
        close(&got, &want, 1e-12, "weight");
        assert!(store.get(bn.weight()).is_some());
    }
}
