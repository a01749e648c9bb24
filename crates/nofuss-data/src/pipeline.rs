//! The streaming photo pipeline: samplers, parallel decoding and a bounded prefetch
//! queue, for datasets too large to hold decoded in memory (CUB, Cars196, SOP at 224).
//!
//! An epoch is a list of batches fixed up front by a [`Sampler`] from `(seed, epoch)`.
//! A producer thread decodes and transforms the images of the next batches in parallel
//! (rayon) while the current one trains; at most `prefetch` batches wait in the queue, so
//! memory stays bounded whatever the dataset size. Each image's randomness (crop, flip)
//! comes from its own generator seeded with `(seed, epoch, batch, slot)`, so batches are
//! identical whatever the number of threads.
//!
//! ```no_run
//! use nofuss_data::{cub, ZeroShotSplit};
//! use nofuss_data::pipeline::{BadImages, Loader, LoaderConfig, Sampler};
//! use nofuss_data::transform::Transform;
//! use nofuss_tensor::Normalization;
//! let ds = cub::load("CUB_200_2011")?;
//! let (train, _) = ZeroShotSplit::Halves.apply(&ds)?;
//! let cfg = LoaderConfig {
//!     batch_size: 32,
//!     sampler: Sampler::MPerClass { m: 4 },
//!     transform: Transform::train(224),
//!     normalization: Normalization::bn_inception_bgr(),
//!     seed: 0,
//!     prefetch: 4,
//!     bad_images: BadImages::Fail,
//!     threads: 0,
//! };
//! let loader = Loader::new(&ds, &train, cfg)?;
//! for batch in loader.epoch(0) {
//!     let batch = batch?;
//!     println!("{} images, first label {}", batch.labels.len(), batch.labels[0]);
//! }
//! # Ok::<(), nofuss_data::DataError>(())
//! ```

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use nofuss_tensor::upload::Uploader;
use nofuss_tensor::Normalization;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::transform::{load_transformed_within, Texel, Transform};
use crate::{BBox, DataError, ImageDataset, Result, Subset};

/// How the images of an epoch are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    /// A shuffle of all images; the last incomplete batch is dropped.
    Random,
    /// Class-balanced batches: `batch_size / m` distinct classes, `m` images each
    /// (pytorch-metric-learning's `MPerClassSampler`). A class with fewer than `m` images
    /// repeats some; each class cycles through a fresh shuffle of its images. An epoch
    /// has as many batches as the random sampler would.
    MPerClass {
        /// Images per class in a batch.
        m: usize,
    },
    /// Every image once, in subset order, the last batch possibly smaller (evaluation).
    Sequential,
}

/// What to do with an image that cannot be read or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadImages {
    /// Stop with an error naming the file.
    #[default]
    Fail,
    /// Leave it out of its batch, count it, and report it ([`Loader::skipped`]).
    Skip,
}

/// Where skipped images are recorded: path and reason, in the order met.
pub type SkipLog = Arc<Mutex<Vec<(PathBuf, String)>>>;

/// Settings of a [`Loader`].
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Batch composition.
    pub sampler: Sampler,
    /// Per-image transform.
    pub transform: Transform,
    /// Pixel normalisation (3 channels).
    pub normalization: Normalization,
    /// Run seed.
    pub seed: u64,
    /// Batches decoded ahead at most (at least 1).
    pub prefetch: usize,
    /// Policy for unreadable images.
    pub bad_images: BadImages,
    /// Decoding threads: 0 uses rayon's global pool, otherwise a pool of its own.
    pub threads: usize,
}

/// One batch: `[B, 3, S, S]` 8-bit pixels (row-major, the network's channel order, not yet
/// normalised), labels and subset positions.
///
/// The pixels stay bytes until they reach the device ([`PhotoBatch::to_tensors`]):
/// a quarter of the memory in the prefetch queue and of the host-to-GPU traffic of f32.
#[derive(Debug, Clone, PartialEq)]
pub struct PhotoBatch {
    /// Rounded 8-bit pixels, `B * 3 * S * S` values, in the network's channel order.
    pub pixels: Vec<u8>,
    /// How they become network input.
    pub normalization: Normalization,
    /// Side `S`.
    pub size: usize,
    /// Label of each image (the subset's labels).
    pub labels: Vec<u32>,
    /// Position of each image in the subset.
    pub positions: Vec<usize>,
}

