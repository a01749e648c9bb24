//! Small tensor operations shared by the crates above.

use candle_core::{Result, Tensor};

/// Divides each row of `x` (`[N, D]`) by its L2 norm; rows with a norm below `1e-12`
/// are divided by `1e-12` instead, so a zero row stays zero rather than becoming NaN.
/// Differentiable.
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn unit_rows_and_zero_rows() {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let y = l2_normalize_rows(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
    }
}
