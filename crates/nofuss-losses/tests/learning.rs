//! Proxy-NCA must actually learn: a linear embedding of noisy clusters, trained with
//! learned proxies, ends with a lower loss and every point nearest to its class proxy.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, Optimizer, VarBuilder};
use nofuss_losses::{ProxyInit, ProxyNca, ProxyNcaConfig, ProxyNcaForm};
use nofuss_tensor::SeededVarMap;

fn clusters(dev: &Device) -> (Tensor, Tensor) {
    // 4 classes in 6-D, 16 points each, centres on the axes, deterministic jitter.
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for c in 0..4u32 {
        for i in 0..16u32 {
            for d in 0..6u32 {
                let centre = if d == c { 2.0 } else { 0.0 };
                let jitter = (((c * 97 + i * 31 + d * 7) % 23) as f32 / 23.0 - 0.5) * 0.8;
                xs.push(centre + jitter);
            }
            ys.push(c);
        }
    }
    (
        Tensor::from_vec(xs, (64, 6), dev).unwrap(),
        Tensor::from_vec(ys, 64, dev).unwrap(),
    )
}

fn train(form: ProxyNcaForm) -> (f32, f32, f32) {
    let dev = Device::Cpu;
    let (x, y) = clusters(&dev);
    let params = SeededVarMap::new(3);
    let vb: VarBuilder = params.var_builder(DType::F32, &dev);
    let lin: Linear = candle_nn::linear(6, 8, vb.pp("embed")).unwrap();
    let cfg = ProxyNcaConfig {
        form,
        ..Default::default()
    };
    let loss_fn = ProxyNca::new(4, 8, ProxyInit::Normal, cfg, vb.pp("loss")).unwrap();
    let mut opt = candle_nn::SGD::new(params.var_map().all_vars(), 0.05).unwrap();
    let loss = |lin: &Linear| loss_fn.loss(&lin.forward(&x).unwrap(), &y).unwrap();
    let first = loss(&lin).to_scalar::<f32>().unwrap();
    for _ in 0..300 {
        opt.backward_step(&loss(&lin)).unwrap();
    }
    let last = loss(&lin).to_scalar::<f32>().unwrap();
    // Fraction of points whose nearest proxy (by cosine) is their class proxy.
    let e = lin.forward(&x).unwrap();
    let sims = e.matmul(&loss_fn.proxies().t().unwrap()).unwrap();
    let en = e.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    let pn = loss_fn
        .proxies()
        .sqr()
        .unwrap()
        .sum_keepdim(1)
        .unwrap()
        .sqrt()
        .unwrap()
        .t()
        .unwrap();
    let cos = sims.broadcast_div(&en).unwrap().broadcast_div(&pn).unwrap();
    let pred = cos.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let truth = y.to_vec1::<u32>().unwrap();
    let acc = pred.iter().zip(&truth).filter(|(a, b)| a == b).count() as f32 / 64.0;
    (first, last, acc)
}

#[test]
fn paper_form_learns() {
    let (first, last, acc) = train(ProxyNcaForm::Paper);
    assert!(last < first - 2.0, "loss {first} -> {last}");
    assert_eq!(acc, 1.0);
}

#[test]
fn softmax_form_learns() {
    let (first, last, acc) = train(ProxyNcaForm::Softmax);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert_eq!(acc, 1.0);
}

/// Trains a linear embedding with `loss` (given embeddings, labels and the proxies)
/// for `steps` SGD steps; returns the first and last loss and the 1-nearest-neighbour
/// accuracy of the embedded points (leave-one-out).
fn train_any(
    num_proxies: usize,
    steps: usize,
    lr: f64,
    loss: impl Fn(&Tensor, &Tensor, &Tensor) -> nofuss_losses::Result<Tensor>,
) -> (f32, f32, f32) {
    let dev = Device::Cpu;
    let (x, y) = clusters(&dev);
    let params = SeededVarMap::new(5);
    let vb: VarBuilder = params.var_builder(DType::F32, &dev);
    let lin: Linear = candle_nn::linear(6, 8, vb.pp("embed")).unwrap();
    let proxies =
        nofuss_losses::create_proxies(num_proxies, 8, ProxyInit::Normal, vb.pp("loss")).unwrap();
    let mut opt = candle_nn::SGD::new(params.var_map().all_vars(), lr).unwrap();
    let eval = |lin: &Linear| loss(&lin.forward(&x).unwrap(), &y, &proxies).unwrap();
    let first = eval(&lin).to_scalar::<f32>().unwrap();
    for _ in 0..steps {
        opt.backward_step(&eval(&lin)).unwrap();
    }
    let last = eval(&lin).to_scalar::<f32>().unwrap();
    let e = nofuss_tensor::ops::l2_normalize_rows(&lin.forward(&x).unwrap()).unwrap();
    let d = nofuss_losses::pairwise_squared_distances(&e, &e)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let truth = y.to_vec1::<u32>().unwrap();
    let hits = (0..64)
        .filter(|&i| {
            let nn = (0..64)
                .filter(|&j| j != i)
                .min_by(|&a, &b| d[i][a].total_cmp(&d[i][b]))
                .unwrap();
            truth[nn] == truth[i]
        })
        .count();
    (first, last, hits as f32 / 64.0)
}

