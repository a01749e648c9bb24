use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Channel order of a network's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue (torchvision models).
    #[default]
    Rgb,
    /// Blue, green, red (Caffe-trained models such as the public BN-Inception weights).
    Bgr,
}

/// How 8-bit pixels become network input: `(pixel * scale - mean[c]) / std[c]`, with
/// channels reordered first when `order` is BGR.
///
/// This type is the contract between a backbone (which knows what its weights expect)
/// and the data pipeline (which produces the tensors); it lives here so that neither
/// crate depends on the other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Multiplies the raw 0-255 value first (1/255 for unit range, 1 for 0-255).
    pub scale: f32,
    /// Per-channel mean, in the network's channel order (one value for grayscale).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, in the network's channel order.
    pub std: Vec<f32>,
    /// Channel order the network expects.
    pub order: ChannelOrder,
}

impl Normalization {
    /// ImageNet statistics of torchvision: RGB in `[0, 1]`, mean (0.485, 0.456, 0.406),
    /// std (0.229, 0.224, 0.225).
    pub fn imagenet_rgb() -> Self {
        Self {
            scale: 1.0 / 255.0,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            order: ChannelOrder::Rgb,
        }
    }

    /// The convention of the public BN-Inception weights: BGR, 0-255, mean
    /// (104, 117, 128), std 1.
    pub fn bn_inception_bgr() -> Self {
        Self {
            scale: 1.0,
            mean: vec![104.0, 117.0, 128.0],
            std: vec![1.0, 1.0, 1.0],
            order: ChannelOrder::Bgr,
        }
    }

    /// Maps 0-255 to [-1, 1] for any number of channels (used by the small CNN).
    pub fn symmetric(channels: usize) -> Self {
        Self {
            scale: 1.0 / 255.0,
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
            order: ChannelOrder::Rgb,
        }
    }

    /// Number of channels this normalisation is defined for.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// Per network channel, `(mul, add)` with `value = byte * mul + add`: `mul = scale / std`,
    /// `add = -mean / std`. The photo pipeline's host path and [`Self::normalize_bytes`]
    /// both compute exactly this, so they agree to the bit.
    pub fn coefficients(&self) -> Vec<(f32, f32)> {
        self.mean
            .iter()
            .zip(&self.std)
            .map(|(&m, &s)| {
                let inv = 1.0 / s;
                (self.scale * inv, -m * inv)
            })
            .collect()
    }

    /// Normalises 8-bit pixels already in the network's channel order, `[B, C, H, W]` u8,
    /// on their own device: `byte * mul + add` per channel ([`Self::coefficients`]), f32
    /// out. So a batch can travel to the GPU as bytes (a quarter of the f32 traffic) and
    /// become network input there.
    pub fn normalize_bytes(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c, _, _) = pixels.dims4()?;
        if pixels.dtype() != DType::U8 || c != self.channels() {
            candle_core::bail!(
                "normalize_bytes: u8 [B, {}, H, W] pixels expected, got {:?} {:?}",
                self.channels(),
                pixels.dtype(),
                pixels.dims()
            );
        }
        let (mul, add): (Vec<f32>, Vec<f32>) = self.coefficients().into_iter().unzip();
        let dev = pixels.device();
        let mul = Tensor::from_vec(mul, (1, c, 1, 1), dev)?;
        let add = Tensor::from_vec(add, (1, c, 1, 1), dev)?;
        pixels
            .to_dtype(DType::F32)?
            .broadcast_mul(&mul)?
            .broadcast_add(&add)
    }

    /// Normalises one image stored as `[C,H,W]` 8-bit RGB (or grayscale) into `out`
    /// (same layout, the network's channel order).
    ///
    /// Panics only on a programming error: `src` and `out` lengths that disagree or are
    /// not a multiple of the channel count.
    pub fn apply_chw(&self, src: &[u8], out: &mut [f32]) {
        let c = self.channels();
        assert!(c > 0 && src.len() == out.len() && src.len().is_multiple_of(c));
        let plane = src.len() / c;
        for ch in 0..c {
            let src_ch = match self.order {
                ChannelOrder::Bgr if c == 3 => 2 - ch,
                _ => ch,
            };
            let (m, inv_s) = (self.mean[ch], 1.0 / self.std[ch]);
            let s = &src[src_ch * plane..(src_ch + 1) * plane];
            for (o, &p) in out[ch * plane..(ch + 1) * plane].iter_mut().zip(s) {
                *o = (p as f32 * self.scale - m) * inv_s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bgr_swaps_and_subtracts() {
        // A 1-pixel RGB image (10, 20, 30).
        let mut out = [0f32; 3];
        Normalization::bn_inception_bgr().apply_chw(&[10, 20, 30], &mut out);
        assert_eq!(out, [30.0 - 104.0, 20.0 - 117.0, 10.0 - 128.0]);
    }

    #[test]
    fn byte_normalisation_refuses_other_inputs() {
        // Values are checked on every device by tests/ops_parity.rs.
        let norm = Normalization::imagenet_rgb();
        let t = Tensor::zeros((2, 3, 2, 2), DType::U8, &candle_core::Device::Cpu).unwrap();
        assert_eq!(norm.normalize_bytes(&t).unwrap().dtype(), DType::F32);
        assert!(norm
            .normalize_bytes(&t.to_dtype(DType::F32).unwrap())
            .is_err());
        assert!(Normalization::symmetric(1).normalize_bytes(&t).is_err());
    }

    #[test]
    fn unit_range_statistics() {
        let mut out = [0f32; 3];
        Normalization::imagenet_rgb().apply_chw(&[255, 0, 255], &mut out);
        assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((out[1] + 0.456 / 0.224).abs() < 1e-6);
        let mut g = [0f32; 2];
        Normalization::symmetric(1).apply_chw(&[0, 255], &mut g);
        assert_eq!(g, [-1.0, 1.0]);
    }
}
