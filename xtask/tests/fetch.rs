//! fetch-data against a local HTTP server on loopback, with archives built here.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xtask::catalog::{ArchiveKind, Artifact, Dataset};
use xtask::fetch::{
    digest_file, fetch, DownloadOptions, FetchError, FetchOptions, Outcome, MARKER,
};

#[derive(Default)]
struct ServerState {
    files: HashMap<String, Vec<u8>>,
    no_range: bool,
    /// Send only this many body bytes of the next response, then close.
    cut_next: Option<usize>,
    /// (path, Range header) of every request.
    log: Vec<(String, Option<String>)>,
}

type Shared = Arc<Mutex<ServerState>>;

fn serve(state: ServerState) -> (String, Shared) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shared: Shared = Arc::new(Mutex::new(state));
    let s = shared.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let s = s.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    return;
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line
                        .strip_prefix("Range: ")
                        .or_else(|| line.strip_prefix("range: "))
                    {
                        range = Some(v.trim().to_string());
                    }
                }
                let (body, status, extra, cut) = {
                    let mut st = s.lock().unwrap();
                    st.log.push((path.clone(), range.clone()));
                    let Some(data) = st.files.get(path.trim_start_matches('/')).cloned() else {
                        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        return;
                    };
                    let start: Option<usize> = range
                        .as_deref()
                        .and_then(|r| r.strip_prefix("bytes="))
                        .and_then(|r| r.trim_end_matches('-').parse().ok());
                    let cut = st.cut_next.take();
                    match start {
                        Some(b) if !st.no_range && b >= data.len() => {
                            let _ = stream.write_all(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                            return;
                        }
                        Some(b) if !st.no_range => {
                            let extra = format!(
                                "Content-Range: bytes {b}-{}/{}\r\n",
                                data.len() - 1,
                                data.len()
                            );
                            (data[b..].to_vec(), "206 Partial Content", extra, cut)
                        }
                        _ => (data, "200 OK", String::new(), cut),
                    }
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let n = cut.unwrap_or(body.len()).min(body.len());
                let _ = stream.write_all(&body[..n]);
                let _ = stream.flush();
            });
        }
    });
    (base, shared)
}

/// A gzip'd tar holding `Data/a.txt`, `Data/sub/b.txt` (large enough to cut mid-way).
fn good_tar() -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    let mut b = tar::Builder::new(gz);
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for (name, data) in [("Data/a.txt", b"alpha".to_vec()), ("Data/sub/b.txt", big)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// A gzip'd tar with one raw entry: `name` (written verbatim) of `kind`.
fn evil_tar(name: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(l) = link {
        h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"owned"
    } else {
        b""
    };
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, data).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

fn zip_with(names: &[&str]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for n in names {
        w.start_file(*n, zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(b"zipped").unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn dataset(file: &str, bytes: &[u8], urls: Vec<String>, kind: ArchiveKind, dir: &Path) -> Dataset {
    let p = dir.join(format!("digest-{file}"));
    std::fs::write(&p, bytes).unwrap();
    let d = digest_file(&p).unwrap();
    Dataset {
        key: "test".into(),
        title: "Test data".into(),
        homepage: "http://example.invalid".into(),
        citation: "nobody".into(),
        terms: "test terms".into(),
        artifacts: vec![Artifact {
            file_name: file.into(),
            urls,
            size: Some(bytes.len() as u64),
            md5: Some(d.md5),
            sha256: Some(d.sha256),
            trust_on_first_use: false,
            kind,
        }],
        folder: "test".into(),
        data_root: "Data".into(),
        how_to_obtain: None,
        next_step: "train on {root}".into(),
    }
}

fn opts(dest: &Path) -> FetchOptions {
    FetchOptions {
        dest: dest.to_path_buf(),
        mirror: None,
        from_archive: vec![],
        dry_run: false,
        accept_terms: true,
        interactive: false,
        download: DownloadOptions {
            retries: 3,
            backoff: Duration::from_millis(10),
            timeout: Duration::from_secs(10),
            progress: false,
        },
    }
}

fn run(ds: &Dataset, o: &FetchOptions) -> (Result<Outcome, FetchError>, String) {
    let mut out = Vec::new();
    let r = fetch(ds, o, &mut out);
    (r, String::from_utf8_lossy(&out).into_owned())
}

/// Every file under `dir`, relative.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    fn walk(base: &Path, d: &Path, v: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            v.push(p.strip_prefix(base).unwrap().to_path_buf());
            if p.is_dir() && !p.is_symlink() {
                walk(base, &p, v);
            }
        }
    }
    walk(dir, dir, &mut v);
    v.sort();
    v
}

#[test]
fn full_fetch_then_a_second_run_does_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let tgz = good_tar();
    let (base, st) = serve(ServerState {
        files: HashMap::from([("d/t.tgz".into(), tgz.clone())]),
        ..Default::default()
    });
    let ds = dataset(
        "t.tgz",
        &tgz,
        vec![format!("{base}/d/t.tgz")],
        ArchiveKind::TarGz,
        tmp.path(),
    );
    let dest = tmp.path().join("data");
    // An interrupted earlier run left its temporary folder behind.
    std::fs::create_dir_all(dest.join(".test.tmp-99999/half")).unwrap();
    let (r, out) = run(&ds, &opts(&dest));
    assert_eq!(r.unwrap(), Outcome::Fetched(dest.join("test")));
    assert_eq!(
        std::fs::read(dest.join("test/Data/a.txt")).unwrap(),
        b"alpha"
    );
    assert_eq!(
        std::fs::read(dest.join("test/Data/sub/b.txt"))
            .unwrap()
            .len(),
        200_000
    );
    assert!(dest.join("test").join(MARKER).exists());
    assert!(
        out.contains("(official)") && out.contains("test terms") && out.contains("next: train on"),
        "{out}"
    );
    assert!(out.contains(&dest.join("test/Data").display().to_string()));
    let requests = st.lock().unwrap().log.len();
    let (r, out) = run(&ds, &opts(&dest));
    assert_eq!(r.unwrap(), Outcome::AlreadyThere(dest.join("test")));
    assert!(out.contains("nothing to do"), "{out}");
    assert_eq!(
        st.lock().unwrap().log.len(),
        requests,
        "a no-op run must not download"
    );
    // No temporary folder or part file is left.
    let names: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    assert!(!dest.join(".downloads/t.tgz.part").exists());
}

