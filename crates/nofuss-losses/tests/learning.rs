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
