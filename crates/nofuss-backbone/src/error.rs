/// Errors of the backbone crate.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// An invalid setting.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// An error from candle (shapes, missing weights, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, BackboneError>;
