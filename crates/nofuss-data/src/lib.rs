//! Data for zero-shot deep metric learning: datasets on disk, the class split used by
//! the literature, image decoding and batches ready for a candle model.
//!
//! - [`cub`]: the CUB-200-2011 layout (`images.txt`, `image_class_labels.txt`,
//!   `classes.txt`, `images/`), which real datasets and the embedded default share.
//! - [`cars`]: Cars196 (`cars_annos.mat`, read by the MAT-file reader in [`mat`]).
//! - [`sop`]: Stanford Online Products (`Ebay_train.txt` / `Ebay_test.txt`, the files'
//!   own split); [`folder`]: a folder per class, for your own data, or any images
//!   under a folder ([`folder::load_tree`], to embed them).
//! - [`glyphs`]: the embedded default dataset, generated offline from the fonts under
//!   `data/fonts/` (one class per character, several fonts, random affine distortions),
//!   written in the CUB layout.
//! - [`ZeroShotSplit`]: train on the first half of the classes, test on the unseen rest.
//! - [`transform`] and [`pipeline`]: the photo pipeline (decode, RandomResizedCrop or
//!   resize + center crop, flip, normalisation in one pass; random, class-balanced or
//!   sequential batches decoded in parallel behind a bounded prefetch queue).
//! - [`ImageBank`] decodes small images (the glyphs) into memory in parallel; [`Batches`] yields shuffled, augmented,
//!   normalised `[B,C,H,W]` tensors with their labels.
//!
//! ```no_run
//! use nofuss_data::{cub, ZeroShotSplit, ImageBank, ImageSpec};
//! let ds = cub::load("data/glyphs")?;
//! let (train, test) = ZeroShotSplit::Halves.apply(&ds)?;
//! let bank = ImageBank::load(&ds, &train, ImageSpec { channels: 1, height: 32, width: 32 })?;
//! println!("{} training images of {} classes", bank.len(), train.num_classes());
//! # let _ = test;
//! # Ok::<(), nofuss_data::DataError>(())
//! ```

pub mod cars;
pub mod cub;
mod dataset;
mod error;
pub mod folder;
pub mod glyphs;
mod images;
mod loader;
pub mod mat;
pub mod pipeline;
pub mod sop;
pub mod transform;

pub use dataset::{BBox, ImageDataset, ImageRecord, Subset, ZeroShotSplit};
pub use error::{DataError, Result};
pub use images::{ImageBank, ImageSpec, Skipped};
pub use loader::{Augment, Batch, Batches};

/// The README's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;
