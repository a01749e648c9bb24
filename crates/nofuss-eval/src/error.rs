/// Errors of the evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Inconsistent lengths or dimensions.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// NaN or infinity in an embedding.
    #[error("embedding row {row} holds a NaN or infinite value")]
    NonFinite {
        /// First offending row.
        row: usize,
    },
    /// K that cannot be served: the query itself is excluded, so K must be below N.
    #[error("K = {k} needs at least {} points (the query is excluded), got {n}", k + 1)]
    KTooLarge {
        /// Requested K.
        k: usize,
        /// Number of points.
        n: usize,
    },
    /// K above the number of gallery rows a query/gallery search has.
    #[error("K = {k} needs at least {k} gallery embeddings, got {n}")]
    GalleryTooSmall {
        /// Requested K.
        k: usize,
        /// Number of gallery rows.
        n: usize,
    },
    /// NaN or infinity in a gallery embedding.
    #[error("gallery embedding row {row} holds a NaN or infinite value")]
    NonFiniteGallery {
        /// First offending row.
        row: usize,
    },
    /// A failure of the candle device (out of memory, driver error).
    #[error("device: {0}")]
    Device(String),
    /// An invalid setting.
    #[error("invalid setting: {0}")]
    Config(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, EvalError>;
