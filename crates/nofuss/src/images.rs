//! Where a run's images come from: decoded once into memory at a fixed size (the glyphs,
//! small images), or streamed from disk through `nofuss-data`'s photo pipeline
//! (RandomResizedCrop + flip for training, resize + center crop for evaluation).

use candle_core::{Device, Tensor};
use nofuss_data::pipeline::{BadImages, Loader, LoaderConfig, Sampler, SkipLog};
use nofuss_data::transform::Transform;
use nofuss_data::{Augment, BBox, Batches, ImageBank, ImageDataset, Subset};
use nofuss_tensor::Normalization;

use crate::{Result, TrainError};

/// A batch for the model: images `[B, C, H, W]`, labels `[B]`, and its size.
pub type ModelBatch = (Tensor, Tensor, usize);

/// Batches in order, each possibly an error naming the image at fault.
pub type BatchIter<'a> = Box<dyn Iterator<Item = Result<ModelBatch>> + 'a>;

/// An evaluation batch: images `[B, C, H, W]` and each one's position in the subset.
/// The positions are consecutive unless the photo pipeline skipped unreadable images
/// (`skip_bad_images`), which the embeddings of a whole subset then leave out.
pub type EvalBatch = (Tensor, Vec<usize>);

/// Evaluation batches in order, each possibly an error naming the image at fault.
pub type EvalIter<'a> = Box<dyn Iterator<Item = Result<EvalBatch>> + 'a>;

/// The images of one subset (training or test).
pub enum Images {
    /// Decoded into memory (build with [`Images::memory`]).
    Memory {
        /// The decoded images.
        bank: ImageBank,
        /// One 0 label per image: evaluation batches need labels and must borrow them.
        zeros: Vec<u32>,
    },
    /// Streamed through the photo pipeline.
    Photos(Box<PhotoSource>),
}

/// What the photo pipeline needs to build loaders for one subset.
pub struct PhotoSource {
    /// The dataset.
    pub dataset: ImageDataset,
    /// The subset's images and labels.
    pub subset: Subset,
    /// Output side.
    pub size: usize,
    /// Training sampler (class-balanced when set).
    pub m_per_class: Option<usize>,
    /// Bounding boxes of the dataset's records, when crops stay inside them.
    pub boxes: Option<Vec<BBox>>,
    /// Skip unreadable images instead of failing.
    pub skip_bad_images: bool,
    /// Where skipped images are recorded, across epochs and loaders.
    pub skipped: SkipLog,
}

impl Images {
    /// In-memory images.
    pub fn memory(bank: ImageBank) -> Self {
        let zeros = vec![0; bank.len()];
        Self::Memory { bank, zeros }
    }

    /// Distinct images the photo pipeline skipped so far (unreadable, with
    /// `skip_bad_images`), with the reason; empty for in-memory images.
    pub fn skipped(&self) -> Vec<(std::path::PathBuf, String)> {
        match self {
            Self::Memory { .. } => Vec::new(),
            Self::Photos(p) => {
                let mut seen = std::collections::HashSet::new();
                p.skipped
                    .lock()
                    .map(|v| v.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(path, _)| seen.insert(path.clone()))
                    .collect()
            }
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            Self::Memory { bank, .. } => bank.len(),
            Self::Photos(p) => p.subset.len(),
        }
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The training batches of `epoch` (shuffled or class-balanced, augmented), with
    /// their number.
    #[allow(clippy::too_many_arguments)]
    pub fn train_epoch<'a>(
        &'a self,
        labels: &'a [u32],
        batch_size: usize,
        seed: u64,
        epoch: u64,
        augment: Augment,
        norm: &'a Normalization,
        device: &Device,
    ) -> Result<(usize, BatchIter<'a>)> {
        match self {
            Self::Memory { bank, .. } => {
                let b =
                    Batches::train(bank, labels, batch_size, seed, epoch, augment, norm, device)?;
                Ok((b.num_batches(), bank_batches(b)))
            }
            Self::Photos(p) => {
                let sampler = match p.m_per_class {
                    Some(m) => Sampler::MPerClass { m },
                    None => Sampler::Random,
                };
                let loader = p.loader(batch_size, sampler, Transform::train(p.size), norm, seed)?;
                let n = loader.plan(epoch).len();
                Ok((n, photo_batches(loader, epoch, device.clone())))
            }
        }
    }

    /// All images in order, in evaluation form, batch by batch, with their positions in
    /// the subset (an image the photo pipeline skipped has none).
    pub fn eval_batches<'a>(
        &'a self,
        norm: &'a Normalization,
        device: &Device,
    ) -> Result<EvalIter<'a>> {
        match self {
            Self::Memory { bank, zeros } => {
                let b = Batches::eval(bank, zeros, 256, norm, device)?;
                Ok(Box::new(b.map(|r| {
                    let b = r?;
                    Ok((b.images, b.indices))
                })))
            }
            Self::Photos(p) => {
                let loader = p.loader(64, Sampler::Sequential, Transform::eval(p.size), norm, 0)?;
                let mut up = nofuss_tensor::upload::Uploader::default();
                let device = device.clone();
                Ok(Box::new(loader.epoch(0).map(move |r| {
                    let b = r?;
                    let (images, _) = b.to_tensors_with(&mut up, &device)?;
                    Ok((images, b.positions))
                })))
            }
        }
    }
}

impl PhotoSource {
    fn loader(
        &self,
        batch_size: usize,
        sampler: Sampler,
        transform: Transform,
        norm: &Normalization,
        seed: u64,
    ) -> Result<Loader> {
        if norm.channels() != 3 {
            return Err(TrainError::Config(
                "the photo pipeline makes 3-channel images: use --channels 3".into(),
            ));
        }
        let loader = Loader::new(
            &self.dataset,
            &self.subset,
            LoaderConfig {
                batch_size,
                sampler,
                transform,
                normalization: norm.clone(),
                seed,
                prefetch: 4,
                bad_images: if self.skip_bad_images {
                    BadImages::Skip
                } else {
                    BadImages::Fail
                },
                threads: 0,
            },
        )?
        .with_skip_log(self.skipped.clone());
        Ok(match &self.boxes {
            Some(b) => loader.with_boxes(b)?,
            None => loader,
        })
    }
}

/// In-memory batches as model batches, one at a time.
fn bank_batches(b: Batches<'_>) -> BatchIter<'_> {
    Box::new(b.map(|r| {
        let b = r?;
        let n = b.indices.len();
        Ok((b.images, b.labels, n))
    }))
}

fn photo_batches<'a>(loader: Loader, epoch: u64, device: Device) -> BatchIter<'a> {
    // On a GPU through page-locked buffers: the host queues the step while they go up.
    let mut up = nofuss_tensor::upload::Uploader::default();
    Box::new(loader.epoch(epoch).map(move |r| {
        let b = r?;
        let (images, labels) = b.to_tensors_with(&mut up, &device)?;
        Ok((images, labels, b.labels.len()))
    }))
}
