//! Max and average pooling, forward and backward, on BN-Inception's pooling shapes at
//! batch 8 and the small CNN's 2x2 pools at batch 64, for side-by-side comparison with
//! `benches/torch_pool.py` (same shapes and settings, PyTorch's `max_pool2d` with indices,
//! `avg_pool2d`, and their backward passes).
//!
//! `cargo bench -p nofuss-tensor --bench pool -- [REPEATS] [cuda]` prints one JSON line
//! per case: op, shape, window and the median milliseconds over REPEATS timed calls
//! (after 2 warm-up calls), on the CPU or, with `cuda` (feature `cuda`), the GPU
//! (synchronised after each call). `cargo xtask bench pool` runs both and prints a table.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc; // as in the `nofuss` binary

use std::time::Instant;

use candle_core::{Device, Tensor};
use nofuss_tensor::pool::{
    avg_pool2d, avg_pool2d_backward, max_pool2d_backward, max_pool2d_with_indices, Pool2d,
};

/// (op, N, C, H = W, kernel, stride, padding): BN-Inception's pools at 224 (ceil mode; the
/// average pools count padding, as the `pretrainedmodels` port), the small CNN's.
const CASES: [(&str, usize, usize, usize, usize, usize, usize); 9] = [
    ("max", 8, 64, 112, 3, 2, 0),
    ("max", 8, 192, 56, 3, 2, 0),
    ("max", 8, 320, 28, 3, 2, 0),
    ("max", 8, 576, 14, 3, 2, 0),
    ("max", 8, 1024, 7, 3, 1, 1),
    ("avg", 8, 192, 28, 3, 1, 1),
    ("avg", 8, 576, 14, 3, 1, 1),
    ("avg", 8, 1056, 7, 3, 1, 1),
    ("max", 64, 16, 32, 2, 2, 0),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As in the `nofuss` binary (`nofuss::allocator`): freed memory is kept for reuse.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: stores an integer in mimalloc's option table.
        unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    }
    // As the `nofuss` binary does (`nofuss::threads`): candle's own element-wise worker
    // threads park almost at once instead of spinning beside rayon's on the same cores.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repeats: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(15);
    let dev = if args.iter().any(|a| a == "cuda") {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    for (op, n, c, hw, k, s, p) in CASES {
        let pool = Pool2d {
            kernel: k,
            stride: s,
            padding: p,
            ceil_mode: true,
        };
        let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?;
        let (mut fwd, mut bwd) = (vec![], vec![]);
        for i in 0..repeats + 2 {
            let t = Instant::now();
            let (dy, idx) = if op == "max" {
                let (y, idx) = max_pool2d_with_indices(&x, &pool)?;
                (y, Some(idx))
            } else {
                (avg_pool2d(&x, &pool, true)?, None)
            };
            dev.synchronize()?;
            let f = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let dx = match &idx {
                Some(idx) => max_pool2d_backward(&dy, idx)?,
                None => avg_pool2d_backward(&dy, x.dims(), &pool, true)?,
            };
            dev.synchronize()?;
            let b = t.elapsed().as_secs_f64() * 1e3;
            drop(dx);
            if i >= 2 {
                fwd.push(f);
                bwd.push(b);
            }
        }
        for (pass, times) in [("forward", fwd), ("backward", bwd)] {
            println!(
                "{{\"impl\":\"nofuss-tensor\",\"device\":\"{}\",\"op\":\"{op}\",\"pass\":\"{pass}\",\"shape\":[{n},{c},{hw},{hw}],\"window\":[{k},{s},{p}],\"repeats\":{repeats},\"median_ms\":{:.3}}}",
                if dev.is_cuda() { "cuda" } else { "cpu" },
                median(times)
            );
        }
    }
    Ok(())
}
