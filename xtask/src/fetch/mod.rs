//! `cargo xtask fetch-data` / `fetch-weights`: verified, resumable, safe downloads.
//!
//! For each file of a [`Dataset`]: take it from `--from-archive`, or download it from
//! the mirror or the official URL into `<dest>/.downloads/<file>.part` (resumed with
//! HTTP Range after an interruption, retried with backoff), hash it while streaming,
//! and check size and checksums; a bad file is moved aside and the run fails. Then
//! extract everything into a temporary folder next to the target, checking every
//! entry, write a marker recording the verified checksums, and rename the folder into
//! place. A second run finds the marker and does nothing.

mod digest;
mod download;
mod error;
mod extract;

use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use digest::{digest_file, Digests};
pub use download::DownloadOptions;
pub use error::{FetchError, Result};
pub use extract::extract;

use crate::catalog::{Artifact, Dataset};

/// The marker file written into a fetched folder.
pub const MARKER: &str = ".nofuss-fetch.toml";

/// Settings of one fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Parent folder of the dataset folders.
    pub dest: PathBuf,
    /// Base URL of a mirror; file names are appended.
    pub mirror: Option<String>,
    /// Local copies of the files, matched by file name (a single file also matches a
    /// single-file dataset whatever its name).
    pub from_archive: Vec<PathBuf>,
    /// Print what would happen and stop.
    pub dry_run: bool,
    /// Skip the terms prompt.
    pub accept_terms: bool,
    /// Whether a person can answer the prompt.
    pub interactive: bool,
    /// Transfer settings.
    pub download: DownloadOptions,
}

/// What a fetch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Downloaded or copied, verified and extracted into this folder.
    Fetched(PathBuf),
    /// The folder was already there with a valid marker.
    AlreadyThere(PathBuf),
    /// Dry run: nothing was done.
    DryRun,
}

/// One verified file, as recorded in the marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// File name.
    pub file: String,
    /// Where it came from (URL or local path).
    pub source: String,
    /// Whether that source is one of the official URLs.
    pub official: bool,
    /// Bytes.
    pub size: u64,
    /// MD5.
    pub md5: String,
    /// SHA-256.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    dataset: String,
    files: Vec<Verified>,
}

/// Where a file will come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Local(PathBuf),
    Url { url: String, official: bool },
}

fn pick_source(ds: &Dataset, a: &Artifact, opts: &FetchOptions) -> Result<Source> {
    let by_name = opts.from_archive.iter().find(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy() == a.file_name)
    });
    let single =
        (ds.artifacts.len() == 1 && opts.from_archive.len() == 1).then(|| &opts.from_archive[0]);
    if let Some(p) = by_name.or(single) {
        return Ok(Source::Local(p.clone()));
    }
    if let Some(m) = &opts.mirror {
        return Ok(Source::Url {
            url: format!("{}/{}", m.trim_end_matches('/'), a.file_name),
            official: false,
        });
    }
    match a.urls.first() {
        Some(u) => Ok(Source::Url {
            url: u.clone(),
            official: true,
        }),
        None => Err(FetchError::NoSource {
            file: a.file_name.clone(),
            how: ds
                .how_to_obtain
                .clone()
                .unwrap_or_else(|| "pass --mirror URL or --from-archive PATH".into()),
        }),
    }
}

/// The marker of `target` if it matches what `ds` expects.
fn valid_marker(ds: &Dataset, target: &Path) -> Option<Marker> {
    let m: Marker = toml::from_str(&fs::read_to_string(target.join(MARKER)).ok()?).ok()?;
    let all_match = ds.artifacts.iter().all(|a| {
        m.files.iter().any(|v| {
            v.file == a.file_name
                && a.md5.as_ref().is_none_or(|x| *x == v.md5)
                && a.sha256.as_ref().is_none_or(|x| *x == v.sha256)
        })
    });
    (m.dataset == ds.key && all_match).then_some(m)
}

/// Free bytes on the file system holding `path`.
#[cfg(unix)]
pub fn available_space(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Free bytes on the file system holding `path` (unknown off Unix).
#[cfg(not(unix))]
pub fn available_space(_path: &Path) -> Option<u64> {
    None
}

fn ask(out: &mut dyn Write, question: &str) -> bool {
    let _ = write!(out, "{question} [y/N] ");
    let _ = out.flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).is_ok() && matches!(line.trim(), "y" | "Y" | "yes")
}

