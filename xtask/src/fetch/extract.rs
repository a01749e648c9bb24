//! Extraction that never writes outside its target folder.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Component, Path, PathBuf};

use super::{FetchError, Result};
use crate::catalog::ArchiveKind;

/// Whether `p` is a relative path that stays inside its root (no root, prefix or `..`).
fn is_contained(p: &Path) -> bool {
    let mut depth = 0i32;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Whether a link stored at `entry` pointing to `target` stays inside the root.
fn link_is_contained(entry: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let base = entry.parent().unwrap_or(Path::new(""));
    is_contained(&base.join(target))
}

/// Extracts `archive` of `kind` into the (existing, empty) folder `into`.
/// Every entry is checked first: absolute paths, `..` components and links that
/// point outside are rejected, and nothing is extracted from such an archive.
pub fn extract(archive: &Path, kind: ArchiveKind, into: &Path) -> Result<()> {
    match kind {
        ArchiveKind::TarGz => {
            check_tar(archive)?;
            let mut ar = tar_reader(archive)?;
            ar.set_overwrite(true);
            ar.unpack(into).map_err(|e| FetchError::Archive {
                path: archive.to_path_buf(),
                message: e.to_string(),
            })
        }
        ArchiveKind::Zip => extract_zip(archive, into),
        ArchiveKind::Raw => {
            let name = archive.file_name().ok_or_else(|| FetchError::Archive {
                path: archive.to_path_buf(),
                message: "no file name".into(),
            })?;
            let dst = into.join(name);
            fs::copy(archive, &dst)
                .map(|_| ())
                .map_err(|e| FetchError::io(&dst, e))
        }
    }
}

fn tar_reader(archive: &Path) -> Result<tar::Archive<flate2::read::GzDecoder<BufReader<File>>>> {
    let f = File::open(archive).map_err(|e| FetchError::io(archive, e))?;
    Ok(tar::Archive::new(flate2::read::GzDecoder::new(
        BufReader::new(f),
    )))
}

fn check_tar(archive: &Path) -> Result<()> {
    let bad = |message: String| FetchError::Archive {
        path: archive.to_path_buf(),
        message,
    };
    let unsafe_entry = |entry: &Path, reason: &str| FetchError::UnsafeEntry {
        archive: archive.to_path_buf(),
        entry: entry.display().to_string(),
        reason: reason.to_string(),
    };
    let mut ar = tar_reader(archive)?;
    for entry in ar.entries().map_err(|e| bad(e.to_string()))? {
        let entry = entry.map_err(|e| bad(e.to_string()))?;
        // The raw name: `Entry::path` would already have dropped a leading '/'.
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let path = PathBuf::from(&raw);
        if raw.starts_with('/') || !is_contained(&path) {
            return Err(unsafe_entry(
                &path,
                "absolute path or '..' leaves the target folder",
            ));
        }
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| bad(e.to_string()))?
                .map(|t| t.into_owned())
                .unwrap_or_default();
            let ok = if kind.is_hard_link() {
                !target.is_absolute() && is_contained(&target)
            } else {
                link_is_contained(&path, &target)
            };
            if !ok {
                return Err(unsafe_entry(
                    &path,
                    &format!("link to {} leaves the target folder", target.display()),
                ));
            }
        } else if !(kind.is_file()
            || kind.is_dir()
            || kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname())
        {
            return Err(unsafe_entry(
                &path,
                "special file (device, fifo) in a dataset archive",
            ));
        }
    }
    Ok(())
}

fn extract_zip(archive: &Path, into: &Path) -> Result<()> {
    let bad = |message: String| FetchError::Archive {
        path: archive.to_path_buf(),
        message,
    };
    let f = File::open(archive).map_err(|e| FetchError::io(archive, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(f)).map_err(|e| bad(e.to_string()))?;
    // Check every name before writing anything.
    for i in 0..zip.len() {
        let file = zip.by_index_raw(i).map_err(|e| bad(e.to_string()))?;
        let name = file.name().to_string();
        if file.enclosed_name().is_none()
            || name.starts_with('/')
            || !is_contained(Path::new(&name))
        {
            return Err(FetchError::UnsafeEntry {
                archive: archive.to_path_buf(),
                entry: name,
                reason: "absolute path or '..' leaves the target folder".into(),
            });
        }
        if file.is_symlink() {
            return Err(FetchError::UnsafeEntry {
                archive: archive.to_path_buf(),
                entry: name,
                reason: "symbolic links are not accepted in zip archives".into(),
            });
        }
    }
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let rel = file
            .enclosed_name()
            .ok_or_else(|| bad(format!("entry {i} has an unsafe name")))?;
        let dst = into.join(rel);
        if file.is_dir() {
            fs::create_dir_all(&dst).map_err(|e| FetchError::io(&dst, e))?;
            continue;
        }
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(|e| FetchError::io(parent, e))?;
        }
        let mut out = File::create(&dst).map_err(|e| FetchError::io(&dst, e))?;
        std::io::copy(&mut file, &mut out).map_err(|e| FetchError::io(&dst, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment() {
        assert!(is_contained(Path::new("a/b/../c")));
        assert!(is_contained(Path::new("./a")));
        assert!(!is_contained(Path::new("a/../../b")));
        assert!(!is_contained(Path::new("/etc/passwd")));
        assert!(link_is_contained(Path::new("a/b/link"), Path::new("../c")));
        assert!(!link_is_contained(
            Path::new("a/link"),
            Path::new("../../c")
        ));
        assert!(!link_is_contained(Path::new("a/link"), Path::new("/etc")));
    }
}
