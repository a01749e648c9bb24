use image::imageops::FilterType;
use rayon::prelude::*;

use crate::{DataError, ImageDataset, Result, Subset};

/// The shape every decoded image is brought to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpec {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

impl ImageSpec {
    /// Bytes of one image.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether the spec describes an empty image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An image left out: its path and why.
pub type Skipped = (std::path::PathBuf, String);

/// Decoded images of a subset, held in memory as 8-bit planar `[N, C, H, W]`.
///
/// Decoding runs in parallel (rayon). Images whose size differs from the spec are
/// resized (triangle filter); color images become grayscale for a 1-channel spec and
/// grayscale images are replicated for a 3-channel one.
#[derive(Debug, Clone)]
pub struct ImageBank {
    spec: ImageSpec,
    pixels: Vec<u8>,
}

impl ImageBank {
    /// Decodes the images of `subset` from `ds`.
    pub fn load(ds: &ImageDataset, subset: &Subset, spec: ImageSpec) -> Result<Self> {
        if !matches!(spec.channels, 1 | 3) || spec.height == 0 || spec.width == 0 {
            return Err(DataError::Config(format!(
                "unsupported image spec {spec:?}"
            )));
        }
        let decoded: Vec<Vec<u8>> = subset
            .indices
            .par_iter()
            .map(|&i| decode(&ds.images_dir.join(&ds.records[i].path), spec))
            .collect::<Result<_>>()?;
        Ok(Self {
            spec,
            pixels: decoded.concat(),
        })
    }

    /// Like [`ImageBank::load`], but an image that cannot be read or decoded is left out
    /// instead of failing: returns the bank, the subset of the images kept (same classes,
    /// fewer images), and each skipped file with the reason.
    pub fn load_skipping(
        ds: &ImageDataset,
        subset: &Subset,
        spec: ImageSpec,
    ) -> Result<(Self, Subset, Vec<Skipped>)> {
        if !matches!(spec.channels, 1 | 3) || spec.height == 0 || spec.width == 0 {
            return Err(DataError::Config(format!(
                "unsupported image spec {spec:?}"
            )));
        }
        let decoded: Vec<(std::path::PathBuf, Result<Vec<u8>>)> = subset
            .indices
            .par_iter()
            .map(|&i| {
                let p = ds.images_dir.join(&ds.records[i].path);
                let r = decode(&p, spec);
                (p, r)
            })
            .collect();
        let mut pixels = Vec::new();
        let mut kept = Subset {
            indices: Vec::new(),
            labels: Vec::new(),
            classes: subset.classes.clone(),
        };
        let mut skipped = Vec::new();
        for ((path, r), (&i, &l)) in decoded
            .into_iter()
            .zip(subset.indices.iter().zip(&subset.labels))
        {
            match r {
                Ok(px) => {
                    pixels.extend_from_slice(&px);
                    kept.indices.push(i);
                    kept.labels.push(l);
                }
                Err(e) => skipped.push((path, e.to_string())),
            }
        }
        Ok((Self { spec, pixels }, kept, skipped))
    }

    /// Builds a bank from raw planar pixels (`[N, C, H, W]`).
    pub fn from_pixels(spec: ImageSpec, pixels: Vec<u8>) -> Result<Self> {
        if spec.is_empty() || !pixels.len().is_multiple_of(spec.len()) {
            return Err(DataError::Config(format!(
                "{} bytes are not whole images of {spec:?}",
                pixels.len()
            )));
        }
        Ok(Self { spec, pixels })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / self.spec.len()
    }

    /// Whether the bank is empty.
    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// The image shape.
    pub fn spec(&self) -> ImageSpec {
        self.spec
    }

    /// The planar pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.spec.len();
        &self.pixels[i * n..(i + 1) * n]
    }
}

/// Decodes one file into planar pixels of `spec`.
pub(crate) fn decode(path: &std::path::Path, spec: ImageSpec) -> Result<Vec<u8>> {
    let img = crate::transform::open_image(path)?;
    let (w, h) = (spec.width as u32, spec.height as u32);
    let img = if img.width() != w || img.height() != h {
        img.resize_exact(w, h, FilterType::Triangle)
    } else {
        img
    };
    Ok(match spec.channels {
        1 => img.to_luma8().into_raw(),
        _ => {
            let rgb = img.to_rgb8();
            let plane = spec.height * spec.width;
            let mut out = vec![0u8; 3 * plane];
            for (p, px) in rgb.pixels().enumerate() {
                for c in 0..3 {
                    out[c * plane + p] = px.0[c];
                }
            }
            out
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ImageRecord, ZeroShotSplit};

    fn write_png(path: &std::path::Path, w: u32, h: u32, rgb: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
            .save(path)
            .unwrap();
    }

    fn dataset(dir: &std::path::Path) -> ImageDataset {
        let records = (0..4)
            .map(|i| ImageRecord {
                id: i + 1,
                path: format!("c{}/{i}.png", i % 2).into(),
                class: i % 2,
            })
            .collect::<Vec<_>>();
        for r in &records {
            write_png(&dir.join("images").join(&r.path), 8, 6, [200, 100, 0]);
        }
        ImageDataset {
            root: dir.into(),
            images_dir: dir.join("images"),
            records,
            class_names: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn decodes_resizes_and_converts() {
        let d = tempfile::tempdir().unwrap();
        let ds = dataset(d.path());
        let (train, _) = ZeroShotSplit::Halves.apply(&ds).unwrap();
        let rgb = ImageBank::load(
            &ds,
            &train,
            ImageSpec {
                channels: 3,
                height: 4,
                width: 4,
            },
        )
        .unwrap();
        assert_eq!(rgb.len(), 2);
        let img = rgb.image(1);
        assert_eq!(&img[0..2], &[200, 200]); // R plane
        assert_eq!(&img[16..18], &[100, 100]); // G plane
        assert_eq!(&img[32..34], &[0, 0]); // B plane
        let gray = ImageBank::load(
            &ds,
            &train,
            ImageSpec {
                channels: 1,
                height: 6,
                width: 8,
            },
        )
        .unwrap();
        assert_eq!(gray.image(0).len(), 48);
        assert!(gray.image(0)[0] > 90 && gray.image(0)[0] < 140);
    }

    #[test]
    fn corrupt_and_missing_images_are_named() {
        let d = tempfile::tempdir().unwrap();
        let ds = dataset(d.path());
        let (train, test) = ZeroShotSplit::Halves.apply(&ds).unwrap();
        std::fs::write(d.path().join("images/c0/2.png"), b"not a png at all").unwrap();
        let e = ImageBank::load(
            &ds,
            &train,
            ImageSpec {
                channels: 1,
                height: 4,
                width: 4,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("c0/2.png"), "{e}");
        std::fs::remove_file(d.path().join("images/c1/3.png")).unwrap();
        let e = ImageBank::load(
            &ds,
            &test,
            ImageSpec {
                channels: 1,
                height: 4,
                width: 4,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("c1/3.png"), "{e}");
        // The skipping policy leaves them out and says which and why.
        let spec = ImageSpec {
            channels: 1,
            height: 4,
            width: 4,
        };
        let (bank, kept, skipped) = ImageBank::load_skipping(&ds, &train, spec).unwrap();
        assert_eq!(bank.len(), 1);
        assert_eq!(kept.indices, vec![0]);
        assert_eq!(kept.classes, train.classes);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].0.ends_with("c0/2.png"));
    }
}
