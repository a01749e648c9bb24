//! Reseeding proxies that no example uses, for dynamic assignment.
//!
//! With dynamic assignment a proxy that is nobody's nearest gets no positive pull, only
//! pushes as a negative, and drifts away for good; at the start of training, when an
//! untrained network maps most examples to one point, nearly every proxy is in that state
//! and batches have nothing to compare. [`ProxyReseeder`] watches which proxies the
//! examples of each batch are assigned to and moves a proxy unused for `after` steps onto
//! the embedding of an example of the current batch (drawn from a seeded generator), as
//! k-means restarts an empty cluster. It is not part of the paper's method: an option, off
//! unless asked for.

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{LossError, Result};

/// Tracks proxy usage and reseeds unused proxies.
#[derive(Debug, Clone)]
pub struct ProxyReseeder {
    after: u64,
    last_used: Vec<u64>,
    seed: u64,
    reseeded: u64,
}

impl ProxyReseeder {
    /// A reseeder for `num_proxies` proxies that moves a proxy after `after` steps without
    /// an assigned example (at least 1), drawing examples with a generator seeded by `seed`.
    pub fn new(num_proxies: usize, after: u64, seed: u64) -> Self {
        Self {
            after: after.max(1),
            last_used: vec![0; num_proxies],
            seed,
            reseeded: 0,
        }
    }

    /// The step at which each proxy was last used (or moved): the state to checkpoint.
    pub fn last_used(&self) -> &[u64] {
        &self.last_used
    }

    /// Restores [`ProxyReseeder::last_used`] (a resumed run then reseeds as the
    /// uninterrupted one would: the draws depend only on the seed and the step).
    pub fn set_last_used(&mut self, last_used: Vec<u64>) -> Result<()> {
        if last_used.len() != self.last_used.len() {
            return Err(LossError::Config(format!(
                "reseeder state for {} proxies, expected {}",
                last_used.len(),
                self.last_used.len()
            )));
        }
        self.last_used = last_used;
        Ok(())
    }

    /// Proxies moved so far.
    pub fn reseeded(&self) -> u64 {
        self.reseeded
    }

    /// Records the nearest proxy (cosine, as the losses normalise both sides) of every
    /// embedding of this batch (`[N, D]`, step `step`, counted from 1), then moves every
    /// proxy unused for `after` steps onto a randomly drawn embedding of the batch.
    /// Returns how many proxies moved.
    pub fn step(&mut self, embeddings: &Tensor, proxies: &Var, step: u64) -> Result<usize> {
        let (p, d) = proxies.dims2()?;
        if p != self.last_used.len() {
            return Err(LossError::Config(format!(
                "reseeder for {} proxies given {p}",
                self.last_used.len()
            )));
        }
        let x: Vec<Vec<f64>> = embeddings.detach().to_dtype(DType::F64)?.to_vec2()?;
        if x.is_empty() {
            return Ok(0);
        }
        if x[0].len() != d {
            return Err(LossError::Config(format!(
                "embeddings of dimension {} for proxies of dimension {d}",
                x[0].len()
            )));
        }
        let mut pr: Vec<Vec<f64>> = proxies.as_tensor().to_dtype(DType::F64)?.to_vec2()?;
        let unit = |v: &[f64]| {
            let n = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
            v.iter().map(|a| a / n).collect::<Vec<f64>>()
        };
        let pu: Vec<Vec<f64>> = pr.iter().map(|r| unit(r)).collect();
        for e in &x {
            let eu = unit(e);
            let mut best = (0usize, f64::NEG_INFINITY);
            for (j, q) in pu.iter().enumerate() {
                let c: f64 = eu.iter().zip(q).map(|(a, b)| a * b).sum();
                if c > best.1 {
                    best = (j, c);
                }
            }
            self.last_used[best.0] = step;
        }
        let mut moved = 0;
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for (row, used) in pr.iter_mut().zip(self.last_used.iter_mut()) {
            if step.saturating_sub(*used) >= self.after {
                let pick = rng.gen_range(0..x.len());
                *row = x[pick].clone();
                *used = step;
                moved += 1;
            }
        }
        if moved > 0 {
            let flat: Vec<f64> = pr.into_iter().flatten().collect();
            let t = Tensor::from_vec(flat, (p, d), proxies.device())?.to_dtype(proxies.dtype())?;
            proxies.set(&t)?;
            self.reseeded += moved as u64;
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn unused_proxies_move_onto_examples_after_the_wait() {
        let dev = Device::Cpu;
        // Every example is nearest to proxy 0; proxies 1 and 2 are never used.
        let x = Tensor::new(&[[1f32, 0.1], [0.9, 0.0], [1.0, -0.1]], &dev).unwrap();
        let p = Var::new(&[[1f32, 0.0], [-1.0, 0.0], [0.0, -1.0]], &dev).unwrap();
        let mut r = ProxyReseeder::new(3, 2, 7);
        assert_eq!(r.step(&x, &p, 1).unwrap(), 0);
        // Step 2: two steps since their last use (start counts as step 0).
        assert_eq!(r.step(&x, &p, 2).unwrap(), 2);
        let now: Vec<Vec<f32>> = p.as_tensor().to_vec2().unwrap();
        assert_eq!(now[0], vec![1.0, 0.0]);
        let rows: Vec<Vec<f32>> = x.to_vec2().unwrap();
        for moved in &now[1..] {
            assert!(rows.contains(moved), "{moved:?}");
        }
        assert_eq!(r.reseeded(), 2);
        // The same seed moves them the same way.
        let p2 = Var::new(&[[1f32, 0.0], [-1.0, 0.0], [0.0, -1.0]], &dev).unwrap();
        let mut r2 = ProxyReseeder::new(3, 2, 7);
        r2.step(&x, &p2, 1).unwrap();
        r2.step(&x, &p2, 2).unwrap();
        assert_eq!(
            p2.as_tensor().to_vec2::<f32>().unwrap(),
            p.as_tensor().to_vec2::<f32>().unwrap()
        );
        assert!(ProxyReseeder::new(4, 1, 0).step(&x, &p, 3).is_err());
    }
}