/// Fetches `ds` as `opts` says, writing what it does to `out`.
pub fn fetch(ds: &Dataset, opts: &FetchOptions, out: &mut dyn Write) -> Result<Outcome> {
    let w = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    let target = opts.dest.join(&ds.folder);
    let root = target.join(&ds.data_root);
    if let Some(m) = valid_marker(ds, &target) {
        w(
            out,
            format!(
                "{}: already fetched and verified in {} ({} file(s)); nothing to do.",
                ds.title,
                target.display(),
                m.files.len()
            ),
        );
        w(out, format!("next: {}", next_step(ds, &root)));
        return Ok(Outcome::AlreadyThere(target));
    }
    if target.exists() {
        return Err(FetchError::ForeignTarget(target));
    }
    w(
        out,
        format!(
            "{}\n  homepage: {}\n  cite: {}\n  terms: {}",
            ds.title, ds.homepage, ds.citation, ds.terms
        ),
    );
    let sources: Vec<Source> = ds
        .artifacts
        .iter()
        .map(|a| pick_source(ds, a, opts))
        .collect::<Result<_>>()?;
    for (a, s) in ds.artifacts.iter().zip(&sources) {
        let size = a
            .size
            .map(|n| format!("{n} bytes"))
            .unwrap_or_else(|| "size unknown".into());
        let from = match s {
            Source::Local(p) => format!("local file {}", p.display()),
            Source::Url {
                url,
                official: true,
            } => format!("{url} (official)"),
            Source::Url {
                url,
                official: false,
            } => format!("{url} (UNOFFICIAL mirror: checked against the official checksums)"),
        };
        w(out, format!("  {}: {size}, from {from}", a.file_name));
    }
    w(out, format!("  into: {}", target.display()));
    let downloads: u64 = ds
        .artifacts
        .iter()
        .zip(&sources)
        .filter(|(_, s)| matches!(s, Source::Url { .. }))
        .filter_map(|(a, _)| a.size)
        .sum();
    let unpacked: u64 = ds.artifacts.iter().filter_map(|a| a.size).sum::<u64>() * 11 / 10;
    let needed = downloads + unpacked;
    if opts.dry_run {
        w(
            out,
            format!("  dry run: about {needed} bytes of disk would be needed; nothing was done."),
        );
        return Ok(Outcome::DryRun);
    }
    let accepted =
        opts.accept_terms || (opts.interactive && ask(out, "Accept these terms and download?"));
    if !accepted {
        return Err(FetchError::TermsNotAccepted(ds.title.clone()));
    }
    fs::create_dir_all(&opts.dest).map_err(|e| FetchError::io(&opts.dest, e))?;
    if let Some(available) = available_space(&opts.dest) {
        if needed > available {
            return Err(FetchError::DiskSpace {
                path: opts.dest.clone(),
                needed,
                available,
            });
        }
    }
    let downloads_dir = opts.dest.join(".downloads");
    let mut verified = Vec::new();
    let mut files = Vec::new();
    for (a, s) in ds.artifacts.iter().zip(&sources) {
        let (path, source, official, d) = match s {
            Source::Local(p) => (p.clone(), p.display().to_string(), false, digest_file(p)?),
            Source::Url { url, official } => {
                fs::create_dir_all(&downloads_dir)
                    .map_err(|e| FetchError::io(&downloads_dir, e))?;
                let done = downloads_dir.join(&a.file_name);
                let d = if done.exists() {
                    w(
                        out,
                        format!("using the earlier download {}", done.display()),
                    );
                    digest_file(&done)?
                } else {
                    let part = downloads_dir.join(format!("{}.part", a.file_name));
                    w(out, format!("downloading {url}"));
                    // Hashed while streaming (the resumed prefix included).
                    let d = download::download(url, &part, a.size, &opts.download)?;
                    fs::rename(&part, &done).map_err(|e| FetchError::io(&done, e))?;
                    d
                };
                (done, url.clone(), *official, d)
            }
        };
        // A download that fails is moved aside; a user's own file is never touched.
        digest::verify(a, &d, &path, matches!(s, Source::Url { .. }))?;
        if a.md5.is_none() && a.sha256.is_none() {
            w(out, format!(
                "  {}: no checksum is published for this file; its SHA-256 {} is recorded in {MARKER} \
                 on this first download (trust on first use)",
                a.file_name, d.sha256
            ));
        } else {
            w(
                out,
                format!(
                    "  verified {} (MD5 {}, SHA-256 {})",
                    a.file_name, d.md5, d.sha256
                ),
            );
        }
        verified.push(Verified {
            file: a.file_name.clone(),
            source,
            official,
            size: d.len,
            md5: d.md5,
            sha256: d.sha256,
        });
        files.push(path);
    }
    let tmp_prefix = format!(".{}.tmp-", ds.folder.replace('/', "_"));
    // Temporary folders of earlier runs that were interrupted: ours by name, never complete.
    for e in fs::read_dir(&opts.dest)
        .map_err(|e| FetchError::io(&opts.dest, e))?
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(&tmp_prefix) {
            fs::remove_dir_all(e.path()).map_err(|err| FetchError::io(e.path(), err))?;
        }
    }
    let tmp = opts
        .dest
        .join(format!("{tmp_prefix}{}", std::process::id()));
    fs::create_dir_all(&tmp).map_err(|e| FetchError::io(&tmp, e))?;
    let mut unpack = || -> Result<()> {
        for (a, f) in ds.artifacts.iter().zip(&files) {
            w(out, format!("extracting {}", a.file_name));
            extract(f, a.kind, &tmp)?;
        }
        let marker = Marker {
            dataset: ds.key.clone(),
            files: verified.clone(),
        };
        let text = toml::to_string(&marker).map_err(|e| FetchError::Archive {
            path: tmp.join(MARKER),
            message: e.to_string(),
        })?;
        fs::write(tmp.join(MARKER), text).map_err(|e| FetchError::io(tmp.join(MARKER), e))?;
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| FetchError::io(parent, e))?;
        }
        fs::rename(&tmp, &target).map_err(|e| FetchError::io(&target, e))
    };
    if let Err(e) = unpack() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    w(out, format!("done: {}", target.display()));
    if sources.iter().any(|s| matches!(s, Source::Url { .. })) {
        w(
            out,
            format!(
                "  the downloaded file(s) stay in {} for re-extraction; delete them to save space",
                downloads_dir.display()
            ),
        );
    }
    w(out, format!("next: {}", next_step(ds, &root)));
    Ok(Outcome::Fetched(target))
}

fn next_step(ds: &Dataset, root: &Path) -> String {
    ds.next_step.replace("{root}", &root.display().to_string())
}
