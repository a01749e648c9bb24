//! Times candle's CPU conv2d forward and backward for the small CNN's layer shapes.
use candle_core::{Device, Tensor, Var};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(n, c, hw, o) in &[
        (64usize, 1usize, 32usize, 32usize),
        (64, 32, 16, 64),
        (64, 64, 8, 128),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (o, c, 3, 3), &dev)?)?;
        let mut f = Vec::new();
        let mut b = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let y = x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1)?;
            let s = y.sum_all()?;
            s.to_scalar::<f32>()?;
            f.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let g = s.backward()?;
            let _ = g.get(&w);
            b.push(t.elapsed().as_secs_f64());
        }
        f.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        println!(
            "{n}x{c}x{hw}x{hw} -> {o}: fwd {:.1} ms, bwd {:.1} ms",
            f[2] * 1e3,
            b[2] * 1e3
        );
    }
    Ok(())
}