impl PhotoBatch {
    /// The batch as candle tensors on `device`: images `[B,3,S,S]` f32 (bytes uploaded,
    /// normalised there), labels `[B]` u32. For a stream of batches to a GPU,
    /// [`PhotoBatch::to_tensors_with`] does not make the host wait for the upload.
    pub fn to_tensors(
        &self,
        device: &candle_core::Device,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        self.to_tensors_with(&mut Uploader::direct(), device)
    }

    /// [`PhotoBatch::to_tensors`] through `up`'s staging buffers (page-locked on CUDA:
    /// the call returns once the bytes are staged; keep one `up` for all of an epoch's
    /// batches).
    pub fn to_tensors_with(
        &self,
        up: &mut Uploader,
        device: &candle_core::Device,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        let b = self.labels.len();
        let pixels = up.upload(&self.pixels, (b, 3, self.size, self.size), device)?;
        let images = self.normalization.normalize_bytes(&pixels)?;
        let labels = up.upload(&self.labels, b, device)?;
        Ok((images, labels))
    }

    /// The normalised pixels on the host, `B * 3 * S * S` f32 (the values
    /// [`PhotoBatch::to_tensors`] produces on a device, to the bit).
    pub fn images(&self) -> Vec<f32> {
        let coef = self.normalization.coefficients();
        let plane = self.size * self.size;
        self.pixels
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let (mul, add) = coef[(i / plane.max(1)) % coef.len()];
                f32::from_byte(b as f32, mul, add)
            })
            .collect()
    }
}

/// Streams transformed batches of a subset of a dataset.
pub struct Loader {
    paths: Arc<Vec<PathBuf>>,
    labels: Arc<Vec<u32>>,
    cfg: Arc<LoaderConfig>,
    skipped: SkipLog,
    pool: Option<Arc<rayon::ThreadPool>>,
    /// Bounding box of each image, when crops stay inside them.
    boxes: Option<Arc<Vec<BBox>>>,
    /// Dataset record of each subset position.
    records: Vec<usize>,
}