#[test]
fn a_cut_transfer_is_resumed_with_range() {
    let tmp = tempfile::tempdir().unwrap();
    let tgz = good_tar();
    let half = tgz.len() / 2;
    let (base, st) = serve(ServerState {
        files: HashMap::from([("t.tgz".into(), tgz.clone())]),
        cut_next: Some(half),
        ..Default::default()
    });
    let ds = dataset(
        "t.tgz",
        &tgz,
        vec![format!("{base}/t.tgz")],
        ArchiveKind::TarGz,
        tmp.path(),
    );
    let dest = tmp.path().join("data");
    let (r, _) = run(&ds, &opts(&dest));
    r.unwrap();
    let log = st.lock().unwrap().log.clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].1, None);
    assert_eq!(log[1].1.as_deref(), Some(format!("bytes={half}-").as_str()));
    assert_eq!(
        std::fs::read(dest.join("test/Data/sub/b.txt"))
            .unwrap()
            .len(),
        200_000
    );
}

#[test]
fn a_server_without_range_support_restarts_from_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let tgz = good_tar();
    let (base, st) = serve(ServerState {
        files: HashMap::from([("t.tgz".into(), tgz.clone())]),
        no_range: true,
        cut_next: Some(tgz.len() / 3),
        ..Default::default()
    });
    let ds = dataset(
        "t.tgz",
        &tgz,
        vec![format!("{base}/t.tgz")],
        ArchiveKind::TarGz,
        tmp.path(),
    );
    let dest = tmp.path().join("data");
    run(&ds, &opts(&dest)).0.unwrap();
    let log = st.lock().unwrap().log.clone();
    assert_eq!(log.len(), 2);
    assert!(log[1].1.is_some(), "the client asks to resume");
    let marker = std::fs::read_to_string(dest.join("test").join(MARKER)).unwrap();
    assert!(marker.contains(
        &digest_file(&tmp.path().join("digest-t.tgz"))
            .unwrap()
            .sha256
    ));
}

#[test]
fn a_checksum_mismatch_keeps_the_bad_file_aside_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let tgz = good_tar();
    let (base, _) = serve(ServerState {
        files: HashMap::from([("t.tgz".into(), tgz.clone())]),
        ..Default::default()
    });
    let mut ds = dataset(
        "t.tgz",
        &tgz,
        vec![format!("{base}/t.tgz")],
        ArchiveKind::TarGz,
        tmp.path(),
    );
    ds.artifacts[0].md5 = Some("00000000000000000000000000000000".into());
    let dest = tmp.path().join("data");
    let err = run(&ds, &opts(&dest)).0.unwrap_err();
    match &err {
        FetchError::Checksum { what, kept, .. } => {
            assert_eq!(*what, "MD5");
            assert!(kept.exists(), "{}", kept.display());
            assert!(kept.to_string_lossy().ends_with("t.tgz.bad"));
        }
        e => panic!("{e}"),
    }
    assert!(err.to_string().contains("t.tgz.bad"));
    assert!(!dest.join("test").exists());
}

