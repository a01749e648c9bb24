use std::path::PathBuf;

/// Errors of the data layer. Each names the file (and line, for text files) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause, part of the message (not also returned by `source()`, so that a
        /// report of the whole chain does not print it twice).
        error: std::io::Error,
    },
    /// A malformed line in an annotation file.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Annotation files that disagree with each other or with the images.
    #[error("{path}: {message}")]
    Inconsistent {
        /// The file where the problem shows.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An image that cannot be decoded.
    #[error("cannot decode image {path}: {message}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// An invalid setting or request.
    #[error("{0}")]
    Config(String),
    /// An error from candle while building tensors.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DataError>;