impl Loader {
    /// A loader over the images of `subset` of `ds`.
    pub fn new(ds: &ImageDataset, subset: &Subset, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(DataError::Config("batch size must be at least 1".into()));
        }
        if cfg.normalization.channels() != 3 {
            return Err(DataError::Config(
                "the photo pipeline produces 3 channels".into(),
            ));
        }
        if let Sampler::MPerClass { m } = cfg.sampler {
            if m == 0 || !cfg.batch_size.is_multiple_of(m) {
                return Err(DataError::Config(format!(
                    "batch size {} is not a multiple of {m} images per class",
                    cfg.batch_size
                )));
            }
            if cfg.batch_size / m > subset.num_classes() {
                return Err(DataError::Config(format!(
                    "batches of {} classes, but the subset has {}",
                    cfg.batch_size / m,
                    subset.num_classes()
                )));
            }
        }
        let pool = match cfg.threads {
            0 => None,
            t => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .map_err(|e| DataError::Config(format!("decoding threads: {e}")))?,
            )),
        };
        let paths = subset
            .indices
            .iter()
            .map(|&i| ds.images_dir.join(&ds.records[i].path))
            .collect();
        Ok(Self {
            paths: Arc::new(paths),
            labels: Arc::new(subset.labels.clone()),
            cfg: Arc::new(LoaderConfig {
                prefetch: cfg.prefetch.max(1),
                ..cfg
            }),
            skipped: Arc::new(Mutex::new(Vec::new())),
            pool,
            boxes: None,
            records: subset.indices.clone(),
        })
    }

    /// Crops inside each image's bounding box (`boxes[i]` belongs to the dataset's record
    /// `i`, as `cars::Loaded::boxes`) instead of the whole image.
    pub fn with_boxes(mut self, boxes: &[BBox]) -> Result<Self> {
        let picked = self
            .records
            .iter()
            .map(|&r| {
                boxes.get(r).copied().ok_or_else(|| {
                    DataError::Config(format!(
                        "{} bounding boxes, but the subset uses record {r}",
                        boxes.len()
                    ))
                })
            })
            .collect::<Result<Vec<BBox>>>()?;
        self.boxes = Some(Arc::new(picked));
        Ok(self)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The batches of epoch `epoch`: lists of subset positions.
    pub fn plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        plan(&self.labels, &self.cfg, epoch)
    }

    /// Records skipped images into `sink` (shared with other loaders, or kept after this
    /// one is dropped) instead of a list of its own.
    pub fn with_skip_log(mut self, sink: SkipLog) -> Self {
        self.skipped = sink;
        self
    }

    /// Images skipped so far under [`BadImages::Skip`], with the reason.
    pub fn skipped(&self) -> Vec<(PathBuf, String)> {
        self.skipped.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Decodes the batches of epoch `epoch` on a producer thread, `prefetch` ahead.
    /// Dropping the iterator stops the producer after the batch in progress.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        let plan = self.plan(epoch);
        let (tx, rx) = sync_channel(self.cfg.prefetch);
        let src = Source {
            paths: self.paths.clone(),
            labels: self.labels.clone(),
            boxes: self.boxes.clone(),
            cfg: self.cfg.clone(),
            skipped: self.skipped.clone(),
        };
        let pool = self.pool.clone();
        let handle = std::thread::spawn(move || {
            for (b, positions) in plan.into_iter().enumerate() {
                let job = || src.build(epoch, b, positions);
                let batch = match &pool {
                    Some(p) => p.install(job),
                    None => job(),
                };
                let stop = batch.is_err();
                if tx.send(batch).is_err() || stop {
                    return;
                }
            }
        });
        EpochIter {
            rx,
            _handle: handle,
        }
    }
}

/// The batches of one epoch, in order (see [`Loader::epoch`]).
pub struct EpochIter {
    rx: Receiver<Result<PhotoBatch>>,
    _handle: std::thread::JoinHandle<()>,
}

impl Iterator for EpochIter {
    type Item = Result<PhotoBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

/// A generator for `(seed, epoch, stream)`, independent of threads.
fn rng_for(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.set_stream(stream);
    r
}

fn plan(labels: &[u32], cfg: &LoaderConfig, epoch: u64) -> Vec<Vec<usize>> {
    let n = labels.len();
    let b = cfg.batch_size;
    let mut rng = rng_for(cfg.seed, epoch, 0);
    match cfg.sampler {
        Sampler::Sequential => (0..n)
            .collect::<Vec<_>>()
            .chunks(b)
            .map(|c| c.to_vec())
            .collect(),
        Sampler::Random => {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng);
            order.chunks_exact(b).map(|c| c.to_vec()).collect()
        }
        Sampler::MPerClass { m } => {
            let classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
            let mut members: Vec<Vec<usize>> = vec![Vec::new(); classes];
            for (i, &l) in labels.iter().enumerate() {
                members[l as usize].push(i);
            }
            let present: Vec<usize> = (0..classes).filter(|&c| !members[c].is_empty()).collect();
            for m in &mut members {
                m.shuffle(&mut rng);
            }
            let mut cursor = vec![0usize; classes];
            (0..n / b)
                .map(|_| {
                    let mut batch = Vec::with_capacity(b);
                    for &c in present.choose_multiple(&mut rng, b / m) {
                        for _ in 0..m {
                            if cursor[c] == members[c].len() {
                                members[c].shuffle(&mut rng);
                                cursor[c] = 0;
                            }
                            batch.push(members[c][cursor[c]]);
                            cursor[c] += 1;
                        }
                    }
                    batch
                })
                .collect()
        }
    }
}

/// What the producer thread needs to build batches.
struct Source {
    paths: Arc<Vec<PathBuf>>,
    labels: Arc<Vec<u32>>,
    boxes: Option<Arc<Vec<BBox>>>,
    cfg: Arc<LoaderConfig>,
    skipped: SkipLog,
}

