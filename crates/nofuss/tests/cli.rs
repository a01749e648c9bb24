//! End-to-end tests of the `nofuss` binary on tiny generated datasets.

use std::path::Path;
use std::process::{Command, Output};

fn nofuss(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nofuss"))
        .args(args)
        .output()
        .expect("run nofuss")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs nofuss, which must succeed, and parses its standard output as one JSON value.
fn json_of(args: &[&str]) -> serde_json::Value {
    let out = nofuss(args);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    serde_json::from_str(text(&out.stdout).trim()).unwrap()
}

/// The stderr of a run that failed with exit code 1, after checking that its error line
/// says each part once (a cause printed both inside its error's message and again as
/// the next link of the chain reads "f: No such file: No such file").
fn said_once(out: &Output) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    let parts: Vec<&str> = line.split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "'{p}' twice in {line}");
    }
    err
}

/// The arguments of a quick run on 8 glyph classes (4 train, 4 unseen), 2 renders per
/// font, into `tmp/runs/<name>`.
fn tiny_args(tmp: &Path, name: &str, seed: &str) -> Vec<String> {
    let data = tmp.join("glyphs");
    let runs = tmp.join("runs");
    [
        "train",
        "--data-dir",
        data.to_str().unwrap(),
        "--max-classes",
        "8",
        "--renders-per-font",
        "2",
        "--widths",
        "8,16",
        "--batch-size",
        "16",
        "--eval-k",
        "1,2",
        "--out-dir",
        runs.to_str().unwrap(),
        "--name",
        name,
        "--seed",
        seed,
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A quick run (see [`tiny_args`]), 2 epochs unless `extra` says otherwise.
fn tiny_run(tmp: &Path, name: &str, seed: &str, extra: &[&str]) -> Output {
    let mut args = tiny_args(tmp, name, seed);
    if !extra.contains(&"--epochs") {
        args.extend(["--epochs".to_string(), "2".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    nofuss(&args)
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Metrics without wall-clock fields.
fn scores(dir: &Path) -> Vec<serde_json::Value> {
    metrics(dir)
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("images_per_sec");
            o.remove("epoch_seconds");
            o.remove("train_seconds");
            v
        })
        .collect()
}

#[test]
fn a_run_writes_config_metrics_checkpoint_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(tmp.path(), "t", "1", &["--map-at-r"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Recall@1 on 4 unseen classes"), "{stdout}");
    let dir = tmp.path().join("runs/t");

    let cfg: nofuss::config::TrainConfig =
        toml::from_str(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
    assert_eq!(
        (cfg.optim.epochs, cfg.optim.batch_size, cfg.seed),
        (2, 16, 1)
    );
    assert_eq!(cfg.model.small_cnn.widths, vec![8, 16]);

    let m = metrics(&dir);
    assert_eq!(m.len(), 3);
    for (i, line) in m.iter().enumerate() {
        assert_eq!(line["epoch"], i);
        for key in ["recall@1", "recall@2", "nmi", "map@r", "r_precision"] {
            let v = line[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
    }
    assert!(m[0]["train_loss"].is_null());
    assert!(m[2]["train_loss"].as_f64().unwrap().is_finite());

    let ckpt =
        candle_core::safetensors::load(dir.join("final.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(ckpt["proxies"].dims(), &[4, 64]);
    assert_eq!(ckpt["backbone.blocks.1.conv.weight"].dims(), &[16, 8, 3, 3]);
    assert_eq!(ckpt["head.embedding.weight"].dims(), &[64, 16]);
    assert!(ckpt.contains_key("backbone.blocks.0.bn.running_mean"));
    assert!(dir.join("last.safetensors").exists());
    let plot = image::open(dir.join("plot.png")).unwrap();
    assert!(plot.width() > 100);
}

#[test]
fn finished_runs_are_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(tiny_run(tmp.path(), "keep", "1", &[]).status.success());
    let dir = tmp.path().join("runs/keep");
    let before = std::fs::read(dir.join("metrics.jsonl")).unwrap();
    let again = tiny_run(tmp.path(), "keep", "2", &[]);
    assert!(!again.status.success());
    let err = text(&again.stderr);
    assert!(
        err.contains("already holds 2 finished epoch(s)") && err.contains("keep"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), before);
}

#[test]
fn the_same_seed_gives_the_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, seed) in [("a", "7"), ("b", "7"), ("c", "8")] {
        let out = tiny_run(tmp.path(), name, seed, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let runs = tmp.path().join("runs");
    assert_eq!(scores(&runs.join("a")), scores(&runs.join("b")));
    assert_ne!(scores(&runs.join("a")), scores(&runs.join("c")));
}

#[test]
fn training_improves_unseen_class_retrieval() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("glyphs");
    let runs = tmp.path().join("runs");
    let out = nofuss(&[
        "train",
        "--data-dir",
        data.to_str().unwrap(),
        "--max-classes",
        "24",
        "--renders-per-font",
        "3",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--out-dir",
        runs.to_str().unwrap(),
        "--name",
        "learn",
        "--quiet",
        "--no-nmi",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m = metrics(&runs.join("learn"));
    let r1 = |i: usize| m[i]["recall@1"].as_f64().unwrap();
    let loss = |i: usize| m[i]["train_loss"].as_f64().unwrap();
    assert!(loss(4) < loss(1), "loss {} -> {}", loss(1), loss(4));
    assert!(r1(4) > r1(0) + 0.15, "Recall@1 {} -> {}", r1(0), r1(4));
}

fn write_cub(root: &Path, images: &str) {
    std::fs::create_dir_all(root.join("images/a")).unwrap();
    std::fs::create_dir_all(root.join("images/b")).unwrap();
    std::fs::write(root.join("classes.txt"), "1 a\n2 b\n").unwrap();
    std::fs::write(root.join("images.txt"), images).unwrap();
    std::fs::write(root.join("image_class_labels.txt"), "1 1\n2 2\n").unwrap();
    for p in ["a/1.png", "b/2.png"] {
        image::GrayImage::from_pixel(8, 8, image::Luma([9]))
            .save(root.join("images").join(p))
            .unwrap();
    }
}

/// `nofuss train` on the CUB-layout dataset at `root`, runs under `tmp`.
fn train_cub(root: &Path, tmp: &Path) -> Output {
    let runs = tmp.join("runs");
    nofuss(&[
        "train",
        "--dataset",
        "cub",
        "--data-dir",
        root.to_str().unwrap(),
        "--out-dir",
        runs.to_str().unwrap(),
        "--quiet",
    ])
}

#[test]
fn malformed_annotations_are_reported_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cub");
    write_cub(&root, "1 a/1.png\ntwo b/2.png\n");
    let out = train_cub(&root, tmp.path());
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("images.txt:2") && err.contains("'two'"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unreadable_images_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cub");
    write_cub(&root, "1 a/1.png\n2 b/2.png\n");
    std::fs::write(root.join("images/b/2.png"), b"\x89PNG garbage").unwrap();
    let out = train_cub(&root, tmp.path());
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("b/2.png"), "{err}");
    let missing = train_cub(&tmp.path().join("nowhere"), tmp.path());
    assert!(said_once(&missing).contains("nowhere"));
    std::fs::remove_file(root.join("classes.txt")).unwrap();
    let err = said_once(&train_cub(&root, tmp.path()));
    assert!(err.contains("classes.txt: "), "{err}");
}

#[test]
fn unknown_options_and_bad_values_fail_cleanly() {
    let out = nofuss(&["train", "--epoch", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--epoch"));
    let out = nofuss(&["train", "--batch-size", "1", "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("batch_size"));
    // CUDA graphs need a CUDA device: refused before any data or run directory is made.
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(
        tmp.path(),
        "graph",
        "0",
        &["--cuda-graph", "--device", "cpu"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cuda_graph replays"),
        "{}",
        text(&out.stderr)
    );
    assert!(!tmp.path().join("runs").exists() && !tmp.path().join("glyphs").exists());
    let out = nofuss(&["train", "--help"]);
    assert!(out.status.success());
    for flag in [
        "--config",
        "--data-dir",
        "--epochs",
        "--proxy-lr",
        "--seed",
        "--device",
        "--name",
    ] {
        assert!(text(&out.stdout).contains(flag), "{flag} not in --help");
    }
}

#[test]
fn default_config_is_a_valid_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = nofuss(&["default-config"]);
    assert!(out.status.success());
    let path = tmp.path().join("c.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let cfg = nofuss::config::TrainConfig::from_file(&path).unwrap();
    assert_eq!(cfg, nofuss::config::TrainConfig::default());
}

#[test]
fn a_diverging_run_stops_with_the_step_and_keeps_its_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(
        tmp.path(),
        "nan",
        "1",
        &["--lr", "1e30", "--proxy-lr", "1e30"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("non-finite loss") && err.contains("epoch 1, step"),
        "{err}"
    );
    assert!(
        err.contains("0 finished epoch(s)") && err.contains("--lr"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    // The untrained evaluation is kept; no epoch is claimed as finished.
    let m = metrics(&tmp.path().join("runs/nan"));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["epoch"], 0);
}

#[test]
fn eval_scores_embeddings_from_safetensors_and_npy() {
    use candle_core::{Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    // Two tight clusters and a stray point of class 0 near class 1.
    let emb: Vec<f32> = vec![0.0, 0.0, 0.1, 0.0, 0.0, 0.1, 5.0, 5.0, 5.1, 5.0, 4.9, 5.0];
    let labels: Vec<u32> = vec![0, 0, 0, 1, 1, 0];
    let e = Tensor::from_vec(emb.clone(), (6, 2), &Device::Cpu).unwrap();
    let l = Tensor::from_vec(labels.clone(), 6, &Device::Cpu).unwrap();
    let st = tmp.path().join("emb.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings", e.clone()), ("labels", l.clone())]),
        &st,
    )
    .unwrap();
    let got = json_of(&[
        "eval",
        "--embeddings",
        st.to_str().unwrap(),
        "--k",
        "1,2",
        "--nmi",
        "--map-at-r",
        "--json",
    ]);
    let cfg = nofuss_eval::EvalConfig {
        ks: vec![1, 2],
        nmi: true,
        map_at_r: true,
        ..Default::default()
    };
    let want = nofuss_eval::evaluate(&emb, 2, &labels, &cfg).unwrap();
    assert_eq!(got, nofuss::eval_cmd::report_json(&want));
    assert!(
        (got["recall@1"].as_f64().unwrap() - 5.0 / 6.0).abs() < 1e-12,
        "{got}"
    );
    // The same data as a pair of .npy files, printed as a table.
    let (en, ln) = (tmp.path().join("e.npy"), tmp.path().join("l.npy"));
    e.write_npy(&en).unwrap();
    l.to_dtype(candle_core::DType::I64)
        .unwrap()
        .write_npy(&ln)
        .unwrap();
    let out = nofuss(&[
        "eval",
        "--embeddings",
        en.to_str().unwrap(),
        "--labels",
        ln.to_str().unwrap(),
        "--k",
        "1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Recall@1     0.8333"),
        "{}",
        text(&out.stdout)
    );
}

/// Writes `embeddings` (`[rows, dim]`) and `labels` to a safetensors file.
fn save_embeddings(path: &Path, emb: &[f32], dim: usize, labels: &[u32]) {
    use candle_core::{Device, Tensor};
    let e = Tensor::from_slice(emb, (emb.len() / dim, dim), &Device::Cpu).unwrap();
    let l = Tensor::from_slice(labels, labels.len(), &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings", e), ("labels", l)]),
        path,
    )
    .unwrap();
}

#[test]
fn eval_searches_queries_among_a_gallery() {
    let tmp = tempfile::tempdir().unwrap();
    // Gallery: two classes and one no query has; queries of the first two.
    let gallery = [0.0f32, 0.0, 0.2, 0.0, 5.0, 5.0, 5.2, 5.0, 8.0, 8.0];
    let g_labels = [0u32, 0, 1, 1, 2];
    let queries = [0.1f32, 0.1, 4.0, 4.5, 7.5, 7.5];
    let q_labels = [0u32, 1, 1];
    let (qp, gp) = (
        tmp.path().join("q.safetensors"),
        tmp.path().join("g.safetensors"),
    );
    save_embeddings(&qp, &queries, 2, &q_labels);
    save_embeddings(&gp, &gallery, 2, &g_labels);
    let (q, g) = (qp.to_str().unwrap(), gp.to_str().unwrap());
    let got = json_of(&[
        "eval",
        "--embeddings",
        q,
        "--gallery",
        g,
        "--k",
        "1,2",
        "--map-at-r",
        "--json",
    ]);
    let cfg = nofuss_eval::EvalConfig {
        ks: vec![1, 2],
        nmi: false,
        map_at_r: true,
        ..Default::default()
    };
    let want =
        nofuss_eval::evaluate_between(&queries, &q_labels, &gallery, &g_labels, 2, &cfg).unwrap();
    assert_eq!(got, nofuss::eval_cmd::report_json(&want));
    // The third query's nearest is class 2's point, then class 1's: a hit at rank 2 only.
    assert_eq!(got["recall@1"].as_f64(), Some(2.0 / 3.0), "{got}");
    assert_eq!(got["recall@2"].as_f64(), Some(1.0), "{got}");
    let table = nofuss(&["eval", "--embeddings", q, "--gallery", g, "--k", "1"]);
    assert!(
        text(&table.stdout).contains("3 queries among 5 gallery embeddings of dimension 2"),
        "{}",
        text(&table.stdout)
    );
    // NMI is not defined for a query/gallery pair: refused before anything is read.
    let out = nofuss(&["eval", "--embeddings", q, "--gallery", g, "--nmi"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--nmi"), "{}", text(&out.stderr));
    // Another dimension names both files; a NaN says it is in the gallery.
    let wide = tmp.path().join("wide.safetensors");
    save_embeddings(&wide, &[0.0; 6], 3, &[0, 1]);
    let err = said_once(&nofuss(&[
        "eval",
        "--embeddings",
        q,
        "--gallery",
        wide.to_str().unwrap(),
        "--k",
        "1",
    ]));
    assert!(
        err.contains("wide.safetensors")
            && err.contains("q.safetensors")
            && err.contains("dimension 3"),
        "{err}"
    );
    // `search` refuses them the same way.
    let err = said_once(&nofuss(&[
        "search",
        "--gallery",
        wide.to_str().unwrap(),
        "--queries",
        q,
    ]));
    assert!(
        err.contains("wide.safetensors")
            && err.contains("q.safetensors")
            && err.contains("dimension 3"),
        "{err}"
    );
    let nan = tmp.path().join("nan.safetensors");
    save_embeddings(&nan, &[0.0, 0.0, f32::NAN, 1.0], 2, &[0, 1]);
    let err = said_once(&nofuss(&[
        "eval",
        "--embeddings",
        q,
        "--gallery",
        nan.to_str().unwrap(),
        "--k",
        "1",
    ]));
    assert!(err.contains("gallery embedding row 1"), "{err}");
    // More neighbours than the gallery holds.
    let err = said_once(&nofuss(&[
        "eval",
        "--embeddings",
        q,
        "--gallery",
        g,
        "--k",
        "6",
    ]));
    assert!(err.contains("K = 6") && err.contains("got 5"), "{err}");
}

#[test]
fn eval_rejects_bad_inputs_with_the_file_named() {
    use candle_core::{Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let e = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let only = tmp.path().join("only.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings", e.clone())]),
        &only,
    )
    .unwrap();
    let out = nofuss(&["eval", "--embeddings", only.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("only.safetensors") && text(&out.stderr).contains("`labels`"),
        "{}",
        text(&out.stderr)
    );
    let fl = tmp.path().join("float-labels.safetensors");
    let l = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings", e.clone()), ("labels", l)]),
        &fl,
    )
    .unwrap();
    let err = text(&nofuss(&["eval", "--embeddings", fl.to_str().unwrap()]).stderr);
    assert!(err.contains("labels must be integers"), "{err}");
    let nan = tmp.path().join("nan.safetensors");
    let bad = Tensor::new(&[[0f32, 1.0], [f32::NAN, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    let l = Tensor::new(&[0u32, 0, 1], &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings", bad), ("labels", l)]),
        &nan,
    )
    .unwrap();
    let err = text(&nofuss(&["eval", "--embeddings", nan.to_str().unwrap(), "--k", "1"]).stderr);
    assert!(err.contains("row 1") && err.contains("NaN"), "{err}");
    let missing = nofuss(&[
        "eval",
        "--embeddings",
        tmp.path().join("none.safetensors").to_str().unwrap(),
    ]);
    assert!(said_once(&missing).contains("none.safetensors"));
    // A file of another kind says what was expected.
    let other = tmp.path().join("notes.txt");
    std::fs::write(&other, "these are not embeddings").unwrap();
    let out = nofuss(&["eval", "--embeddings", other.to_str().unwrap()]);
    let err = said_once(&out);
    assert!(
        err.contains("notes.txt: not a readable safetensors file"),
        "{err}"
    );
}

fn stem_pth() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/reference/fixtures/bn_inception_stem.pth")
}

#[test]
fn bn_inception_trains_and_its_checkpoint_loads_as_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let bn = [
        "--backbone",
        "bn-inception",
        "--channels",
        "3",
        "--image-size",
        "32",
        "--bn",
        "frozen",
    ];
    let out = tiny_run(tmp.path(), "bn", "1", &bn);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let dir = tmp.path().join("runs/bn");
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(cfg.contains("backbone = \"bn-inception\""), "{cfg}");
    assert!(cfg.contains("batch_norm = \"frozen\""), "{cfg}");
    assert_eq!(metrics(&dir).len(), 3);
    // A whole nofuss checkpoint (names prefixed `backbone.`) is accepted as weights.
    let ckpt = tmp.path().join("weights.safetensors");
    std::fs::copy(dir.join("final.safetensors"), &ckpt).unwrap();
    let mut with_weights = bn.to_vec();
    with_weights.extend_from_slice(&["--weights", ckpt.to_str().unwrap()]);
    let out = tiny_run(tmp.path(), "bn2", "1", &with_weights);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    // Starting from trained weights changes the epoch-0 evaluation.
    let (a, b) = (scores(&dir), scores(&tmp.path().join("runs/bn2")));
    assert_ne!(a[0], b[0]);
    // The trained run's checkpoint holds every weight: embedding it needs no starting
    // weights (here gone, as on another machine).
    std::fs::remove_file(&ckpt).unwrap();
    let emb = tmp.path().join("emb.safetensors");
    let bn2 = tmp.path().join("runs/bn2");
    let out = nofuss(&[
        "embed",
        "--checkpoint",
        bn2.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    // Nor does training it further: its saved state holds them.
    let out = nofuss(&[
        "train",
        "--resume",
        bn2.to_str().unwrap(),
        "--epochs",
        "3",
        "--quiet",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(metrics(&bn2).len(), 4);
}

#[test]
fn weights_missing_tensors_and_bad_backbones_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let stem = stem_pth();
    let out = tiny_run(
        tmp.path(),
        "w",
        "1",
        &[
            "--backbone",
            "bn-inception",
            "--channels",
            "3",
            "--image-size",
            "32",
            "--weights",
            stem.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("bn_inception_stem.pth") && err.contains("missing 408 of 414"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let out = tiny_run(tmp.path(), "c", "1", &["--backbone", "bn-inception"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("3-channel"),
        "{}",
        text(&out.stderr)
    );
    let out = tiny_run(tmp.path(), "d", "1", &["--backbone", "resnet"]);
    assert!(
        text(&out.stderr).contains("small-cnn, bn-inception"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn convert_weights_writes_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("stem.safetensors");
    let out = nofuss(&[
        "convert-weights",
        stem_pth().to_str().unwrap(),
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("wrote 6 tensors"));
    let t = candle_core::safetensors::load(&out_path, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["conv1_7x7_s2.weight"].dims(), &[64, 3, 7, 7]);
    let bad = nofuss(&[
        "convert-weights",
        "/nonexistent.pth",
        out_path.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("/nonexistent.pth"));
}

#[test]
fn bench_train_step_prints_json() {
    let v = json_of(&[
        "bench",
        "train-step",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
    ]);
    assert!(v["images_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn every_loss_trains_and_bad_proxy_counts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, extra) in [
        vec!["--loss", "proxy-triplet", "--margin", "0.2"],
        vec!["--loss", "proxy-triplet", "--hardest-negatives", "3"],
        vec!["--loss", "triplet-semihard"],
        vec!["--loss", "triplet"],
        vec!["--loss", "nca"],
        vec![
            "--assignment",
            "dynamic",
            "--num-proxies",
            "8",
            "--proxy-init",
            "class-means",
            // Later epochs of this toy collapse onto one proxy (docs/ARCHITECTURE.md).
            "--epochs",
            "1",
        ],
        vec![
            "--loss",
            "proxy-triplet",
            "--assignment",
            "dynamic",
            "--num-proxies",
            "6",
            "--proxy-init",
            "class-means",
            "--epochs",
            "1",
        ],
    ]
    .iter()
    .enumerate()
    {
        let name = format!("l{i}");
        let out = tiny_run(tmp.path(), &name, "1", extra);
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
        let m = metrics(&tmp.path().join("runs").join(&name));
        let epochs = if extra.contains(&"--epochs") { 1 } else { 2 };
        assert_eq!(m.len(), epochs + 1, "{extra:?}");
        let cfg = std::fs::read_to_string(tmp.path().join("runs").join(&name).join("config.toml"))
            .unwrap();
        if let Some(pos) = extra.iter().position(|a| *a == "--loss") {
            assert!(
                cfg.contains(&format!("name = \"{}\"", extra[pos + 1])),
                "{cfg}"
            );
        }
        if let Some(pos) = extra.iter().position(|a| *a == "--hardest-negatives") {
            let want = format!("hardest_negatives = {}", extra[pos + 1]);
            assert!(cfg.contains(&want), "{cfg}");
        }
    }
    // Random proxies put every example of an untrained network on one proxy: a clear
    // stop, not a panic.
    let out = tiny_run(
        tmp.path(),
        "collapse",
        "1",
        &["--assignment", "dynamic", "--num-proxies", "2"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nothing to learn")
            || text(&out.stderr).contains("anything to learn")
    );
    let out = tiny_run(tmp.path(), "bad", "1", &["--num-proxies", "3"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("static assignment needs one proxy per class"));
    let out = tiny_run(tmp.path(), "bad3", "1", &["--hardest-negatives", "3"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("hardest_negatives applies to proxy-triplet"));
    let out = tiny_run(tmp.path(), "bad2", "1", &["--loss", "arcface"]);
    assert!(text(&out.stderr).contains("proxy-nca, proxy-triplet, triplet, triplet-semihard, nca"));
}

#[test]
fn compare_trains_each_loss_and_reports_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("glyphs");
    let runs = tmp.path().join("runs");
    let out = nofuss(&[
        "compare",
        "--losses",
        "proxy-nca,triplet-semihard",
        "--data-dir",
        data.to_str().unwrap(),
        "--max-classes",
        "8",
        "--renders-per-font",
        "2",
        "--widths",
        "8,16",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--eval-k",
        "1",
        "--no-nmi",
        "--out-dir",
        runs.to_str().unwrap(),
        "--name",
        "cmp",
        "--quiet",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let dir = runs.join("cmp");
    for loss in ["proxy-nca", "triplet-semihard"] {
        let m = metrics(&dir.join(loss));
        assert_eq!(m.len(), 3);
        // 4 classes x 16 images / batch 16 = 4 steps per epoch.
        assert_eq!(m[2]["steps"], 8, "{loss}");
        assert!(m[2]["train_seconds"].as_f64().unwrap() > 0.0);
    }
    let report = std::fs::read_to_string(dir.join("compare.md")).unwrap();
    assert!(report.contains("| proxy-nca |") && report.contains("| triplet-semihard |"));
    assert!(report.contains("Baseline: triplet-semihard"), "{report}");
    assert!(text(&out.stdout).contains("Baseline: triplet-semihard"));
    let png = image::open(dir.join("compare.png")).unwrap();
    assert!(png.width() > 0);
}

/// Writes `classes` x `per` small PNGs into `root/<class>/<i>.png`, each class with its
/// own shade pattern; returns the relative paths per class.
fn write_folder_dataset(root: &Path, classes: usize, per: usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for c in 0..classes {
        let name = format!("class_{c:02}");
        std::fs::create_dir_all(root.join(&name)).unwrap();
        let mut files = Vec::new();
        for i in 0..per {
            let img = image::GrayImage::from_fn(16, 16, |x, y| {
                let v = ((x as usize * (c + 1) + y as usize * (i + 2)) * 37 % 256) as u8;
                image::Luma([v])
            });
            let rel = format!("{name}/{i}.png");
            img.save(root.join(&rel)).unwrap();
            files.push(rel);
        }
        out.push(files);
    }
    out
}

/// The arguments of a one-epoch run on the photo dataset `data` into `tmp/runs/<name>`.
fn quick_args(tmp: &Path, data: &Path, dataset: &str, name: &str) -> Vec<String> {
    let runs = tmp.join("runs");
    [
        "train",
        "--dataset",
        dataset,
        "--data-dir",
        data.to_str().unwrap(),
        "--image-size",
        "16",
        "--widths",
        "4,8",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--eval-k",
        "1",
        "--no-nmi",
        "--out-dir",
        runs.to_str().unwrap(),
        "--name",
        name,
        "--quiet",
    ]
    .map(String::from)
    .to_vec()
}

fn quick_train(tmp: &Path, data: &Path, dataset: &str, name: &str) -> Output {
    let args = quick_args(tmp, data, dataset, name);
    nofuss(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn photo_training_finishes_on_a_one_thread_pool() {
    // Each training step runs on rayon's pool while the photo pipeline decodes the next
    // batch on the same pool: a step that waited for the pipeline would never finish
    // with one pool thread.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("folders");
    write_folder_dataset(&data, 6, 8);
    let mut child = Command::new(env!("CARGO_BIN_EXE_nofuss"))
        .env("RAYON_NUM_THREADS", "1")
        .args(quick_args(tmp.path(), &data, "folder", "one-thread"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run nofuss");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(300) {
            child.kill().unwrap();
            panic!("training on a one-thread pool did not finish in 5 minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success());
}

#[test]
fn folder_and_sop_layouts_train() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("folders");
    let files = write_folder_dataset(&data, 6, 8);
    let out = quick_train(tmp.path(), &data, "folder", "f");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("on 3 unseen classes"),
        "{}",
        text(&out.stdout)
    );

    // The same images as Stanford Online Products lists: classes 1-4 train, 5-6 test.
    let mut train = String::from("image_id class_id super_class_id path\n");
    let mut test = train.clone();
    let mut id = 1;
    for (c, fs) in files.iter().enumerate() {
        for f in fs {
            let line = format!("{id} {} 1 {f}\n", c + 1);
            if c < 4 {
                train.push_str(&line);
            } else {
                test.push_str(&line);
            }
            id += 1;
        }
    }
    std::fs::write(data.join("Ebay_train.txt"), train).unwrap();
    std::fs::write(data.join("Ebay_test.txt"), test).unwrap();
    let out = quick_train(tmp.path(), &data, "sop", "s");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("on 2 unseen classes"),
        "{}",
        text(&out.stdout)
    );
    // A partial SOP is named as such.
    assert!(text(&out.stderr).contains("warning: Stanford Online Products: 4 training classes"));
}

#[test]
fn an_unreadable_unseen_class_image_is_left_out_of_evaluation_and_embeddings() {
    // The photo pipeline drops an image it cannot decode from its batch; the labels
    // evaluated and written must drop the same one.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("folders");
    write_folder_dataset(&data, 6, 8);
    // Classes 3-5 are the unseen half: the first image of the last class.
    std::fs::write(data.join("class_05/0.png"), b"not a png").unwrap();
    let mut args = quick_args(tmp.path(), &data, "folder", "skip");
    args.retain(|a| a != "--quiet");
    args.extend(
        [
            "--pipeline",
            "photo",
            "--channels",
            "3",
            "--skip-bad-images",
        ]
        .map(String::from),
    );
    let out = nofuss(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("on 3 unseen classes (23 images)"),
        "{}",
        text(&out.stdout)
    );
    let err = text(&out.stderr);
    assert!(err.contains("skipped 1 unreadable image(s)"), "{err}");
    assert!(err.contains("class_05/0.png"), "{err}");
    let dir = tmp.path().join("runs/skip");
    let last = metrics(&dir).pop().unwrap();
    assert!(last["recall@1"].as_f64().is_some(), "{last}");

    let emb = tmp.path().join("emb.safetensors");
    let out = nofuss(&[
        "embed",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("23 embeddings written"));
    assert!(text(&out.stderr).contains("class_05/0.png"));
    let got = json_of(&[
        "eval",
        "--embeddings",
        emb.to_str().unwrap(),
        "--k",
        "1",
        "--json",
    ]);
    assert_eq!(got["recall@1"], last["recall@1"]);
}

#[test]
fn cars_layout_trains_from_its_mat_file() {
    // The scipy-written Cars196-style annotations (7 images, 6 classes) with tiny JPEGs.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cars");
    std::fs::create_dir_all(data.join("car_ims")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/reference/fixtures/mat/cars_annos_small.mat"),
        data.join("cars_annos.mat"),
    )
    .unwrap();
    for i in 0..7usize {
        let img = image::RgbImage::from_fn(20, 16, |x, y| {
            image::Rgb([(x * 12) as u8, (y * 15) as u8, (i * 40 % 256) as u8])
        });
        img.save(data.join(format!("car_ims/{:06}.jpg", i + 1)))
            .unwrap();
    }
    let runs = tmp.path().join("runs");
    // `nofuss train` on this data into `runs`, with `extra` options.
    let cars = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--dataset",
            "cars",
            "--data-dir",
            data.to_str().unwrap(),
            "--out-dir",
            runs.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        nofuss(&args)
    };
    // A quick model: 16-pixel images, a tiny CNN, Recall@1 only.
    let quick = [
        "--image-size",
        "16",
        "--widths",
        "4,8",
        "--eval-k",
        "1",
        "--no-nmi",
    ];
    let out = cars(&[&quick[..], &["--epochs", "1", "--batch-size", "4"]].concat());
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("on 3 unseen classes"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stderr).contains("warning: Cars196: 6 classes"));
    // The photo pipeline: RandomResizedCrop inside the boxes, class-balanced batches.
    let photo = [
        "--pipeline",
        "photo",
        "--channels",
        "3",
        "--m-per-class",
        "2",
        "--crop-to-boxes",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--name",
        "photo",
    ];
    let out = cars(&[&quick[..], &photo[..]].concat());
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let m = metrics(&runs.join("photo"));
    assert_eq!(m.len(), 3);
    assert!(m[2]["train_loss"].as_f64().unwrap().is_finite());
    // A missing image is named.
    std::fs::remove_file(data.join("car_ims/000002.jpg")).unwrap();
    let out = cars(&[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("000002.jpg"),
        "{}",
        text(&out.stderr)
    );
    // With --skip-bad-images it is left out, named, and training goes on: in memory...
    let skip_run = |pipeline: &str| {
        let skip = [
            "--pipeline",
            pipeline,
            "--channels",
            "3",
            "--epochs",
            "2",
            "--batch-size",
            "3",
            "--skip-bad-images",
        ];
        cars(&[&quick[..], &skip[..]].concat())
    };
    let out = skip_run("memory");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("skipped 1 unreadable image(s)") && err.contains("000002.jpg"),
        "{err}"
    );
    // ... and in the photo pipeline, reported once at the end.
    let out = skip_run("photo");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("the photo pipeline skipped 1 unreadable image(s)")
            && err.contains("000002.jpg"),
        "{err}"
    );
}

#[test]
fn optimiser_schedule_and_clipping_options_reach_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(
        tmp.path(),
        "rms",
        "2",
        &[
            "--optimizer",
            "rmsprop-tf",
            "--lr",
            "0.01",
            "--schedule",
            "exponential:0.94",
            "--warmup-steps",
            "3",
            "--clip-norm",
            "5",
            "--head-lr-scale",
            "2",
        ],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let dir = tmp.path().join("runs/rms");
    let cfg: nofuss::config::TrainConfig =
        toml::from_str(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
    assert_eq!(
        cfg.optim.optimizer,
        nofuss_tensor::optim::OptimizerKind::RmsProp {
            alpha: 0.9,
            eps: 1.0,
            momentum: 0.9,
            centered: false,
            tf_style: true
        }
    );
    assert_eq!(
        cfg.optim.schedule,
        nofuss_tensor::optim::Schedule::Exponential { gamma: 0.94 }
    );
    assert_eq!(
        (cfg.optim.warmup_steps, cfg.optim.clip_norm),
        (3, Some(5.0))
    );
    let m = metrics(&dir);
    assert!(m.last().unwrap()["train_loss"]
        .as_f64()
        .unwrap()
        .is_finite());

    for (flag, value, want) in [
        ("--schedule", "sometimes", "schedule 'sometimes'"),
        ("--optimizer", "lbfgs", "unknown optimiser 'lbfgs'"),
    ] {
        let out = tiny_run(tmp.path(), "bad", "2", &[flag, value]);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(want), "{}", text(&out.stderr));
    }
    let out = tiny_run(
        tmp.path(),
        "bad2",
        "2",
        &["--optimizer", "adam", "--momentum", "0.9"],
    );
    assert!(text(&out.stderr).contains("--momentum applies to sgd and rmsprop"));
}

/// Starts `nofuss train` as a child and kills it once `metrics.jsonl` has `lines`
/// lines (epoch 0 is the first), so the kill lands inside the next epoch.
fn train_and_kill(tmp: &Path, name: &str, lines: usize) {
    let mut args = tiny_args(tmp, name, "5");
    args.extend(
        [
            "--epochs",
            "4",
            "--optimizer",
            "sgd-nesterov",
            "--schedule",
            "exponential:0.9",
            "--warmup-steps",
            "5",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_nofuss"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let runs = tmp.join("runs");
    let metrics = runs.join(name).join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    loop {
        // Whole lines only: a line is finished once its newline is written.
        let n = std::fs::read_to_string(&metrics)
            .map(|t| t.matches('\n').count())
            .unwrap_or(0);
        if n >= lines || t0.elapsed().as_secs() > 300 {
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_killed_run_resumes_to_the_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    // Uninterrupted: kill only after the last line.
    train_and_kill(tmp.path(), "whole", 5);
    let whole = scores(&tmp.path().join("runs/whole"));
    assert_eq!(whole.len(), 5);
    for (name, lines) in [("after-two", 3), ("after-zero", 1)] {
        train_and_kill(tmp.path(), name, lines);
        let dir = tmp.path().join("runs").join(name);
        let out = nofuss(&["train", "--resume", dir.to_str().unwrap(), "--quiet"]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        assert_eq!(scores(&dir), whole, "{name}");
        // Only the last resumable state is kept.
        let states: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("resume-"))
            .collect();
        assert_eq!(states.len(), 1, "{name}");
    }
    // A finished run says so; --epochs trains it further.
    let dir = tmp.path().join("runs/whole");
    let out = nofuss(&["train", "--resume", dir.to_str().unwrap(), "--quiet"]);
    assert!(text(&out.stderr).contains("already finished its 4 epoch(s)"));
    let out = nofuss(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--epochs",
        "5",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(metrics(&dir).len(), 6);
}

#[test]
fn resuming_a_missing_run_or_a_cut_short_state_names_it_and_keeps_the_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("runs/nowhere");
    let out = nofuss(&["train", "--resume", nowhere.to_str().unwrap(), "--quiet"]);
    let err = said_once(&out);
    assert!(err.contains("nowhere: no such run directory"), "{err}");

    let out = tiny_run(tmp.path(), "cut", "0", &["--epochs", "1"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let dir = tmp.path().join("runs/cut");
    let before = std::fs::read(dir.join("metrics.jsonl")).unwrap();
    let state = dir.join("resume-1.safetensors");
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    let out = nofuss(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--epochs",
        "2",
        "--quiet",
    ]);
    let err = said_once(&out);
    assert!(
        err.contains("resume-1.safetensors: cannot resume from this checkpoint"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), before);
}

#[test]
fn embed_then_eval_reproduces_the_runs_recall() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(tmp.path(), "e", "4", &[]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let dir = tmp.path().join("runs/e");
    let emb = tmp.path().join("emb.safetensors");
    let out = nofuss(&[
        "embed",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--split",
        "test",
        "--out",
        emb.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let got = json_of(&[
        "eval",
        "--embeddings",
        emb.to_str().unwrap(),
        "--k",
        "1,2",
        "--json",
    ]);
    let last = metrics(&dir).pop().unwrap();
    assert_eq!(got["recall@1"], last["recall@1"]);
    assert_eq!(got["recall@2"], last["recall@2"]);
    // A directory without checkpoints is named.
    let out = nofuss(&[
        "embed",
        "--checkpoint",
        tmp.path().to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("holds no final.safetensors"));
    // A path that is not there is named as given, not as its parent's config.toml.
    let gone = tmp.path().join("runs/gone");
    let out = nofuss(&[
        "embed",
        "--checkpoint",
        gone.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]);
    let err = said_once(&out);
    assert!(
        err.contains(&format!("{}: no such run directory", gone.display())),
        "{err}"
    );
}

/// A safetensors file's header (JSON) and the bytes of its tensors.
fn read_safetensors(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// The bytes of tensor `name` of a safetensors file read by [`read_safetensors`].
fn tensor_bytes<'a>(file: &'a (serde_json::Value, Vec<u8>), name: &str) -> &'a [u8] {
    let offsets = &file.0[name]["data_offsets"];
    let (a, b) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
    &file.1[a as usize..b as usize]
}

#[test]
fn embed_images_gives_each_file_the_embedding_of_its_split() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(tmp.path(), "i", "2", &["--epochs", "1"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let dir = tmp.path().join("runs/i");
    let embed = |extra: &[&str], out: &Path| {
        let mut args = vec!["embed", "--checkpoint", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        nofuss(&args)
    };
    let split = tmp.path().join("split.safetensors");
    let out = embed(&[], &split);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    // Every image of the glyph dataset: its class folders, the unseen ones last.
    let images = tmp.path().join("glyphs/images");
    let all = tmp.path().join("all.safetensors");
    let out = embed(&["--images", images.to_str().unwrap()], &all);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let (split, all) = (read_safetensors(&split), read_safetensors(&all));
    let n_split = split.0["labels"]["shape"][0].as_u64().unwrap() as usize;
    let n_all = all.0["labels"]["shape"][0].as_u64().unwrap() as usize;
    assert_eq!(
        all.0["embeddings"]["shape"][1],
        split.0["embeddings"]["shape"][1]
    );
    assert!(n_all > n_split, "{n_all} {n_split}");
    // The unseen classes' rows are the split's, in the same order (to rounding: the
    // images sit at other rows of their batch).
    let floats = |b: &[u8]| -> Vec<f32> {
        b.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let e_split = floats(tensor_bytes(&split, "embeddings"));
    let e_all = floats(tensor_bytes(&all, "embeddings"));
    assert!(e_split.iter().any(|&v| v != 0.0));
    for (i, (a, b)) in e_all[e_all.len() - e_split.len()..]
        .iter()
        .zip(&e_split)
        .enumerate()
    {
        assert!((a - b).abs() < 1e-5, "value {i}: {a} against {b}");
    }
    let meta = &all.0["__metadata__"];
    let paths: Vec<&str> = meta["paths"].as_str().unwrap().lines().collect();
    let folders: Vec<&str> = meta["folders"].as_str().unwrap().lines().collect();
    assert_eq!(paths.len(), n_all);
    assert_eq!(folders.len(), 8);
    // Labels number the folders; each row's path lies in its label's folder.
    let labels: Vec<u32> = tensor_bytes(&all, "labels")
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (p, &l) in paths.iter().zip(&labels) {
        assert!(
            p.starts_with(&format!("{}/", folders[l as usize])),
            "{p} {l}"
        );
        assert!(images.join(p).is_file(), "{p}");
    }
    let split_labels: Vec<u32> = tensor_bytes(&split, "labels")
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) + 4)
        .collect();
    assert_eq!(&labels[n_all - n_split..], &split_labels[..]);
    // `nofuss search`: each image of the split finds itself in the whole collection,
    // named by its path; the collection alone leaves each image out of its own search.
    let (all_p, split_p) = (
        tmp.path().join("all.safetensors"),
        tmp.path().join("split.safetensors"),
    );
    let out = nofuss(&[
        "search",
        "--gallery",
        all_p.to_str().unwrap(),
        "--queries",
        split_p.to_str().unwrap(),
        "--k",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let results: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), n_split);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["query"], format!("row {i}"));
        let first = &r["neighbours"][0];
        assert_eq!(first["name"], paths[n_all - n_split + i], "{r}");
        assert!(first["distance"].as_f64().unwrap() < 1e-4, "{r}");
        assert_eq!(r["neighbours"][1]["rank"], 2);
    }
    let out = nofuss(&["search", "--gallery", all_p.to_str().unwrap(), "--k", "1"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let listing = text(&out.stdout);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 2 * n_all);
    assert_eq!(lines[0], paths[0]);
    assert!(!lines[1].ends_with(paths[0]), "{}", lines[1]);
    let err = said_once(&nofuss(&[
        "search",
        "--gallery",
        all_p.to_str().unwrap(),
        "--k",
        &n_all.to_string(),
    ]));
    assert!(err.contains(&format!("K = {n_all}")), "{err}");
    // `--images` and `--split` are either-or; a folder without images is named.
    let both = ["--images", images.to_str().unwrap(), "--split", "train"];
    let out = embed(&both, &tmp.path().join("x.st"));
    assert_eq!(out.status.code(), Some(2));
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = said_once(&embed(
        &["--images", empty.to_str().unwrap()],
        &tmp.path().join("e.st"),
    ));
    assert!(err.contains("empty: no .jpg/.jpeg/.png image"), "{err}");
}

#[test]
fn validation_classes_choose_the_reported_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(
        tmp.path(),
        "v",
        "3",
        &["--val-classes", "2", "--epochs", "3", "--no-nmi"],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let dir = tmp.path().join("runs/v");
    let m = metrics(&dir);
    assert_eq!(m.len(), 4);
    let val: Vec<f64> = m
        .iter()
        .map(|l| l["val_recall@1"].as_f64().unwrap())
        .collect();
    let mut best = 0;
    for (e, &v) in val.iter().enumerate() {
        if v > val[best] {
            best = e;
        }
    }
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("selected epoch {best} on 2 validation classes")),
        "{stdout}"
    );
    assert!(stdout.contains("test classes played no part in the choice"));
    // 4 training classes: 2 fit the model, 2 validate; the 4 test classes stay unseen.
    assert!(stdout.contains("trained on 2 classes"), "{stdout}");
    if best > 0 {
        assert!(dir.join("best.safetensors").exists());
    }
    let out = tiny_run(tmp.path(), "v2", "3", &["--val-classes", "4"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("validation split needs classes on both sides"));
}

#[test]
fn reseeding_applies_to_dynamic_assignment_only() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(
        tmp.path(),
        "rs",
        "6",
        &[
            "--assignment",
            "dynamic",
            "--num-proxies",
            "3",
            "--proxy-init",
            "class-means",
            "--reseed-unused",
            "2",
        ],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let cfg: nofuss::config::TrainConfig =
        toml::from_str(&std::fs::read_to_string(tmp.path().join("runs/rs/config.toml")).unwrap())
            .unwrap();
    assert_eq!(cfg.loss.reseed_unused_after, 2);
    let out = tiny_run(tmp.path(), "rs2", "6", &["--reseed-unused", "2"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("applies to dynamic assignment"));
}
