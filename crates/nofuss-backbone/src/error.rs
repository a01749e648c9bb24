/// Errors of the backbone crate.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// An invalid setting.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A weight file that cannot be read or does not fit the model.
    #[error("weights {}: {message}", path.display())]
    Weights {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An error from candle (shapes, missing weights, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, BackboneError>;
