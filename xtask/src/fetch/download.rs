use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::digest::{Digests, Hashes};
use super::{FetchError, Result};

/// How downloads behave.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Retries after the first attempt, on transient errors.
    pub retries: u32,
    /// First wait between attempts; doubled each time.
    pub backoff: Duration,
    /// Connect and read timeout.
    pub timeout: Duration,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            retries: 5,
            backoff: Duration::from_secs(2),
            timeout: Duration::from_secs(60),
            progress: true,
        }
    }
}

/// What one attempt ended with.
enum Attempt {
    /// All bytes are in the part file.
    Done,
    /// A transient failure: try again (resuming).
    Retry(String),
}

/// Downloads `url` into `part` (resuming what is already there with an HTTP Range
/// request), hashing while streaming. Returns the digests of the whole file.
/// `expected_size`, when known, tells a cut transfer from a finished one.
pub fn download(
    url: &str,
    part: &Path,
    expected_size: Option<u64>,
    opts: &DownloadOptions,
) -> Result<Digests> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(opts.timeout)
        .timeout_read(opts.timeout)
        .build();
    let mut last = String::new();
    let mut wait = opts.backoff;
    for attempt in 0..=opts.retries {
        if attempt > 0 {
            eprintln!("  retrying in {:.1}s ({last})", wait.as_secs_f64());
            std::thread::sleep(wait);
            wait *= 2;
        }
        let mut hashes = Hashes::default();
        match attempt_once(&agent, url, part, expected_size, &mut hashes, opts)? {
            Attempt::Done => return Ok(hashes.finish()),
            Attempt::Retry(why) => last = why,
        }
    }
    Err(FetchError::GaveUp {
        url: url.to_string(),
        attempts: opts.retries + 1,
        last,
    })
}

fn attempt_once(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    expected_size: Option<u64>,
    hashes: &mut Hashes,
    opts: &DownloadOptions,
) -> Result<Attempt> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if expected_size.is_some_and(|s| have == s) {
        // Already complete from an earlier run: hash what is there.
        let f = File::open(part).map_err(|e| FetchError::io(part, e))?;
        hashes.update_from(std::io::BufReader::new(f), part)?;
        return Ok(Attempt::Done);
    }
    let mut req = agent.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) if have > 0 => {
            // Nothing left to send: the part file holds the whole resource.
            let f = File::open(part).map_err(|e| FetchError::io(part, e))?;
            hashes.update_from(std::io::BufReader::new(f), part)?;
            return Ok(Attempt::Done);
        }
        Err(ureq::Error::Status(code, _)) if code >= 500 || code == 429 || code == 408 => {
            return Ok(Attempt::Retry(format!("HTTP {code}")));
        }
        Err(ureq::Error::Status(code, _)) => {
            return Err(FetchError::Http {
                url: url.to_string(),
                status: code,
            });
        }
        Err(ureq::Error::Transport(t)) => {
            // ureq starts its message with the URL, which the errors here already name.
            let why = t.to_string();
            let why = why.strip_prefix(&format!("{url}: ")).unwrap_or(&why);
            return Ok(Attempt::Retry(why.to_string()));
        }
    };
    let resumed =
        resp.status() == 206 && content_range_start(resp.header("Content-Range")) == Some(have);
    let start = if resumed { have } else { 0 };
    if have > 0 && !resumed {
        eprintln!("  the server did not resume at byte {have}; starting over");
    }
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .map_err(|e| FetchError::io(part, e))?;
    if resumed {
        let f = File::open(part).map_err(|e| FetchError::io(part, e))?;
        hashes.update_from(std::io::BufReader::new(f).take(have), part)?;
    }
    let remaining: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let total = expected_size.or(remaining.map(|r| r + start));
    let pb = if opts.progress {
        ProgressBar::new(total.unwrap_or(0))
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "  [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_position(start);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                file.flush().map_err(|e| FetchError::io(part, e))?;
                pb.abandon();
                return Ok(Attempt::Retry(format!(
                    "transfer interrupted after {} bytes: {e}",
                    start + received
                )));
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| FetchError::io(part, e))?;
        hashes.update(&buf[..n]);
        received += n as u64;
        pb.inc(n as u64);
    }
    file.sync_all().map_err(|e| FetchError::io(part, e))?;
    pb.finish_and_clear();
    let got = start + received;
    if let Some(want) = total {
        if got < want {
            return Ok(Attempt::Retry(format!(
                "connection closed at byte {got} of {want}"
            )));
        }
    }
    Ok(Attempt::Done)
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` header.
fn content_range_start(h: Option<&str>) -> Option<u64> {
    h?.trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        assert_eq!(content_range_start(Some("bytes 100-199/200")), Some(100));
        assert_eq!(content_range_start(Some("bytes */200")), None);
        assert_eq!(content_range_start(None), None);
    }

    #[test]
    fn a_refused_connection_gives_up_naming_the_url_once() {
        // A port that was just free: nothing listens on it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/x.tgz");
        let dir = tempfile::tempdir().unwrap();
        let opts = DownloadOptions {
            retries: 1,
            backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(2),
            progress: false,
        };
        let err = download(&url, &dir.path().join("x.part"), None, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("{url}: giving up after 2 attempt(s): ")),
            "{err}"
        );
        assert_eq!(err.matches(&url).count(), 1, "{err}");
    }
}