impl Source {
    fn build(&self, epoch: u64, batch: usize, positions: Vec<usize>) -> Result<PhotoBatch> {
        let cfg = &self.cfg;
        let s = cfg.transform.size();
        let per = 3 * s * s;
        let mut images = vec![0u8; positions.len() * per];
        let results: Vec<Result<()>> = images
            .par_chunks_mut(per)
            .zip(positions.par_iter())
            .enumerate()
            .map(|(slot, (out, &p))| {
                let stream = 1 + (batch as u64) * 65_536 + slot as u64;
                let mut rng = rng_for(cfg.seed, epoch, stream);
                let within = self.boxes.as_ref().map(|b| b[p]);
                load_transformed_within(
                    &self.paths[p],
                    &cfg.transform,
                    &cfg.normalization,
                    &mut rng,
                    within,
                    out,
                )
            })
            .collect();
        let mut keep = Vec::with_capacity(positions.len());
        for (slot, r) in results.into_iter().enumerate() {
            match (r, cfg.bad_images) {
                (Ok(()), _) => keep.push(slot),
                (Err(e), BadImages::Fail) => return Err(e),
                (Err(e), BadImages::Skip) => {
                    if let Ok(mut s) = self.skipped.lock() {
                        s.push((self.paths[positions[slot]].clone(), e.to_string()));
                    }
                }
            }
        }
        if keep.len() < positions.len() {
            let mut packed = Vec::with_capacity(keep.len() * per);
            for &k in &keep {
                packed.extend_from_slice(&images[k * per..(k + 1) * per]);
            }
            images = packed;
        }
        let positions: Vec<usize> = keep.iter().map(|&k| positions[k]).collect();
        Ok(PhotoBatch {
            pixels: images,
            normalization: cfg.normalization.clone(),
            size: s,
            labels: positions.iter().map(|&p| self.labels[p]).collect(),
            positions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cub, ImageRecord, ZeroShotSplit};

    /// A CUB-layout dataset of `classes` x `per` small JPEGs of varied sizes.
    fn dataset(root: &std::path::Path, classes: usize, per: usize) -> ImageDataset {
        let mut records = Vec::new();
        for c in 0..classes {
            std::fs::create_dir_all(root.join("images").join(format!("c{c}"))).unwrap();
            for i in 0..per {
                let (w, h) = (40 + 7 * i as u32, 30 + 5 * c as u32);
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    image::Rgb([(x * 5) as u8, (y * 7) as u8, (c * 40 + i * 9) as u8])
                });
                let rel = PathBuf::from(format!("c{c}/{i}.jpg"));
                img.save(root.join("images").join(&rel)).unwrap();
                records.push(ImageRecord {
                    id: records.len() as u32 + 1,
                    path: rel,
                    class: c as u32,
                });
            }
        }
        let ds = ImageDataset {
            root: root.to_path_buf(),
            images_dir: root.join("images"),
            records,
            class_names: (0..classes).map(|c| format!("c{c}")).collect(),
        };
        cub::write_annotations(root, &ds).unwrap();
        cub::load(root).unwrap()
    }