#[test]
fn http_errors_are_reported_with_the_url() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = serve(ServerState::default());
    let ds = dataset(
        "t.tgz",
        b"x",
        vec![format!("{base}/missing.tgz")],
        ArchiveKind::TarGz,
        tmp.path(),
    );
    let err = run(&ds, &opts(&tmp.path().join("data"))).0.unwrap_err();
    assert!(matches!(err, FetchError::Http { status: 404, .. }), "{err}");
    assert!(err.to_string().contains("missing.tgz"));
}

fn assert_rejected(archive: Vec<u8>, kind: ArchiveKind, file: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let sandbox = tmp.path().join("sandbox");
    std::fs::create_dir_all(&sandbox).unwrap();
    let local = tmp.path().join(file);
    std::fs::write(&local, &archive).unwrap();
    let ds = dataset(file, &archive, vec![], kind, tmp.path());
    let dest = sandbox.join("data");
    let before = tree(tmp.path());
    let mut o = opts(&dest);
    o.from_archive = vec![local];
    let err = run(&ds, &o).0.unwrap_err();
    assert!(matches!(err, FetchError::UnsafeEntry { .. }), "{err}");
    assert!(!dest.join("test").exists());
    // Nothing new anywhere but the (empty) destination folder itself.
    let after: Vec<PathBuf> = tree(tmp.path())
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(
        after.iter().all(|p| p == Path::new("sandbox/data")),
        "{after:?}"
    );
    assert!(!Path::new("/tmp/nofuss-evil-abs.txt").exists());
}

#[test]
fn tar_entries_leaving_the_target_are_rejected() {
    assert_rejected(
        evil_tar("../evil.txt", tar::EntryType::Regular, None),
        ArchiveKind::TarGz,
        "dotdot.tgz",
    );
    assert_rejected(
        evil_tar("Data/../../evil.txt", tar::EntryType::Regular, None),
        ArchiveKind::TarGz,
        "deep.tgz",
    );
    assert_rejected(
        evil_tar("/tmp/nofuss-evil-abs.txt", tar::EntryType::Regular, None),
        ArchiveKind::TarGz,
        "abs.tgz",
    );
    assert_rejected(
        evil_tar("Data/link", tar::EntryType::Symlink, Some("../../outside")),
        ArchiveKind::TarGz,
        "sym.tgz",
    );
    assert_rejected(
        evil_tar("Data/abs-link", tar::EntryType::Symlink, Some("/etc")),
        ArchiveKind::TarGz,
        "symabs.tgz",
    );
    assert_rejected(
        evil_tar("Data/hard", tar::EntryType::Link, Some("../x")),
        ArchiveKind::TarGz,
        "hard.tgz",
    );
}

#[test]
fn zip_slip_is_rejected() {
    assert_rejected(
        zip_with(&["Data/ok.txt", "../evil.txt"]),
        ArchiveKind::Zip,
        "slip.zip",
    );
    assert_rejected(zip_with(&["/abs.txt"]), ArchiveKind::Zip, "abs.zip");
}

#[test]
fn zips_extract() {
    let tmp = tempfile::tempdir().unwrap();
    let z = zip_with(&["Data/x.txt", "Data/y/z.txt"]);
    let local = tmp.path().join("p.zip");
    std::fs::write(&local, &z).unwrap();
    let ds = dataset("p.zip", &z, vec![], ArchiveKind::Zip, tmp.path());
    let mut o = opts(&tmp.path().join("data"));
    o.from_archive = vec![local];
    run(&ds, &o).0.unwrap();
    assert_eq!(
        std::fs::read(tmp.path().join("data/test/Data/y/z.txt")).unwrap(),
        b"zipped"
    );
}

