/// Errors of the tensor core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device string that is not `cpu`, `cuda`, `cuda:N` or `auto`.
    #[error("unknown device '{0}': expected cpu, cuda, cuda:N or auto")]
    BadDeviceSpec(String),
    /// A precision string that is not `f32` or `bf16`.
    #[error("unknown precision '{0}': expected f32 or bf16")]
    BadPrecision(String),
    /// CUDA was asked for but this binary was built without the `cuda` feature.
    #[error("CUDA device {0} requested, but nofuss was built without the `cuda` feature (rebuild with `--features cuda`)")]
    CudaNotCompiled(usize),
    /// A parameter requested twice with different shapes.
    #[error("parameter '{name}' exists with shape {existing:?}, requested {requested:?}")]
    ShapeMismatch {
        /// Parameter name.
        name: String,
        /// Shape already stored.
        existing: Vec<usize>,
        /// Shape asked for.
        requested: Vec<usize>,
    },
    /// An optimiser that cannot step (bad setting, state or gradient).
    #[error("optimiser: {0}")]
    Optim(String),
    /// A CUDA graph that could not be captured or replayed.
    #[error("CUDA graph: {0}")]
    Graph(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
