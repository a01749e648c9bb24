//! The nofuss trainer: configuration, training loop, run directories and plots, as a
//! library under the thin `nofuss` binary.
//!
//! It ties the layers together: data from `nofuss-data`, a backbone and head from
//! `nofuss-backbone`, Proxy-NCA from `nofuss-losses`, Recall@K and NMI from
//! `nofuss-eval`, devices from `nofuss-tensor`.
//!
//! ```no_run
//! use nofuss::{config::TrainConfig, train::{train, TrainOptions}};
//! let mut cfg = TrainConfig::default();   // the embedded glyph dataset, small CNN
//! cfg.optim.epochs = 2;
//! let summary = train(&cfg, &TrainOptions { verbose: true, progress: true, resume: None })?;
//! println!("{}", nofuss::train::summary_table(&summary));
//! # Ok::<(), nofuss::TrainError>(())
//! ```

pub mod allocator;
pub mod bench;
pub mod cli;
pub mod compare;
pub mod config;
pub mod convert;
mod error;
pub mod eval_cmd;
pub mod images;
pub mod plot;
pub mod run_dir;
pub mod search;
pub mod threads;
pub mod train;

pub use error::{Result, TrainError};
