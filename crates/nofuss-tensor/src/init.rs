use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr_lite::standard_normal;

use crate::Error;

/// A [`VarMap`] whose new parameters are drawn from a seeded generator.
///
/// candle's CPU backend has no seedable generator, so models built from a plain
/// `VarMap` differ from run to run. Each parameter here is drawn from ChaCha8 seeded
/// with the run seed and the parameter's full name, so values do not depend on the
/// order in which layers are built. It follows every [`Init`] variant exactly as
/// `candle_nn::Init::var` defines it (PyTorch's fan-in/fan-out conventions).
#[derive(Clone)]
pub struct SeededVarMap {
    seed: u64,
    map: VarMap,
}

impl SeededVarMap {
    /// An empty map drawing from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            map: VarMap::new(),
        }
    }

    /// The underlying candle map (save, load, `all_vars`).
    pub fn var_map(&self) -> &VarMap {
        &self.map
    }

    /// Every variable with its name, sorted by name (a deterministic order).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.map.data().lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A `VarBuilder` that creates missing parameters in this map.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn draw(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ fnv1a(name.as_bytes()));
        let n = shape.elem_count();
        let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (mean + std * standard_normal(rng)) as f32)
                .collect()
        };
        let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
            (0..n).map(|_| rng.gen_range(lo..up) as f32).collect()
        };
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.map.data().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                return Err(candle_core::Error::wrap(Error::ShapeMismatch {
                    name: name.to_string(),
                    existing: var.dims().to_vec(),
                    requested: s.dims().to_vec(),
                }));
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.draw(&s, name, h);
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self.map.data().lock().unwrap_or_else(|p| p.into_inner());
        data.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let data = self.map.data().lock().unwrap_or_else(|p| p.into_inner());
        data.contains_key(name)
    }
}

/// FNV-1a: a stable (across Rust versions and platforms) hash of parameter names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A standard normal sampler (Box–Muller), so this crate needs no `rand_distr`.
mod rand_distr_lite {
    use rand::Rng;

    pub fn standard_normal<R: Rng>(rng: &mut R) -> f64 {
        let u1: f64 = 1.0 - rng.gen::<f64>(); // in (0, 1]
        let u2: f64 = rng.gen();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::init::{DEFAULT_KAIMING_NORMAL, DEFAULT_KAIMING_UNIFORM};

    fn stats(t: &Tensor) -> (f32, f32) {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = v.len() as f32;
        let mean = v.iter().sum::<f32>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn same_seed_same_values_any_order() {
        let a = SeededVarMap::new(7);
        let va = a.var_builder(DType::F32, &Device::Cpu);
        let x1 = va
            .get_with_hints((8, 8), "x", DEFAULT_KAIMING_NORMAL)
            .unwrap();
        let y1 = va
            .get_with_hints((8, 8), "y", DEFAULT_KAIMING_NORMAL)
            .unwrap();
        let b = SeededVarMap::new(7);
        let vb = b.var_builder(DType::F32, &Device::Cpu);
        let y2 = vb
            .get_with_hints((8, 8), "y", DEFAULT_KAIMING_NORMAL)
            .unwrap();
        let x2 = vb
            .get_with_hints((8, 8), "x", DEFAULT_KAIMING_NORMAL)
            .unwrap();
        assert_eq!(x1.to_vec2::<f32>().unwrap(), x2.to_vec2::<f32>().unwrap());
        assert_eq!(y1.to_vec2::<f32>().unwrap(), y2.to_vec2::<f32>().unwrap());
        assert_ne!(x1.to_vec2::<f32>().unwrap(), y1.to_vec2::<f32>().unwrap());
        let c = SeededVarMap::new(8);
        let x3 = c
            .var_builder(DType::F32, &Device::Cpu)
            .get_with_hints((8, 8), "x", DEFAULT_KAIMING_NORMAL)
            .unwrap();
        assert_ne!(x1.to_vec2::<f32>().unwrap(), x3.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn distributions_follow_the_init() {
        let m = SeededVarMap::new(1);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        // Kaiming normal, fan-in 64*3*3: std = sqrt(2/576)
        let w = vb
            .get_with_hints((128, 64, 3, 3), "conv", DEFAULT_KAIMING_NORMAL)
            .unwrap();
        let (mean, std) = stats(&w);
        let expected = (2.0f32 / 576.0).sqrt();
        assert!(mean.abs() < 0.01 * expected * 10.0, "mean {mean}");
        assert!(
            (std / expected - 1.0).abs() < 0.03,
            "std {std} vs {expected}"
        );
        // Kaiming uniform: bound sqrt(3)*std, so std of the uniform equals std.
        let u = vb
            .get_with_hints((128, 64, 3, 3), "convu", DEFAULT_KAIMING_UNIFORM)
            .unwrap();
        let v = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bound = 3f32.sqrt() * expected;
        assert!(v.iter().all(|x| x.abs() <= bound));
        let (_, ustd) = stats(&u);
        assert!((ustd / expected - 1.0).abs() < 0.03);
        let c = vb.get_with_hints(5, "c", Init::Const(0.5)).unwrap();
        assert_eq!(c.to_vec1::<f32>().unwrap(), vec![0.5; 5]);
        let r = vb
            .get_with_hints(
                20_000,
                "r",
                Init::Randn {
                    mean: 3.0,
                    stdev: 0.5,
                },
            )
            .unwrap();
        let (rm, rs) = stats(&r);
        assert!(
            (rm - 3.0).abs() < 0.02 && (rs - 0.5).abs() < 0.02,
            "{rm} {rs}"
        );
    }

    #[test]
    fn reuses_and_checks_shapes() {
        let m = SeededVarMap::new(1);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let a = vb.get_with_hints(3, "a", Init::Const(1.0)).unwrap();
        let again = vb.get_with_hints(3, "a", Init::Const(9.0)).unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), again.to_vec1::<f32>().unwrap());
        let err = vb.get_with_hints(4, "a", Init::Const(1.0)).unwrap_err();
        assert!(err.to_string().contains("parameter 'a'"), "{err}");
        assert_eq!(m.named_vars().len(), 1);
        assert_eq!(m.var_map().all_vars().len(), 1);
    }
}
