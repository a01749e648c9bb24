//! Run directories: `runs/<name>/` with `config.toml`, `metrics.jsonl`, checkpoints
//! and `plot.png`. Files are written atomically (temporary file, fsync, rename), and a
//! directory holding finished epochs is never overwritten.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Result, TrainError};

/// Metrics file name.
pub const METRICS: &str = "metrics.jsonl";
/// Resolved configuration file name.
pub const CONFIG: &str = "config.toml";
/// Checkpoint rewritten after every epoch.
pub const LAST_CHECKPOINT: &str = "last.safetensors";
/// Checkpoint written when the run ends.
pub const FINAL_CHECKPOINT: &str = "final.safetensors";
/// Model of the epoch chosen on the validation classes.
pub const BEST_CHECKPOINT: &str = "best.safetensors";

/// Plot of loss and Recall@1 per epoch.
pub const PLOT: &str = "plot.png";

/// The resumable state after epoch `epoch`: model, proxies, optimiser (`optim.*`) and
/// `nofuss.epoch`. Written before the epoch's metrics line; the previous one is removed
/// after it.
pub fn resume_checkpoint(dir: &Path, epoch: usize) -> PathBuf {
    dir.join(format!("resume-{epoch}.safetensors"))
}

/// The metrics lines of `dir` that parse, in order. A final line cut short by a kill is
/// dropped (and the file rewritten without it); a bad line elsewhere is an error naming it.
pub fn read_metrics(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let path = dir.join(METRICS);
    let text = fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) if v.is_object() => out.push(v),
            _ if i + 1 == lines.len() => {
                let mut kept = String::new();
                for v in &out {
                    kept.push_str(&v.to_string());
                    kept.push('\n');
                }
                write_atomic(&path, kept.as_bytes())?;
            }
            _ => {
                return Err(TrainError::Config(format!(
                    "{}:{}: not a metrics line",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(out)
}

/// Number of epoch lines (epoch >= 1) already recorded in `dir`.
pub fn finished_epochs(dir: &Path) -> usize {
    fs::read_to_string(dir.join(METRICS))
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| {
                    v.get("epoch")
                        .and_then(|e| e.as_u64())
                        .is_some_and(|e| e >= 1)
                })
                .count()
        })
        .unwrap_or(0)
}

/// Refuses a run directory `dir` that holds finished work (a finished epoch or a
/// checkpoint): [`TrainError::RunExists`].
pub fn check_free(dir: &Path) -> Result<()> {
    let epochs = finished_epochs(dir);
    let has_checkpoint = dir.join(LAST_CHECKPOINT).exists() || dir.join(FINAL_CHECKPOINT).exists();
    if epochs > 0 || has_checkpoint {
        return Err(TrainError::RunExists {
            path: dir.to_path_buf(),
            epochs,
        });
    }
    Ok(())
}

/// Creates the run directory. With an explicit `name`, an existing directory is
/// reused only if it holds no finished epoch; without one, a fresh
/// `<prefix>-<UTC timestamp>` name is picked (with a numeric suffix if taken).
pub fn create(out_dir: &Path, name: Option<&str>, prefix: &str) -> Result<PathBuf> {
    fs::create_dir_all(out_dir).map_err(|e| TrainError::io(out_dir, e))?;
    let dir = match name {
        Some(n) => {
            let dir = out_dir.join(n);
            check_free(&dir)?;
            dir
        }
        None => {
            let base = format!("{prefix}-{}", utc_stamp());
            let mut dir = out_dir.join(&base);
            let mut k = 2;
            while dir.exists() {
                dir = out_dir.join(format!("{base}-{k}"));
                k += 1;
            }
            dir
        }
    };
    fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    // A previous attempt that finished no epoch may have left partial metrics.
    let m = dir.join(METRICS);
    if m.exists() {
        fs::remove_file(&m).map_err(|e| TrainError::io(&m, e))?;
    }
    Ok(dir)
}

/// Writes `bytes` to `path` atomically: temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        fs::write(tmp, bytes).map_err(|e| TrainError::io(tmp, e))
    })
}

/// Lets `write` fill a temporary sibling of `path`, then fsyncs and renames it over
/// `path`: readers see the old file or the whole new one, never a part.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// Appends one JSON line to the metrics file and syncs it.
pub fn append_metrics(dir: &Path, line: &serde_json::Value) -> Result<()> {
    let path = dir.join(METRICS);
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| TrainError::io(&path, e))?;
    // One write of the whole line: formatted straight into the file, a JSON value goes
    // out a token per system call, and a reader (or a kill) could meet half a line.
    let text = format!("{line}\n");
    f.write_all(text.as_bytes())
        .map_err(|e| TrainError::io(&path, e))?;
    f.sync_data().map_err(|e| TrainError::io(&path, e))
}

/// `YYYYmmdd-HHMMSS` in UTC.
/// The current UTC time as `YYYYMMDD-HHMMSS`, for run names.
pub fn utc_stamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_runs_with_finished_epochs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = create(d.path(), Some("r"), "x").unwrap();
        // Reusable while nothing finished.
        append_metrics(&dir, &serde_json::json!({"epoch": 0})).unwrap();
        assert_eq!(create(d.path(), Some("r"), "x").unwrap(), dir);
        append_metrics(&dir, &serde_json::json!({"epoch": 0})).unwrap();
        append_metrics(&dir, &serde_json::json!({"epoch": 1})).unwrap();
        let e = create(d.path(), Some("r"), "x").unwrap_err();
        assert!(matches!(e, TrainError::RunExists { epochs: 1, .. }), "{e}");
        assert_eq!(finished_epochs(&dir), 1);
    }

    #[test]
    fn unnamed_runs_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let a = create(d.path(), None, "glyphs").unwrap();
        let b = create(d.path(), None, "glyphs").unwrap();
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with("glyphs-20") && name.len() == "glyphs-20261126-120000".len(),
            "{name}"
        );
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!d.path().join("f.tmp").exists());
    }
}
