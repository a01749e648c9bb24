use std::path::PathBuf;

/// Why a fetch failed. Each names the file, URL or archive entry concerned.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No source for a file: no official URL, mirror or local archive.
    #[error("no source for {file}: {how}")]
    NoSource {
        /// The file.
        file: String,
        /// How to obtain it.
        how: String,
    },
    /// The terms were not accepted.
    #[error("the terms of {0} were not accepted (non-interactive runs need --accept-terms)")]
    TermsNotAccepted(String),
    /// Not enough free disk space.
    #[error("not enough disk space in {path}: {needed} bytes needed, {available} available")]
    DiskSpace {
        /// The destination.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// The server answered with an error status.
    #[error("{url}: HTTP {status}")]
    Http {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// Transfers kept failing.
    #[error("{url}: giving up after {attempts} attempt(s): {last}")]
    GaveUp {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The file's checksum or size differs from the expected one.
    #[error("{file}: {what} mismatch: expected {expected}, got {actual}; the bad file is kept at {kept}")]
    Checksum {
        /// The file.
        file: String,
        /// `MD5`, `SHA-256` or `size`.
        what: &'static str,
        /// Expected value.
        expected: String,
        /// Actual value.
        actual: String,
        /// Where the bad file was moved.
        kept: PathBuf,
    },
    /// An archive entry that would escape the target folder.
    #[error("{archive}: refusing entry '{entry}': {reason}; nothing was extracted")]
    UnsafeEntry {
        /// The archive.
        archive: PathBuf,
        /// The entry's name.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A target folder that exists without a fetch marker (not ours to replace).
    #[error("{0} exists but was not written by fetch-data (no marker); remove it or choose another --dest")]
    ForeignTarget(PathBuf),
    /// A malformed archive.
    #[error("{path}: {message}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// File system error.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause, part of the message (not also returned by `source()`, so that a
        /// report of the whole chain does not print it twice).
        error: std::io::Error,
    },
}

impl FetchError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, FetchError>;
