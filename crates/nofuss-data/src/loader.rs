use candle_core::{Device, Tensor};
use nofuss_tensor::Normalization;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{DataError, ImageBank, Result};

/// Training-time augmentation of in-memory images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Augment {
    /// Random translation by up to this many pixels in x and y (zero padding).
    pub max_shift: usize,
    /// Random horizontal flip with probability 1/2 (wrong for glyphs, right for photos).
    pub hflip: bool,
}

/// A batch ready for a model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, C, H, W]` f32, normalised.
    pub images: Tensor,
    /// `[B]` u32 labels.
    pub labels: Tensor,
    /// Positions of the batch's images in the bank.
    pub indices: Vec<usize>,
}

/// Iterates over an [`ImageBank`] in batches.
///
/// Training order is a shuffle drawn from ChaCha8 seeded with `(seed, epoch)`, so a run
/// is reproducible and an epoch can be replayed on its own; the last incomplete batch is
/// dropped (batch statistics of a handful of images are noise). Evaluation keeps the
/// bank's order and every image.
pub struct Batches<'a> {
    bank: &'a ImageBank,
    labels: &'a [u32],
    order: Vec<usize>,
    pos: usize,
    batch_size: usize,
    drop_last: bool,
    augment: Augment,
    rng: ChaCha8Rng,
    norm: &'a Normalization,
    device: Device,
}

impl<'a> Batches<'a> {
    /// Shuffled, augmented batches for epoch `epoch` of a run seeded with `seed`.
    #[allow(clippy::too_many_arguments)]
    pub fn train(
        bank: &'a ImageBank,
        labels: &'a [u32],
        batch_size: usize,
        seed: u64,
        epoch: u64,
        augment: Augment,
        norm: &'a Normalization,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..bank.len()).collect();
        order.shuffle(&mut rng);
        Self::new(
            bank, labels, order, batch_size, true, augment, rng, norm, device,
        )
    }

    /// All images in order, without augmentation.
    pub fn eval(
        bank: &'a ImageBank,
        labels: &'a [u32],
        batch_size: usize,
        norm: &'a Normalization,
        device: &Device,
    ) -> Result<Self> {
        let order = (0..bank.len()).collect();
        let rng = ChaCha8Rng::seed_from_u64(0);
        Self::new(
            bank,
            labels,
            order,
            batch_size,
            false,
            Augment::default(),
            rng,
            norm,
            device,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        bank: &'a ImageBank,
        labels: &'a [u32],
        order: Vec<usize>,
        batch_size: usize,
        drop_last: bool,
        augment: Augment,
        rng: ChaCha8Rng,
        norm: &'a Normalization,
        device: &Device,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(DataError::Config("batch size must be at least 1".into()));
        }
        if labels.len() != bank.len() {
            return Err(DataError::Config(format!(
                "{} labels for {} images",
                labels.len(),
                bank.len()
            )));
        }
        if norm.channels() != bank.spec().channels {
            return Err(DataError::Config(format!(
                "normalisation for {} channels, images have {}",
                norm.channels(),
                bank.spec().channels
            )));
        }
        Ok(Self {
            bank,
            labels,
            order,
            pos: 0,
            batch_size,
            drop_last,
            augment,
            rng,
            norm,
            device: device.clone(),
        })
    }