#[test]
fn from_archive_needs_no_network_and_leaves_the_file_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let tgz = good_tar();
    let local = tmp.path().join("mine.tgz");
    std::fs::write(&local, &tgz).unwrap();
    // The official URL points nowhere: it must not be used.
    let ds = dataset(
        "t.tgz",
        &tgz,
        vec!["http://127.0.0.1:9/none.tgz".into()],
        ArchiveKind::TarGz,
        tmp.path(),
    );
    let mut o = opts(&tmp.path().join("data"));
    o.from_archive = vec![local.clone()];
    let (r, out) = run(&ds, &o);
    r.unwrap();
    assert!(out.contains("local file"), "{out}");
    assert!(local.exists());
    // A wrong local file fails without being moved.
    let mut bad = ds.clone();
    bad.artifacts[0].sha256 = Some("ab".repeat(32));
    let mut o2 = opts(&tmp.path().join("data2"));
    o2.from_archive = vec![local.clone()];
    assert!(matches!(
        run(&bad, &o2).0.unwrap_err(),
        FetchError::Checksum {
            what: "SHA-256",
            ..
        }
    ));
    assert!(local.exists());
}

#[test]
fn a_mirror_replaces_the_official_url_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let tgz = good_tar();
    let (base, _) = serve(ServerState {
        files: HashMap::from([("m/t.tgz".into(), tgz.clone())]),
        ..Default::default()
    });
    let ds = dataset(
        "t.tgz",
        &tgz,
        vec!["http://127.0.0.1:9/dead.tgz".into()],
        ArchiveKind::TarGz,
        tmp.path(),
    );
    let mut o = opts(&tmp.path().join("data"));
    o.mirror = Some(format!("{base}/m/"));
    let (r, out) = run(&ds, &o);
    r.unwrap();
    assert!(out.contains("UNOFFICIAL mirror"), "{out}");
    let marker = std::fs::read_to_string(tmp.path().join("data/test").join(MARKER)).unwrap();
    assert!(marker.contains("official = false"), "{marker}");
}

#[test]
fn disk_space_is_checked_before_downloading() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, st) = serve(ServerState::default());
    let mut ds = dataset(
        "t.tgz",
        b"x",
        vec![format!("{base}/t.tgz")],
        ArchiveKind::TarGz,
        tmp.path(),
    );
    ds.artifacts[0].size = Some(1 << 60);
    let err = run(&ds, &opts(&tmp.path().join("data"))).0.unwrap_err();
    assert!(matches!(err, FetchError::DiskSpace { .. }), "{err}");
    assert!(st.lock().unwrap().log.is_empty());
}

#[test]
fn unpublished_checksums_are_recorded_on_first_use() {
    let tmp = tempfile::tempdir().unwrap();
    let w = b"weights".to_vec();
    let (base, _) = serve(ServerState {
        files: HashMap::from([("w.pth".into(), w.clone())]),
        ..Default::default()
    });
    let mut ds = dataset(
        "w.pth",
        &w,
        vec![format!("{base}/w.pth")],
        ArchiveKind::Raw,
        tmp.path(),
    );
    let a = &mut ds.artifacts[0];
    (a.md5, a.sha256, a.size, a.trust_on_first_use) = (None, None, None, true);
    let (r, out) = run(&ds, &opts(&tmp.path().join("data")));
    r.unwrap();
    assert!(out.contains("trust on first use"), "{out}");
    let sha = digest_file(&tmp.path().join("digest-w.pth"))
        .unwrap()
        .sha256;
    let marker = std::fs::read_to_string(tmp.path().join("data/test").join(MARKER)).unwrap();
    assert!(marker.contains(&sha));
    assert_eq!(
        std::fs::read(tmp.path().join("data/test/w.pth")).unwrap(),
        w
    );
}

#[test]
fn terms_dry_runs_sources_and_foreign_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let tgz = good_tar();
    let ds = dataset(
        "t.tgz",
        &tgz,
        vec!["http://127.0.0.1:9/x.tgz".into()],
        ArchiveKind::TarGz,
        tmp.path(),
    );
    let dest = tmp.path().join("data");
    let mut o = opts(&dest);
    o.accept_terms = false;
    assert!(matches!(
        run(&ds, &o).0.unwrap_err(),
        FetchError::TermsNotAccepted(_)
    ));
    o.dry_run = true;
    let (r, out) = run(&ds, &o);
    assert_eq!(r.unwrap(), Outcome::DryRun);
    assert!(out.contains("dry run") && !dest.exists(), "{out}");
    let mut none = ds.clone();
    none.artifacts[0].urls.clear();
    none.how_to_obtain = Some("ask a friend".into());
    let err = run(&none, &opts(&dest)).0.unwrap_err();
    assert!(err.to_string().contains("ask a friend"), "{err}");
    std::fs::create_dir_all(dest.join("test")).unwrap();
    assert!(matches!(
        run(&ds, &opts(&dest)).0.unwrap_err(),
        FetchError::ForeignTarget(_)
    ));
}