#[test]
fn every_loss_decreases_and_separates_the_clusters() {
    use nofuss_losses::*;
    let dynamic = ProxyNcaConfig {
        assignment: Assignment::Dynamic,
        ..Default::default()
    };
    let runs: Vec<(&str, (f32, f32, f32))> = vec![
        (
            "proxy-triplet",
            train_any(4, 200, 0.2, |e, y, p| {
                proxy_triplet(e, y, p, &ProxyTripletConfig::default())
            }),
        ),
        (
            "proxy-triplet, 2 hardest",
            train_any(4, 200, 0.2, |e, y, p| {
                let c = ProxyTripletConfig {
                    hardest_negatives: Some(2),
                    ..Default::default()
                };
                proxy_triplet(e, y, p, &c)
            }),
        ),
        (
            // With 4 proxies for 4 classes this toy collapses: two classes that start on
            // one proxy never get pushed apart (that proxy is no negative of either).
            "proxy-nca dynamic, 8 proxies",
            train_any(8, 300, 0.2, |e, y, p| proxy_nca(e, y, p, &dynamic)),
        ),
        (
            "triplet all",
            train_any(1, 200, 0.2, |e, y, _| {
                triplet_loss(e, y, &TripletConfig::default())
            }),
        ),
        (
            "triplet semi-hard",
            train_any(1, 200, 0.2, |e, y, _| {
                let c = TripletConfig {
                    mining: TripletMining::SemiHard,
                    ..Default::default()
                };
                triplet_loss(e, y, &c)
            }),
        ),
        (
            "nca",
            train_any(1, 200, 0.2, |e, y, _| {
                nca_loss(
                    e,
                    y,
                    &NcaConfig {
                        scale: 4.0,
                        ..Default::default()
                    },
                )
            }),
        ),
    ];
    for (name, (first, last, acc)) in runs {
        assert!(last < 0.7 * first, "{name}: loss {first} -> {last}");
        assert!(acc >= 0.95, "{name}: 1-NN accuracy {acc}");
    }
}

#[test]
fn losses_are_invariant_to_the_scale_of_the_embeddings() {
    use nofuss_losses::*;
    let dev = Device::Cpu;
    let (x, y) = clusters(&dev);
    let p = Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap();
    let x7 = (&x * 7.0).unwrap();
    let dynamic = ProxyNcaConfig {
        assignment: Assignment::Dynamic,
        ..Default::default()
    };
    type LossFn<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
    let fns: Vec<(&str, LossFn<'_>)> = vec![
        (
            "proxy-nca",
            Box::new(|e| proxy_nca(e, &y, &p, &ProxyNcaConfig::default()).unwrap()),
        ),
        (
            "proxy-nca dynamic",
            Box::new(|e| proxy_nca(e, &y, &p, &dynamic).unwrap()),
        ),
        (
            "proxy-triplet",
            Box::new(|e| proxy_triplet(e, &y, &p, &ProxyTripletConfig::default()).unwrap()),
        ),
        (
            "triplet",
            Box::new(|e| triplet_loss(e, &y, &TripletConfig::default()).unwrap()),
        ),
        (
            "nca",
            Box::new(|e| nca_loss(e, &y, &NcaConfig::default()).unwrap()),
        ),
    ];
    for (name, f) in fns {
        let a = f(&x).to_scalar::<f32>().unwrap();
        let b = f(&x7).to_scalar::<f32>().unwrap();
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "{name}: {a} vs {b}"
        );
    }
}

#[test]
fn dynamic_equals_static_with_one_proxy_per_class_at_the_class_means() {
    use nofuss_losses::*;
    let dev = Device::Cpu;
    let (x, y) = clusters(&dev);
    // Proxies at the class means: every point's nearest proxy is its class's.
    let means: Vec<Tensor> = (0..4)
        .map(|c| x.narrow(0, c * 16, 16).unwrap().mean_keepdim(0).unwrap())
        .collect();
    let p = Tensor::cat(&means, 0).unwrap();
    for form in [ProxyNcaForm::Paper, ProxyNcaForm::Softmax] {
        let st = ProxyNcaConfig {
            form,
            ..Default::default()
        };
        let dy = ProxyNcaConfig {
            assignment: Assignment::Dynamic,
            ..st
        };
        let a = proxy_nca(&x, &y, &p, &st)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let b = proxy_nca(&x, &y, &p, &dy)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((a - b).abs() < 1e-5, "{form:?}: static {a} vs dynamic {b}");
    }
    let st = ProxyTripletConfig::default();
    let dy = ProxyTripletConfig {
        assignment: Assignment::Dynamic,
        ..st
    };
    let a = proxy_triplet(&x, &y, &p, &st)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let b = proxy_triplet(&x, &y, &p, &dy)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (a - b).abs() < 1e-6,
        "proxy-triplet: static {a} vs dynamic {b}"
    );
}