    /// Number of batches this iterator yields in total.
    pub fn num_batches(&self) -> usize {
        let n = self.order.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    fn assemble(&mut self, idx: Vec<usize>) -> Result<Batch> {
        let spec = self.bank.spec();
        let (c, h, w) = (spec.channels, spec.height, spec.width);
        let mut data = vec![0f32; idx.len() * spec.len()];
        let mut shifted = vec![0u8; spec.len()];
        for (slot, &i) in idx.iter().enumerate() {
            let src = self.bank.image(i);
            let a = self.augment;
            let s = a.max_shift as i64;
            let (dx, dy) = if s > 0 {
                (self.rng.gen_range(-s..=s), self.rng.gen_range(-s..=s))
            } else {
                (0, 0)
            };
            let flip = a.hflip && self.rng.gen::<bool>();
            let img: &[u8] = if dx == 0 && dy == 0 && !flip {
                src
            } else {
                for ch in 0..c {
                    for y in 0..h as i64 {
                        for x in 0..w as i64 {
                            let sx0 = if flip { w as i64 - 1 - x } else { x };
                            let (sx, sy) = (sx0 - dx, y - dy);
                            let v = if (0..w as i64).contains(&sx) && (0..h as i64).contains(&sy) {
                                src[ch * h * w + sy as usize * w + sx as usize]
                            } else {
                                0
                            };
                            shifted[ch * h * w + y as usize * w + x as usize] = v;
                        }
                    }
                }
                &shifted
            };
            self.norm
                .apply_chw(img, &mut data[slot * spec.len()..(slot + 1) * spec.len()]);
        }
        let b = idx.len();
        let labels: Vec<u32> = idx.iter().map(|&i| self.labels[i]).collect();
        Ok(Batch {
            images: Tensor::from_vec(data, (b, c, h, w), &self.device)?,
            labels: Tensor::from_vec(labels, b, &self.device)?,
            indices: idx,
        })
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let remaining = self.order.len() - self.pos;
        if remaining == 0 || (self.drop_last && remaining < self.batch_size) {
            return None;
        }
        let end = self.pos + remaining.min(self.batch_size);
        let idx = self.order[self.pos..end].to_vec();
        self.pos = end;
        Some(self.assemble(idx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageSpec;

    fn bank() -> (ImageBank, Vec<u32>) {
        let spec = ImageSpec {
            channels: 1,
            height: 3,
            width: 3,
        };
        // image i: all pixels = 10*i, except the centre = 255.
        let mut px = Vec::new();
        for i in 0..10u8 {
            let mut img = vec![10 * i; 9];
            img[4] = 255;
            px.extend(img);
        }
        (
            ImageBank::from_pixels(spec, px).unwrap(),
            (0..10).map(|i| i % 3).collect(),
        )
    }

    #[test]
    fn eval_batches_cover_everything_in_order() {
        let (b, l) = bank();
        let norm = Normalization::symmetric(1);
        let it = Batches::eval(&b, &l, 4, &norm, &Device::Cpu).unwrap();
        assert_eq!(it.num_batches(), 3);
        let batches: Vec<Batch> = it.map(|x| x.unwrap()).collect();
        assert_eq!(
            batches.iter().map(|b| b.indices.len()).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert_eq!(batches[2].labels.to_vec1::<u32>().unwrap(), vec![2, 0]);
        let first = batches[0]
            .images
            .get(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((first[0] - (10.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert_eq!(first[4], 1.0);
    }

    #[test]
    fn training_order_is_seeded_and_drops_the_tail() {
        let (b, l) = bank();
        let norm = Normalization::symmetric(1);
        let order = |seed, epoch| -> Vec<usize> {
            Batches::train(
                &b,
                &l,
                3,
                seed,
                epoch,
                Augment::default(),
                &norm,
                &Device::Cpu,
            )
            .unwrap()
            .flat_map(|x| x.unwrap().indices)
            .collect()
        };
        assert_eq!(order(1, 0).len(), 9);
        assert_eq!(order(1, 0), order(1, 0));
        assert_ne!(order(1, 0), order(1, 1));
        assert_ne!(order(1, 0), order(2, 0));
    }

    #[test]
    fn shifts_move_content_and_pad_with_zero() {
        let (b, l) = bank();
        let norm = Normalization {
            scale: 1.0,
            mean: vec![0.0],
            std: vec![1.0],
            order: Default::default(),
        };
        let aug = Augment {
            max_shift: 1,
            hflip: false,
        };
        let mut moved = 0;
        for batch in Batches::train(&b, &l, 10, 3, 0, aug, &norm, &Device::Cpu).unwrap() {
            let batch = batch.unwrap();
            for (row, &i) in batch.indices.iter().enumerate() {
                let img = batch
                    .images
                    .get(row)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                // The bright centre pixel appears exactly once, somewhere.
                assert_eq!(img.iter().filter(|&&v| v == 255.0).count(), 1);
                if img[4] != 255.0 {
                    moved += 1;
                    assert!(img.contains(&0.0) || i == 0);
                }
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn mismatches_are_errors() {
        let (b, l) = bank();
        let norm3 = Normalization::imagenet_rgb();
        assert!(Batches::eval(&b, &l, 4, &norm3, &Device::Cpu).is_err());
        let norm = Normalization::symmetric(1);
        assert!(Batches::eval(&b, &l[..3], 4, &norm, &Device::Cpu).is_err());
        assert!(Batches::eval(&b, &l, 0, &norm, &Device::Cpu).is_err());
    }
}