    fn cfg(sampler: Sampler, threads: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: 6,
            sampler,
            transform: Transform::train(24),
            normalization: Normalization::imagenet_rgb(),
            seed: 7,
            prefetch: 2,
            bad_images: BadImages::Fail,
            threads,
        }
    }

    fn collect(l: &Loader, epoch: u64) -> Vec<PhotoBatch> {
        l.epoch(epoch).collect::<Result<Vec<_>>>().unwrap()
    }

    #[test]
    fn same_batches_whatever_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 4, 5);
        let (train, _) = ZeroShotSplit::FirstN(3).apply(&ds).unwrap();
        let one = collect(
            &Loader::new(&ds, &train, cfg(Sampler::Random, 1)).unwrap(),
            2,
        );
        let three = collect(
            &Loader::new(&ds, &train, cfg(Sampler::Random, 3)).unwrap(),
            2,
        );
        assert_eq!(one.len(), 15 / 6);
        assert_eq!(one, three);
        // Another epoch: another order and other crops.
        let other = collect(
            &Loader::new(&ds, &train, cfg(Sampler::Random, 3)).unwrap(),
            3,
        );
        assert_ne!(one, other);
        assert_eq!(one[0].pixels.len(), 6 * 3 * 24 * 24);
        // The tensors a device gets are the host normalisation of the bytes.
        let (images, labels) = one[0].to_tensors(&candle_core::Device::Cpu).unwrap();
        assert_eq!(images.dims(), [6, 3, 24, 24]);
        assert_eq!(labels.to_vec1::<u32>().unwrap(), one[0].labels);
        let host = one[0].images();
        assert!(host.iter().all(|v| v.is_finite()));
        let dev = images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(dev
            .iter()
            .zip(&host)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // Through one uploader for all batches: the same tensors.
        let mut up = Uploader::default();
        for b in &one {
            let (i, l) = b
                .to_tensors_with(&mut up, &candle_core::Device::Cpu)
                .unwrap();
            let (i2, l2) = b.to_tensors(&candle_core::Device::Cpu).unwrap();
            let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&i), flat(&i2));
            assert_eq!(l.to_vec1::<u32>().unwrap(), l2.to_vec1::<u32>().unwrap());
        }
    }

    #[test]
    fn m_per_class_batches_are_balanced() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 5, 3);
        let (all, _) = ZeroShotSplit::FirstN(4).apply(&ds).unwrap();
        let mut c = cfg(Sampler::MPerClass { m: 2 }, 0);
        c.transform = Transform::eval(8);
        let l = Loader::new(&ds, &all, c).unwrap();
        let plan = l.plan(0);
        assert_eq!(plan.len(), all.len() / 6);
        for batch in &plan {
            let mut count = std::collections::HashMap::new();
            for &p in batch {
                *count.entry(all.labels[p]).or_insert(0) += 1;
            }
            assert_eq!(count.len(), 3, "{batch:?}");
            assert!(count.values().all(|&v| v == 2));
        }
        let mut bad = cfg(Sampler::MPerClass { m: 4 }, 0);
        assert!(Loader::new(&ds, &all, bad.clone()).is_err());
        bad.sampler = Sampler::MPerClass { m: 1 };
        assert!(
            Loader::new(&ds, &all, bad).is_err(),
            "6 classes asked, 4 present"
        );
    }

    #[test]
    fn sequential_sees_every_image_once_and_eval_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 2, 4);
        let (train, _) = ZeroShotSplit::Halves.apply(&ds).unwrap();
        let mut c = cfg(Sampler::Sequential, 2);
        c.batch_size = 3;
        c.transform = Transform::eval(16);
        let l = Loader::new(&ds, &train, c).unwrap();
        let a = collect(&l, 0);
        let seen: Vec<usize> = a.iter().flat_map(|b| b.positions.clone()).collect();
        assert_eq!(seen, vec![0, 1, 2, 3]);
        assert_eq!(a, collect(&l, 5));
        // Dropping an epoch early stops its producer without blocking.
        let mut it = l.epoch(1);
        assert!(it.next().is_some());
        drop(it);
    }

    #[test]
    fn bad_images_fail_or_are_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 2, 6);
        let (train, _) = ZeroShotSplit::Halves.apply(&ds).unwrap();
        let victim = ds.images_dir.join("c0/3.jpg");
        std::fs::write(&victim, b"\xff\xd8 not really a jpeg").unwrap();
        let mut c = cfg(Sampler::Sequential, 2);
        let l = Loader::new(&ds, &train, c.clone()).unwrap();
        let e = l
            .epoch(0)
            .collect::<Result<Vec<_>>>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("3.jpg"), "{e}");
        c.bad_images = BadImages::Skip;
        let l = Loader::new(&ds, &train, c).unwrap();
        let batches = collect(&l, 0);
        let n: usize = batches.iter().map(|b| b.labels.len()).sum();
        assert_eq!(n, 5);
        assert_eq!(batches[0].pixels.len(), 5 * 3 * 24 * 24);
        let skipped = l.skipped();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].0, victim);
    }
}
