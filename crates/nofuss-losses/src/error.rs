/// Errors of the losses: bad shapes, labels or values are reported, never panicked on.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// The batch holds no example.
    #[error("empty batch: a loss needs at least one embedding")]
    EmptyBatch,
    /// Embeddings and proxies disagree in shape or rank.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A label that names no proxy.
    #[error("label {label} at batch index {index} is out of range for {num_proxies} proxies")]
    LabelOutOfRange {
        /// The offending label.
        label: i64,
        /// Its position in the batch.
        index: usize,
        /// Number of proxies.
        num_proxies: usize,
    },
    /// Labels of a dtype that is not an integer type.
    #[error("labels must be u8, u32 or i64, got {0:?}")]
    LabelDtype(candle_core::DType),
    /// NaN or infinity in an input.
    #[error("non-finite values in {0}")]
    NonFinite(&'static str),
    /// The batch offers nothing to compare (no positive pair, no negative, ...).
    #[error("nothing to learn from in this batch: {0}")]
    NoPairs(String),
    /// An invalid setting.
    #[error("invalid loss configuration: {0}")]
    Config(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, LossError>;
