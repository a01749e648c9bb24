//! `cargo xtask <task>`: project automation written in Rust (matklad's xtask pattern).
//!
//! - `cargo xtask ci`: the checks CI runs (`cargo fmt --check`, clippy with warnings as
//!   errors, the test suite), stopping at the first failure.
//! - `cargo xtask glyphs [--dir DIR]`: generates the embedded default dataset (the
//!   trainer also does this on first use).
//! - `cargo xtask fetch-data [--dataset cub|cars|sop|all] ...`: downloads the benchmarks,
//!   verified and resumable (see `xtask::fetch`).
//! - `cargo xtask fetch-weights bn-inception`: the ImageNet BN-Inception weights.
//! - `cargo xtask bench train-step`: nofuss and PyTorch training steps side by side
//!   (every benchmark runs from the workspace root, wherever it is started).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use xtask::catalog::{catalog, find};
use xtask::fetch::{fetch, DownloadOptions, FetchOptions};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nofuss project automation")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the CI checks: fmt, clippy (-D warnings), tests.
    Ci,
    /// Generate the embedded glyph dataset.
    Glyphs {
        /// Where to write it.
        #[arg(long, default_value = "data/glyphs")]
        dir: PathBuf,
    },
    /// Download a benchmark dataset, verify it and unpack it under --dest.
    FetchData {
        /// Which dataset.
        #[arg(long, value_enum, default_value = "all")]
        dataset: Which,
        #[command(flatten)]
        common: Common,
    },
    /// Run a benchmark side by side with its PyTorch reference and print a table row.
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        which: Bench,
        /// Images per step.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Timed steps per run.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Runs of each side, alternating; the median run is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Python with the reference installed (PyTorch for train-step, faiss-cpu for knn).
        #[arg(long, default_value = "python3")]
        python: String,
        /// knn, kmeans: embedding dimension.
        #[arg(long, default_value_t = 64)]
        dim: usize,
        /// kmeans: restarts (best inertia wins).
        #[arg(long, default_value_t = 1)]
        restarts: usize,
        /// kmeans: Lloyd iterations at most.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// losses: only this loss (proxy-nca, proxy-triplet, proxy-triplet-hard10;
        /// repeat for several; default all).
        #[arg(long)]
        loss: Vec<String>,
    },
    /// Download pretrained weights and verify them.
    FetchWeights {
        /// Which weights.
        #[arg(value_enum)]
        model: Model,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    Cub,
    Cars,
    Sop,
    All,
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// One training step of the default model (small CNN, Proxy-NCA, Adam) on the CPU.
    TrainStep,
    /// Exact kNN (K = 1,000) + Recall@K at SOP scale against faiss IndexFlatL2.
    Knn,
    /// Proxy-NCA and Proxy-Triplet (all and 10 hardest negatives) forward + backward
    /// against PyTorch, CPU.
    Losses,
    /// k-means (k = 11,316) + NMI at SOP scale against faiss and scikit-learn.
    Kmeans,
    /// Decode + RandomResizedCrop + flip + normalise against torchvision + PIL.
    Pipeline,
    /// Max and average pooling forward + backward (BN-Inception's and the small CNN's
    /// shapes) against PyTorch, CPU.
    Pool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Model {
    BnInception,
}

#[derive(Args)]
struct Common {
    /// Parent folder of the datasets.
    #[arg(long, default_value = "data")]
    dest: PathBuf,
    /// Base URL of a mirror serving the same files (checked against the official checksums).
    #[arg(long, value_name = "URL")]
    mirror: Option<String>,
    /// Use a local copy of a file instead of downloading it (repeat for several files).
    #[arg(long, value_name = "PATH")]
    from_archive: Vec<PathBuf>,
    /// Show sources, sizes and the target, then stop.
    #[arg(long)]
    dry_run: bool,
    /// Accept the dataset's terms without asking (needed when not on a terminal).
    #[arg(long)]
    accept_terms: bool,
    /// Retries after a failed transfer (each resumes where the last stopped).
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Connect/read timeout in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("cannot start {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs `cmd`, returns the last stdout line that parses as a JSON object.
fn json_line(cmd: &mut Command) -> Result<serde_json::Value> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .filter(|v| v.is_object())
        })
        .with_context(|| format!("{cmd:?} printed no JSON line"))
}

