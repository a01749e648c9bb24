use std::path::PathBuf;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An invalid or inconsistent setting.
    #[error("configuration: {0}")]
    Config(String),
    /// A configuration file that cannot be read or parsed.
    #[error("{path}: {message}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong (with line and column for parse errors).
        message: String,
    },
    /// An input file (embeddings, labels) that cannot be used.
    #[error("{path}: {message}")]
    Input {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A run directory that already holds finished work.
    #[error("run directory {path} already holds {epochs} finished epoch(s); choose another --name or remove it")]
    RunExists {
        /// The directory.
        path: PathBuf,
        /// Epochs recorded in its metrics.
        epochs: usize,
    },
    /// Every batch of an epoch was skipped: the loss had nothing to compare.
    #[error("no batch of epoch {epoch} had anything to learn from ({reason}); stopped. {finished} finished epoch(s) are kept in {run_dir}. With dynamic assignment, try more proxies (--num-proxies); with triplet or NCA losses, larger batches")]
    NothingToLearn {
        /// The epoch (1-based).
        epoch: usize,
        /// The loss's explanation.
        reason: String,
        /// The run directory.
        run_dir: PathBuf,
        /// Epochs finished before.
        finished: usize,
    },
    /// The loss (or a gradient) became NaN or infinite.
    #[error("non-finite loss {loss} at epoch {epoch}, step {step}; stopped. {finished} finished epoch(s) are kept in {run_dir} (metrics.jsonl, last.safetensors). Try a lower learning rate (--lr, --proxy-lr), gradient clipping (--clip-norm) or a smaller loss scale (--loss-scale)")]
    NonFinite {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
        /// The value seen.
        loss: f32,
        /// Where finished work is.
        run_dir: PathBuf,
        /// Epochs finished (and saved) before the failure.
        finished: usize,
    },
    /// A training step replayed from a CUDA graph (`cuda_graph`) failed, or its capture.
    #[error("epoch {epoch}, step {step}: the CUDA graph of the training step failed: {reason}; stopped. {finished} finished epoch(s) are kept in {run_dir}: set cuda_graph = false in its config.toml and resume it (--resume) to go on without CUDA graphs")]
    Replay {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
        /// What failed.
        reason: String,
        /// Where finished work is.
        run_dir: PathBuf,
        /// Epochs finished (and saved) before the failure.
        finished: usize,
    },
    /// File output.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause, part of the message (not also returned by `source()`, so that a
        /// report of the whole chain does not print it twice).
        error: std::io::Error,
    },
    /// From the data layer.
    #[error(transparent)]
    Data(#[from] nofuss_data::DataError),
    /// From the loss.
    #[error(transparent)]
    Loss(#[from] nofuss_losses::LossError),
    /// From the evaluation.
    #[error(transparent)]
    Eval(#[from] nofuss_eval::EvalError),
    /// From the model.
    #[error(transparent)]
    Backbone(#[from] nofuss_backbone::BackboneError),
    /// From the tensor core.
    #[error(transparent)]
    Tensor(#[from] nofuss_tensor::Error),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
