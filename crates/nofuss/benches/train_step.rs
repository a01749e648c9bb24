//! Training-step throughput, for side-by-side comparison with
//! `benches/torch_train_step.py` (same model, loss, optimiser and input).
//!
//! `cargo bench -p nofuss --bench train_step -- [BATCH] [STEPS]` prints one JSON line:
//! median milliseconds per step and images per second over STEPS timed steps (after 3
//! warm-up steps), on synthetic device-resident input, for the default small CNN. The
//! binary offers the same for every backbone and device:
//! `nofuss bench train-step --backbone bn-inception --batch-size 32 --device cuda`.
//! `cargo xtask bench train-step` runs this and the PyTorch script.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc; // as in the `nofuss` binary

use nofuss::bench::{train_step, TrainStepBench};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    nofuss::allocator::keep_freed_memory(); // as in the `nofuss` binary
    nofuss::threads::park_idle_candle_workers(); // as in the `nofuss` binary
                                                 // `cargo bench` passes `--bench`; keep only numbers.
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let b = TrainStepBench {
        batch_size: nums.first().copied().unwrap_or(64),
        steps: nums.get(1).copied().unwrap_or(20),
        device: "cpu".into(),
        ..Default::default()
    };
    println!("{}", train_step(&b)?);
    Ok(())
}