fn bench_train_step(batch: usize, steps: usize, repeats: usize, python: &str) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let (b, s) = (batch.to_string(), steps.to_string());
    let build = Command::new(&cargo)
        .args(["bench", "-p", "nofuss", "--bench", "train_step", "--no-run"])
        .status()?;
    if !build.success() {
        bail!("building the benchmark failed");
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for r in 0..repeats.max(1) {
        ours.push(json_line(Command::new(&cargo).args([
            "bench",
            "-q",
            "-p",
            "nofuss",
            "--bench",
            "train_step",
            "--",
            &b,
            &s,
        ]))?);
        theirs.push(json_line(Command::new(python).args([
            "crates/nofuss/benches/torch_train_step.py",
            &b,
            &s,
        ]))?);
        eprintln!("run {}: {} | {}", r + 1, ours[r], theirs[r]);
    }
    let median = |v: &mut Vec<serde_json::Value>| -> serde_json::Value {
        v.sort_by(|a, b| {
            a["images_per_sec"]
                .as_f64()
                .partial_cmp(&b["images_per_sec"].as_f64())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        v[v.len() / 2].clone()
    };
    let (o, t) = (median(&mut ours), median(&mut theirs));
    let (oi, ti) = (
        o["images_per_sec"].as_f64().unwrap_or(0.0),
        t["images_per_sec"].as_f64().unwrap_or(f64::NAN),
    );
    println!("| benchmark | batch | nofuss img/s | reference | reference img/s | ratio |");
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| train step, small CNN + Proxy-NCA + Adam, CPU | {batch} | {oi:.0} ({} ms) | {} ({} threads) | {ti:.0} ({} ms) | {:.2}x |",
        o["median_ms"], t["impl"].as_str().unwrap_or("?"), t["threads"], t["median_ms"], oi / ti
    );
    Ok(())
}

/// All JSON object lines a command prints.
fn json_lines(cmd: &mut Command) -> Result<Vec<serde_json::Value>> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.is_object())
        .collect())
}

