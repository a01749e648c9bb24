//! Proxy-NCA's per-row objective at Stanford Online Products' size (11,318 proxies, 64-d),
//! computed straight from the points and the proxies (`ops::nca_rows_from_points`: on the
//! CPU one operation, no `[N, P]` tensor in the graph) and as the composition it replaces
//! (`pairwise_squared_distances` then `nca_rows`), with both gradients and the time of
//! each, forward and backward.
//!
//! ```sh
//! cargo run --release -p nofuss-tensor --example proxy_rows            # auto: GPU if built with it
//! cargo run --release -p nofuss-tensor --example proxy_rows -- cpu 256 # device, batch size
//! ```

use std::time::Instant;

use candle_core::{Tensor, Var};
use nofuss_tensor::ops::{
    nca_rows, nca_rows_from_points, pairwise_squared_distances, scaled_l2_normalize_rows,
};
use nofuss_tensor::DeviceSpec;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let spec: DeviceSpec = args.next().unwrap_or("auto".into()).parse()?;
    let n: usize = args.next().map_or(Ok(32), |a| a.parse())?;
    let (p, d) = (11_318usize, 64usize);
    let picked = spec.select()?;
    println!(
        "device: {}; {n} embeddings, {p} proxies of dimension {d}",
        picked.description
    );
    let dev = &picked.device;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), dev)?)?;
    let proxies = Var::from_tensor(&Tensor::randn(0f32, 0.125, (p, d), dev)?)?;
    let labels: Vec<u32> = (0..n as u32).map(|i| i * 7 % p as u32).collect();
    let labels = Tensor::from_vec(labels, n, dev)?;

    // Proxy-NCA as in the paper (positive left out of the denominator), scale 3.
    let loss = |fused: bool| -> candle_core::Result<Tensor> {
        let xs = scaled_l2_normalize_rows(x.as_tensor(), 3.0)?;
        let ps = scaled_l2_normalize_rows(proxies.as_tensor(), 3.0)?;
        let rows = if fused {
            nca_rows_from_points(&xs, &ps, &labels, true, 0.0)?
        } else {
            nca_rows(&pairwise_squared_distances(&xs, &ps)?, &labels, true, 0.0)?
        };
        rows.mean(0)
    };
    let mut results = Vec::new();
    for (name, fused) in [("from the points", true), ("composed", false)] {
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..7 {
            let t = Instant::now();
            let l = loss(fused)?;
            let grads = l.backward()?;
            let gx = grads.get(x.as_tensor()).ok_or("no embedding gradient")?;
            let gp = grads.get(proxies.as_tensor()).ok_or("no proxy gradient")?;
            let summary = (
                l.to_scalar::<f32>()?,
                gx.abs()?.sum_all()?.to_scalar::<f32>()?,
                gp.abs()?.sum_all()?.to_scalar::<f32>()?,
            );
            times.push(t.elapsed().as_secs_f64() * 1e3);
            last = Some(summary);
        }
        times.sort_by(f64::total_cmp);
        let (l, gx, gp) = last.ok_or("no run")?;
        println!(
            "{name:>15}: loss {l:.6}, |dL/dx| {gx:.6}, |dL/dP| {gp:.6}, median {:.2} ms (forward + backward)",
            times[times.len() / 2]
        );
        results.push((l, gx, gp));
    }
    let (a, b) = (results[0], results[1]);
    let close = |u: f32, v: f32| (u - v).abs() <= 1e-4 * v.abs().max(1.0);
    if close(a.0, b.0) && close(a.1, b.1) && close(a.2, b.2) {
        println!("both give the same loss and gradients (to 1e-4)");
        Ok(())
    } else {
        Err(format!("the two differ: {a:?} vs {b:?}").into())
    }
}
