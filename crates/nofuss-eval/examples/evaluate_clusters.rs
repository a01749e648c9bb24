//! Evaluates synthetic embeddings: Recall@K and NMI of noisy class clusters.
//!
//! `cargo run --release -p nofuss-eval --example evaluate_clusters -- [NOISE]`

use nofuss_eval::{evaluate, EvalConfig};
use rand::{Rng, SeedableRng};

fn main() -> Result<(), nofuss_eval::EvalError> {
    let noise: f32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.8);
    let (classes, per_class, dim) = (50, 40, 16);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let centres: Vec<f32> = (0..classes * dim)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let (mut emb, mut labels) = (Vec::new(), Vec::new());
    for c in 0..classes {
        for _ in 0..per_class {
            emb.extend((0..dim).map(|d| centres[c * dim + d] + noise * rng.gen_range(-1.0..1.0)));
            labels.push(c as u32);
        }
    }
    let report = evaluate(&emb, dim, &labels, &EvalConfig::default())?;
    for (k, r) in &report.recall {
        println!("Recall@{k}: {r:.4}");
    }
    println!("NMI: {:.4}", report.nmi.unwrap_or(f64::NAN));
    Ok(())
}