fn bench_losses(repeats: usize, python: &str, losses: &[String]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let r = repeats.max(1).to_string();
    let ours = json_lines(
        Command::new(&cargo)
            .args([
                "bench",
                "-q",
                "-p",
                "nofuss-losses",
                "--bench",
                "losses",
                "--",
                &r,
            ])
            .args(losses),
    )?;
    let theirs = json_lines(
        Command::new(python)
            .args(["crates/nofuss-losses/benches/torch_losses.py", &r])
            .args(losses),
    )?;
    let key = |v: &serde_json::Value| format!("{} {} {} {}", v["loss"], v["n"], v["d"], v["p"]);
    println!(
        "| loss | N | D | P | nofuss ms | {} ms | ratio (PyTorch time / nofuss time) |",
        theirs
            .first()
            .and_then(|v| v["impl"].as_str())
            .unwrap_or("reference")
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for o in &ours {
        let Some(t) = theirs.iter().find(|t| key(t) == key(o)) else {
            continue;
        };
        let (a, b) = (
            o["median_ms"].as_f64().unwrap_or(f64::NAN),
            t["median_ms"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "| {} | {} | {} | {} | {a:.2} | {b:.2} | {:.2}x |",
            o["loss"].as_str().unwrap_or("?"),
            o["n"],
            o["d"],
            o["p"],
            b / a
        );
    }
    Ok(())
}

/// `benches/pool.rs` and `benches/torch_pool.py` in `repeats` alternating rounds of 15
/// calls per case each; per case and pass the median of the rounds' medians.
fn bench_pool(repeats: usize, python: &str) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // `cargo bench` of benches/pool.rs with `extra` arguments.
    let ours_cmd = |extra: &[&str]| {
        let mut c = Command::new(&cargo);
        c.args(["bench", "-q", "-p", "nofuss-tensor", "--bench", "pool"])
            .args(extra);
        c
    };
    if !ours_cmd(&["--no-run"]).status()?.success() {
        bail!("building the benchmark failed");
    }
    let key =
        |v: &serde_json::Value| format!("{} {} {} {}", v["op"], v["pass"], v["shape"], v["window"]);
    let mut ours: Vec<Vec<serde_json::Value>> = vec![];
    let mut theirs: Vec<Vec<serde_json::Value>> = vec![];
    for _ in 0..repeats.max(1) {
        ours.push(json_lines(&mut ours_cmd(&["--", "15"]))?);
        theirs.push(json_lines(
            Command::new(python).args(["crates/nofuss-tensor/benches/torch_pool.py", "15"]),
        )?);
    }
    // The median over the rounds of a case's milliseconds.
    let median_of = |runs: &[Vec<serde_json::Value>], k: &str| {
        let mut v: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.iter().filter(|x| key(x) == k))
            .filter_map(|x| x["median_ms"].as_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let reference = theirs
        .first()
        .and_then(|r| r.first())
        .and_then(|v| v["impl"].as_str())
        .unwrap_or("reference")
        .to_string();
    println!("| op | pass | shape | window (k, s, p) | nofuss ms | {reference} ms | ratio (PyTorch time / nofuss time) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for o in ours.first().into_iter().flatten() {
        let k = key(o);
        let (Some(a), Some(b)) = (median_of(&ours, &k), median_of(&theirs, &k)) else {
            continue;
        };
        println!(
            "| {} | {} | {} | {} | {a:.2} | {b:.2} | {:.2}x |",
            o["op"].as_str().unwrap_or("?"),
            o["pass"].as_str().unwrap_or("?"),
            o["shape"],
            o["window"],
            b / a
        );
    }
    Ok(())
}

/// SOP-shaped embeddings (60,502 x `dim`, 11,316 classes) written by
/// `benches/faiss_knn.py`; with `repeats > 0` it also times faiss on them.
fn sop_shaped(
    dim: usize,
    repeats: usize,
    python: &str,
) -> Result<(PathBuf, PathBuf, serde_json::Value)> {
    let dir = std::env::current_dir()?.join(format!("target/bench-knn/d{dim}"));
    let theirs = json_line(Command::new(python).args([
        "crates/nofuss-eval/benches/faiss_knn.py",
        dir.to_str().unwrap_or("."),
        "60502",
        &dim.to_string(),
        "11316",
        &repeats.to_string(),
    ]))?;
    Ok((dir.join("emb.npy"), dir.join("labels.npy"), theirs))
}

/// The JSON line of `cargo bench -p nofuss-eval --bench knn -- ARGS`.
fn knn_bench(args: &[&str]) -> Result<serde_json::Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    json_line(
        Command::new(cargo)
            .args(["bench", "-q", "-p", "nofuss-eval", "--bench", "knn", "--"])
            .args(args),
    )
}

fn bench_knn(dim: usize, repeats: usize, python: &str) -> Result<()> {
    let r = repeats.max(1).to_string();
    let (emb, lab, theirs) = sop_shaped(dim, repeats.max(1), python)?;
    eprintln!("{theirs}");
    let ours = knn_bench(&[emb.to_str().unwrap_or(""), lab.to_str().unwrap_or(""), &r])?;
    eprintln!("{ours}");
    for k in [1, 10, 100, 1000] {
        let key = format!("recall@{k}");
        let (a, b) = (
            ours[&key].as_f64().unwrap_or(-1.0),
            theirs[&key].as_f64().unwrap_or(-2.0),
        );
        if (a - b).abs() > 1e-4 {
            bail!("{key} differs: nofuss {a}, faiss {b}");
        }
    }
    let (os, ts) = (
        ours["seconds"].as_f64().unwrap_or(f64::NAN),
        theirs["seconds"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "| benchmark | N x D | nofuss s | reference | reference s | speed ratio | recalls equal | peak MiB nofuss / reference |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| exact kNN K=1000 + Recall@{{1,10,100,1000}}, CPU | 60502 x {dim} | {os:.2} | {} ({} threads) | {ts:.2} | {:.2}x | yes | {} / {} |",
        theirs["impl"].as_str().unwrap_or("?"),
        theirs["threads"],
        ts / os,
        ours["peak_rss_mib"],
        theirs["peak_rss_mib"],
    );
    Ok(())
}

fn bench_kmeans(
    dim: usize,
    repeats: usize,
    restarts: usize,
    iters: usize,
    python: &str,
) -> Result<()> {
    let (emb, lab, _) = sop_shaped(dim, 0, python)?;
    let (e, l) = (emb.to_str().unwrap_or(""), lab.to_str().unwrap_or(""));
    let (r, it) = (restarts.max(1).to_string(), iters.to_string());
    let ours = knn_bench(&[e, l, &repeats.max(1).to_string(), "kmeans", &r, &it])?;
    eprintln!("{ours}");
    let theirs = json_lines(Command::new(python).args([
        "crates/nofuss-eval/benches/kmeans_ref.py",
        e,
        l,
        &r,
        &it,
        "both",
    ]))?;
    let os = ours["seconds"].as_f64().unwrap_or(f64::NAN);
    println!("| benchmark | N x D, k | nofuss s (NMI) | reference | reference s (NMI) | speed ratio | peak MiB nofuss / reference |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for t in &theirs {
        eprintln!("{t}");
        let ts = t["seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| k-means++ + Lloyd ({restarts} restart(s), <= {iters} iterations) + NMI, CPU | 60502 x {dim}, {} | {os:.2} ({:.4}) | {} ({} threads) | {ts:.2} ({:.4}) | {:.2}x | {} / {} |",
            ours["k"],
            ours["nmi"].as_f64().unwrap_or(f64::NAN),
            t["impl"].as_str().unwrap_or("?"),
            t["threads"],
            t["nmi"].as_f64().unwrap_or(f64::NAN),
            ts / os,
            ours["peak_rss_mib"],
            t["peak_rss_mib"],
        );
    }
    Ok(())
}

fn bench_pipeline(repeats: usize, python: &str) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let dir = std::env::current_dir()?.join("target/bench-pipeline");
    let d = dir.to_str().unwrap_or(".");
    let r = repeats.max(1).to_string();
    // The reference writes the JPEGs first; both sides then read the same files.
    let theirs = json_line(Command::new(python).args([
        "crates/nofuss-data/benches/torchvision_pipeline.py",
        d,
        "64",
        &r,
    ]))?;
    eprintln!("{theirs}");
    let ours = json_line(Command::new(&cargo).args([
        "bench",
        "-q",
        "-p",
        "nofuss-data",
        "--bench",
        "pipeline",
        "--",
        d,
        &r,
    ]))?;
    eprintln!("{ours}");
    let (o, t) = (
        ours["images_per_s"].as_f64().unwrap_or(f64::NAN),
        theirs["images_per_s"].as_f64().unwrap_or(f64::NAN),
    );
    println!("| benchmark | nofuss img/s (1 thread) | reference | reference img/s (1 thread) | ratio per core | nofuss loader img/s (all cores) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| decode 500x375 JPEG + RandomResizedCrop(224) + flip + normalise, CPU | {o:.1} | {} | {t:.1} | {:.2}x | {} ({} threads) |",
        theirs["impl"].as_str().unwrap_or("?"),
        o / t,
        ours["loader_images_per_s"],
        ours["loader_threads"],
    );
    // Where a single thread's time per image goes, on both sides.
    println!();
    println!("| ms per image (1 thread) | nofuss | reference | ratio |");
    println!("| --- | --- | --- | --- |");
    for (what, key) in [
        ("decode the whole image to RGB", "decode_ms"),
        (
            "transform (crop, resample, flip, normalise)",
            "transform_ms",
        ),
    ] {
        let (o, t) = (
            ours[key].as_f64().unwrap_or(f64::NAN),
            theirs[key].as_f64().unwrap_or(f64::NAN),
        );
        println!("| {what} | {o:.3} | {t:.3} | {:.2}x |", t / o);
    }
    Ok(())
}

fn run_fetch(keys: &[&str], c: &Common) -> Result<()> {
    let opts = FetchOptions {
        dest: c.dest.clone(),
        mirror: c.mirror.clone(),
        from_archive: c.from_archive.clone(),
        dry_run: c.dry_run,
        accept_terms: c.accept_terms,
        interactive: std::io::stdin().is_terminal(),
        download: DownloadOptions {
            retries: c.retries,
            timeout: Duration::from_secs(c.timeout),
            progress: std::io::stderr().is_terminal(),
            ..Default::default()
        },
    };
    let table = catalog();
    let mut failed = Vec::new();
    for key in keys {
        let ds = find(&table, key).with_context(|| format!("unknown dataset {key}"))?;
        if let Err(e) = fetch(&ds, &opts, &mut std::io::stdout()) {
            eprintln!("error: {}: {e}", ds.key);
            failed.push(ds.key);
        }
    }
    if !failed.is_empty() {
        bail!("could not fetch: {}", failed.join(", "));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The workspace root (the benchmarks' scripts and outputs are paths inside it).
fn workspace_root() -> PathBuf {
    let xtask = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

fn run(mut cli: Cli) -> Result<()> {
    // The benchmarks run from the workspace root wherever they are started; a --python
    // given as a relative path stays the one meant.
    if let Task::Bench { python, .. } = &mut cli.task {
        if python.contains('/') && std::path::Path::new(python.as_str()).is_relative() {
            let abs = std::env::current_dir()?.join(python.as_str());
            *python = abs.to_string_lossy().into_owned();
        }
        let root = workspace_root();
        std::env::set_current_dir(&root)
            .with_context(|| format!("cannot enter the workspace root {}", root.display()))?;
    }
    match cli.task {
        Task::Ci => {
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            cargo(&["test", "--workspace"])?;
        }
        Task::Glyphs { dir } => {
            let p = nofuss_data::glyphs::prepare(&dir, &Default::default())?;
            println!(
                "{}: {} classes, {} images ({})",
                p.root.display(),
                p.num_classes,
                p.num_images,
                if p.generated {
                    "generated"
                } else {
                    "already up to date"
                }
            );
        }
        Task::FetchData { dataset, common } => {
            let keys: &[&str] = match dataset {
                Which::Cub => &["cub"],
                Which::Cars => &["cars"],
                Which::Sop => &["sop"],
                Which::All => &["cub", "cars", "sop"],
            };
            run_fetch(keys, &common)?;
        }
        Task::FetchWeights {
            model: Model::BnInception,
            common,
        } => run_fetch(&["bn-inception"], &common)?,
        Task::Bench {
            which: Bench::TrainStep,
            batch,
            steps,
            repeats,
            python,
            ..
        } => bench_train_step(batch, steps, repeats, &python)?,
        Task::Bench {
            which: Bench::Knn,
            repeats,
            python,
            dim,
            ..
        } => bench_knn(dim, repeats, &python)?,
        Task::Bench {
            which: Bench::Losses,
            repeats,
            python,
            loss,
            ..
        } => bench_losses(repeats, &python, &loss)?,
        Task::Bench {
            which: Bench::Kmeans,
            repeats,
            python,
            dim,
            restarts,
            iters,
            ..
        } => bench_kmeans(dim, repeats, restarts, iters, &python)?,
        Task::Bench {
            which: Bench::Pipeline,
            repeats,
            python,
            ..
        } => bench_pipeline(repeats, &python)?,
        Task::Bench {
            which: Bench::Pool,
            repeats,
            python,
            ..
        } => bench_pool(repeats, &python)?,
    }
    Ok(())
}
