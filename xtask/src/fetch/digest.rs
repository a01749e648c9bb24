use std::io::Read;
use std::path::Path;

use md5::Md5;
use sha2::{Digest, Sha256};

use super::{FetchError, Result};
use crate::catalog::Artifact;

/// MD5 and SHA-256 computed together while bytes stream past.
#[derive(Clone, Default)]
pub struct Hashes {
    md5: Md5,
    sha256: Sha256,
    len: u64,
}

/// Final digests of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// Lowercase hex MD5.
    pub md5: String,
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Length in bytes.
    pub len: u64,
}

impl Hashes {
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.md5.update(bytes);
        self.sha256.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Feeds a whole reader.
    pub fn update_from(&mut self, mut r: impl Read, path: &Path) -> Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf).map_err(|e| FetchError::io(path, e))?;
            if n == 0 {
                return Ok(());
            }
            self.update(&buf[..n]);
        }
    }

    /// The digests.
    pub fn finish(self) -> Digests {
        Digests {
            md5: format!("{:x}", self.md5.finalize()),
            sha256: format!("{:x}", self.sha256.finalize()),
            len: self.len,
        }
    }
}

/// Hashes a file on disk.
pub fn digest_file(path: &Path) -> Result<Digests> {
    let f = std::fs::File::open(path).map_err(|e| FetchError::io(path, e))?;
    let mut h = Hashes::default();
    h.update_from(std::io::BufReader::new(f), path)?;
    Ok(h.finish())
}

/// The first difference between `d` and what `a` expects: (what, expected, actual).
pub fn mismatch(a: &Artifact, d: &Digests) -> Option<(&'static str, String, String)> {
    if let Some(s) = a.size.filter(|s| *s != d.len) {
        return Some(("size", s.to_string(), d.len.to_string()));
    }
    if let Some(m) = a.md5.as_ref().filter(|m| **m != d.md5) {
        return Some(("MD5", m.clone(), d.md5.clone()));
    }
    if let Some(m) = a.sha256.as_ref().filter(|m| **m != d.sha256) {
        return Some(("SHA-256", m.clone(), d.sha256.clone()));
    }
    None
}

/// Checks `d` against what `a` expects. With `move_aside`, a mismatching file at
/// `path` is renamed to `<path>.bad` (a download); otherwise it is left untouched
/// (a user's own file). The error says where the bad file is.
pub fn verify(a: &Artifact, d: &Digests, path: &Path, move_aside: bool) -> Result<()> {
    let Some((what, expected, actual)) = mismatch(a, d) else {
        return Ok(());
    };
    let kept = if move_aside {
        let kept = bad_path(path);
        std::fs::rename(path, &kept).map_err(|e| FetchError::io(&kept, e))?;
        kept
    } else {
        path.to_path_buf()
    };
    Err(FetchError::Checksum {
        file: a.file_name.clone(),
        what,
        expected,
        actual,
        kept,
    })
}

fn bad_path(path: &Path) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".bad");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let mut h = Hashes::default();
        h.update(b"abc");
        let d = h.finish();
        assert_eq!(d.md5, "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.len, 3);
    }
}
