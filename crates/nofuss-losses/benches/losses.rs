//! Forward + backward time of Proxy-NCA (paper form, static proxies) and Proxy-Triplet
//! (all negatives, and the 10 hardest: `proxy-triplet-hard10`), for side-by-side
//! comparison with `benches/torch_losses.py` (same shapes, same formulas, CPU).
//!
//! `cargo bench -p nofuss-losses --bench losses -- [REPEATS] [LOSS...]` prints one JSON
//! line per case: loss, N, D, P and the median milliseconds over REPEATS timed runs
//! (after 2 warm-up runs); LOSS names limit the losses. `cargo xtask bench losses` runs
//! both and prints a table.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc; // as in the `nofuss` binary

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use nofuss_losses::{proxy_nca, proxy_triplet, ProxyNcaConfig, ProxyTripletConfig};

/// The losses timed, as the PyTorch script names them.
const LOSSES: [&str; 3] = ["proxy-nca", "proxy-triplet", "proxy-triplet-hard10"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As in the `nofuss` binary (`nofuss::allocator`): never return freed memory to the
    // system (option 15, mi_option_purge_delay, -1; mimalloc 3 purges all free memory of
    // an arena 1 s after the first free), so repeated runs reuse their buffers instead of
    // faulting them in again.
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
    let repeats: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(20);
    // Flags (cargo passes `--bench`) and the repeat count aside, every word names a loss.
    let only: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with('-') && a.parse::<usize>().is_err())
        .collect();
    if let Some(bad) = only.iter().find(|a| !LOSSES.contains(&a.as_str())) {
        return Err(format!("unknown loss {bad:?}; the losses are {}", LOSSES.join(", ")).into());
    }
    let dev = Device::Cpu;
    for loss in LOSSES {
        if !only.is_empty() && !only.iter().any(|o| *o == loss) {
            continue;
        }
        for &n in &[32usize, 256] {
            for &d in &[64usize, 512] {
                for &p in &[100usize, 11318] {
                    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev)?)?;
                    let pr = Var::from_tensor(&Tensor::randn(0f32, 1.0, (p, d), &dev)?)?;
                    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7) % p as u32).collect();
                    let y = Tensor::from_vec(labels, n, &dev)?;
                    let mut times = Vec::with_capacity(repeats);
                    for i in 0..repeats + 2 {
                        let t = Instant::now();
                        let l = match loss {
                            "proxy-nca" => proxy_nca(
                                x.as_tensor(),
                                &y,
                                pr.as_tensor(),
                                &ProxyNcaConfig::default(),
                            )?,
                            _ => proxy_triplet(
                                x.as_tensor(),
                                &y,
                                pr.as_tensor(),
                                &ProxyTripletConfig {
                                    hardest_negatives: (loss == "proxy-triplet-hard10")
                                        .then_some(10),
                                    ..Default::default()
                                },
                            )?,
                        };
                        let g = l.backward()?;
                        let gx = g.get(x.as_tensor()).ok_or("no gradient")?;
                        gx.sum_all()?.to_scalar::<f32>()?;
                        if i >= 2 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                    }
                    times.sort_by(f64::total_cmp);
                    let med = times[times.len() / 2];
                    println!(
                        "{}",
                        serde_json::json!({
                            "impl": "nofuss (candle 0.11.1)",
                            "loss": loss, "n": n, "d": d, "p": p,
                            "median_ms": (med * 1e5).round() / 100.0,
                        })
                    );
                }
            }
        }
    }
    Ok(())
}
