//! The training loop: Proxy-NCA on the training classes, Recall@K and NMI on the
//! unseen test classes before training and after every epoch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use nofuss_backbone::{Backbone, BnInception, Embedder, EmbeddingHead, SmallCnn, SmallCnnConfig};
use nofuss_data::{
    cars, cub, folder, glyphs, sop, Augment, ImageBank, ImageDataset, ImageSpec, ZeroShotSplit,
};
use nofuss_eval::{EvalConfig, EvalReport, KMeansConfig};
use nofuss_losses::{LossError, MetricLoss, ProxyInit, ProxyReseeder};
use nofuss_tensor::optim::{warmup_factor, Optimizer, ParamGroup};
use nofuss_tensor::{DeviceSpec, Precision, SeededVarMap};
use serde::Serialize;

use crate::config::{DatasetKind, OptimConfig, PipelineKind, TrainConfig};
use crate::images::{Images, PhotoSource};
use crate::{run_dir, Result, TrainError};

/// How much a run reports while it works.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrainOptions {
    /// Print a line per stage and per epoch to stdout.
    pub verbose: bool,
    /// Show progress bars (on a terminal only).
    pub progress: bool,
    /// Continue the run in this directory (its `config.toml` is `cfg`) after its last
    /// finished epoch.
    pub resume: Option<PathBuf>,
}

/// The metrics of one evaluation point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochMetrics {
    /// 0 is the untrained network.
    pub epoch: usize,
    /// Mean training loss of the epoch (none for epoch 0).
    pub train_loss: Option<f64>,
    /// Steps skipped because their batch had nothing to learn from (no positive pair,
    /// no negative proxy).
    pub skipped_steps: usize,
    /// Optimiser steps taken since the start of the run.
    pub steps: usize,
    /// Seconds spent in training steps since the start of the run (evaluation excluded).
    pub train_seconds: f64,
    /// Recall@K, and NMI and MAP@R when configured, on the unseen classes.
    pub eval: EvalReport,
    /// The same on the validation classes (held out of training), when configured.
    pub val: Option<EvalReport>,
    /// Training throughput of the epoch.
    pub images_per_sec: Option<f64>,
    /// Wall time of the epoch (training and evaluation).
    pub seconds: f64,
}

impl EpochMetrics {
    /// The `metrics.jsonl` line: `epoch`, `train_loss`, `skipped_steps`, `steps` and
    /// `train_seconds` (cumulative), the evaluation's keys (`recall@K`,
    /// `nmi`, `map@r`, `r_precision`; null when not computed, see
    /// [`crate::eval_cmd::report_json`]), `images_per_sec`, `epoch_seconds`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = crate::eval_cmd::report_json(&self.eval);
        v["epoch"] = self.epoch.into();
        v["train_loss"] = self.train_loss.into();
        v["skipped_steps"] = self.skipped_steps.into();
        v["steps"] = self.steps.into();
        v["train_seconds"] = self.train_seconds.into();
        v["images_per_sec"] = self.images_per_sec.into();
        v["epoch_seconds"] = self.seconds.into();
        if let Some(val) = &self.val {
            for (k, x) in crate::eval_cmd::report_json(val)
                .as_object()
                .into_iter()
                .flatten()
            {
                v[format!("val_{k}")] = x.clone();
            }
        }
        v
    }
}

impl EpochMetrics {
    /// Reads back a [`EpochMetrics::to_json`] line (`None` if it lacks `epoch`).
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
        let report = |prefix: &str| -> Option<EvalReport> {
            let mut recall: Vec<(usize, f64)> = v
                .as_object()?
                .iter()
                .filter_map(|(k, x)| {
                    let kk = k
                        .strip_prefix(prefix)?
                        .strip_prefix("recall@")?
                        .parse()
                        .ok()?;
                    Some((kk, x.as_f64()?))
                })
                .collect();
            if recall.is_empty() {
                return None;
            }
            recall.sort_by_key(|r| r.0);
            let g = |k: &str| f(&format!("{prefix}{k}"));
            Some(EvalReport {
                recall,
                nmi: g("nmi"),
                map_at_r: g("map@r").map(|m| nofuss_eval::MapAtR {
                    map_at_r: m,
                    r_precision: g("r_precision").unwrap_or(f64::NAN),
                    queries: 0,
                }),
            })
        };
        Some(Self {
            epoch: v.get("epoch")?.as_u64()? as usize,
            train_loss: f("train_loss"),
            skipped_steps: f("skipped_steps").unwrap_or(0.0) as usize,
            steps: f("steps").unwrap_or(0.0) as usize,
            train_seconds: f("train_seconds").unwrap_or(0.0),
            eval: report("")?,
            val: report("val_"),
            images_per_sec: f("images_per_sec"),
            seconds: f("epoch_seconds").unwrap_or(0.0),
        })
    }
}

/// The epoch with the best validation Recall@K (first K; the earliest on ties), or `None`
/// without validation metrics.
pub fn selected_epoch(history: &[EpochMetrics]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for m in history {
        let r = m.val.as_ref()?.recall.first()?.1;
        if best.is_none_or(|(_, b)| r > b) {
            best = Some((m.epoch, r));
        }
    }
    best.map(|(e, _)| e)
}

/// Prints the images left out under `--skip-bad-images` (the first 20; each reason
/// names its file).
fn report_skipped(what: &str, skipped: &[nofuss_data::Skipped]) {
    if skipped.is_empty() {
        return;
    }
    eprintln!(
        "warning: {what} {} unreadable image(s) (--skip-bad-images):",
        skipped.len()
    );
    for (_, why) in skipped.iter().take(20) {
        eprintln!("  {why}");
    }
    if skipped.len() > 20 {
        eprintln!("  ... and {} more", skipped.len() - 20);
    }
}

/// The run-wide index (from 1) of step `step` of epoch `epoch` with `per_epoch` batches.
fn global_step(epoch: usize, per_epoch: usize, step: usize) -> u64 {
    ((epoch - 1) * per_epoch + step) as u64
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The device used, as described by [`DeviceSpec::select`].
    pub device: String,
    /// Classes and images used for training.
    pub train_classes: usize,
    /// Training images.
    pub train_images: usize,
    /// Unseen test classes.
    pub test_classes: usize,
    /// Test images.
    pub test_images: usize,
    /// Metrics of epoch 0 (untrained) and every epoch.
    pub history: Vec<EpochMetrics>,
    /// Validation classes held out of training (0 when none).
    pub val_classes: usize,
    /// The epoch chosen on the validation classes (best validation Recall@K for the
    /// first K, the earliest on ties), when they were held out.
    pub selected_epoch: Option<usize>,
    /// Total wall time, data preparation included.
    pub seconds: f64,
}

/// A model with its parameters and proxies.
pub struct Model {
    /// The embedding network.
    pub embedder: Embedder,
    /// Backbone and head parameters.
    pub params: SeededVarMap,
    /// The loss, with its proxies for the proxy losses.
    pub loss: MetricLoss,
    /// The proxies' own parameter map.
    pub proxy_params: SeededVarMap,
}

impl Model {
    /// Builds the model of `cfg` for `num_classes` training classes on `device`.
    pub fn new(cfg: &TrainConfig, num_classes: usize, device: &Device) -> Result<Self> {
        if cfg.model.precision == Precision::Bf16 && device.is_cpu() {
            return Err(TrainError::Config(
                "--precision bf16 runs on CUDA only (candle's CPU matrix products have no \
                 bf16); use f32 on the CPU"
                    .into(),
            ));
        }
        nofuss_tensor::conv::set_algo_search(if cfg.cudnn_benchmark {
            nofuss_tensor::conv::AlgoSearch::Benchmark
        } else {
            nofuss_tensor::conv::AlgoSearch::Heuristic
        });
        let params = SeededVarMap::new(cfg.seed);
        let vb = params.var_builder(DType::F32, device);
        let backbone: Box<dyn Backbone> = match cfg.model.backbone.as_str() {
            "bn-inception" => Box::new(BnInception::new(
                vb.pp("backbone"),
                &cfg.model.bn_inception,
            )?),
            _ => {
                let cnn_cfg = SmallCnnConfig {
                    in_channels: cfg.data.channels,
                    input_size: cfg.data.image_size,
                    ..cfg.model.small_cnn.clone()
                };
                Box::new(SmallCnn::new(&cnn_cfg, vb.pp("backbone"))?)
            }
        };
        if let Some(path) = &cfg.model.weights {
            nofuss_backbone::weights::load_into(
                path,
                &params.named_vars(),
                "backbone.",
                &cfg.model.backbone,
            )?;
        }
        let head = EmbeddingHead::new(backbone.out_channels(), &cfg.model.head, vb.pp("head"))?;
        let proxy_params = SeededVarMap::new(cfg.seed ^ 0x0005_EED0_F9A0_C1E5);
        // On a GPU the loss's own input checks would each wait for the device; the
        // training loop reads every step's loss and stops on a non-finite one instead.
        let spec = cfg.loss.spec()?;
        let spec = if device.is_cpu() {
            spec
        } else {
            spec.with_check_finite(false)
        };
        let loss = MetricLoss::new(
            spec,
            cfg.loss.proxies_for(num_classes)?,
            cfg.model.head.dim,
            cfg.loss.proxy_init,
            proxy_params.var_builder(DType::F32, device),
        )?;
        Ok(Self {
            embedder: Embedder::new(backbone, head).with_precision(cfg.model.precision),
            params,
            loss,
            proxy_params,
        })
    }

    /// The optimiser of a run: `o.optimizer` over three parameter groups, the backbone
    /// (`lr`, `weight_decay`; batch-norm running statistics excluded), the embedding head
    /// (`lr * head_lr_scale`, `weight_decay`) and the proxies (`proxy_lr`, no decay), with
    /// gradient clipping when `clip_norm` is set.
    pub fn optimizer(&self, o: &OptimConfig) -> Result<Optimizer> {
        let (mut backbone, mut head) = (Vec::new(), Vec::new());
        let mut named = self.params.named_vars();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in named {
            if name.contains("running_") {
                continue;
            }
            if name.starts_with("head.") {
                head.push(var);
            } else {
                backbone.push(var);
            }
        }
        // Group learning rates are absolute; the optimiser's own rate is the schedule's
        // factor (1 until a schedule or warm-up changes it).
        let mut opt = Optimizer::new(
            o.optimizer,
            1.0,
            vec![
                ParamGroup::new("backbone", backbone)
                    .lr_scale(o.lr)
                    .weight_decay(o.weight_decay),
                ParamGroup::new("head", head)
                    .lr_scale(o.lr * o.head_lr_scale)
                    .weight_decay(o.weight_decay),
                ParamGroup::new("proxies", self.proxy_params.var_map().all_vars())
                    .lr_scale(o.proxy_lr),
            ],
        )?;
        if let Some(c) = o.clip_norm {
            opt = opt.with_clip_norm(c);
        }
        Ok(opt)
    }

    /// All tensors to checkpoint: model parameters and BN statistics by name, and
    /// `proxies`.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut m: HashMap<String, Tensor> = self
            .params
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        if let Some(p) = self.loss.proxies() {
            m.insert("proxies".into(), p.clone());
        }
        m
    }

    /// Sets the proxies to the class means of the embeddings of `images` (labels
    /// `labels`), see [`nofuss_losses::class_mean_proxies`]. No-op without proxies.
    pub fn proxies_at_class_means(
        &self,
        images: &Images,
        labels: &[u32],
        device: &Device,
    ) -> Result<()> {
        let Some(p) = self.loss.proxies() else {
            return Ok(());
        };
        let (num, dim) = p.dims2()?;
        // Training-mode batch normalisation: the first steps see batch statistics, and
        // eval-mode embeddings of an untrained network lie elsewhere. (This moves the
        // running statistics as a warm-up pass would.)
        let emb = self.embed_mode(images, device, true)?;
        let classes: Vec<i64> = emb.kept.iter().map(|&i| labels[i] as i64).collect();
        let emb = Tensor::from_vec(emb.values, (classes.len(), dim), device)?;
        let means = nofuss_losses::class_mean_proxies(&emb, &classes, num)?;
        for (name, var) in self.proxy_params.named_vars() {
            if name == "proxies" {
                var.set(&means.to_dtype(var.dtype())?)?;
            }
        }
        Ok(())
    }

    /// Restores the state saved after epoch `epoch` (see [`run_dir::resume_checkpoint`]):
    /// every parameter, BN statistic and proxy, and `opt`'s state. Returns the file's
    /// other tensors (the trainer's own state, e.g. `reseed.last_used`).
    pub fn load_resume(
        &self,
        path: &Path,
        opt: &mut Optimizer,
        epoch: usize,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let bad = |message: String| TrainError::Input {
            path: path.to_path_buf(),
            message: format!("cannot resume from this checkpoint: {message}"),
        };
        let mut tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| bad(format!("{e} (the run's last finished epoch is {epoch})")))?;
        let saved_epoch = tensors
            .remove("nofuss.epoch")
            .and_then(|t| t.to_vec1::<f64>().ok())
            .and_then(|v| v.first().copied());
        if saved_epoch != Some(epoch as f64) {
            return Err(bad(format!("it holds epoch {saved_epoch:?}, not {epoch}")));
        }
        self.set_vars(&mut tensors, path)?;
        let (optim, rest): (HashMap<String, Tensor>, HashMap<String, Tensor>) = tensors
            .into_iter()
            .partition(|(k, _)| k.starts_with("optim."));
        let optim: HashMap<String, Tensor> = optim
            .into_iter()
            .map(|(k, v)| (k["optim.".len()..].to_string(), v))
            .collect();
        opt.load_state(&optim)?;
        Ok(rest)
    }

    /// Loads a checkpoint of this model (`last.safetensors`, `final.safetensors`, or a
    /// resumable state): every parameter, BN statistic and proxy.
    pub fn load_checkpoint(&self, path: &Path, device: &Device) -> Result<()> {
        self.set_vars(&mut read_checkpoint(path, device)?, path)
    }

    /// Sets every variable from `tensors` (taking them out), by name and shape.
    fn set_vars(&self, tensors: &mut HashMap<String, Tensor>, path: &Path) -> Result<()> {
        let bad = |message: String| TrainError::Input {
            path: path.to_path_buf(),
            message: format!("checkpoint does not fit the run's model: {message}"),
        };
        let mut vars = self.params.named_vars();
        vars.extend(self.proxy_params.named_vars());
        for (name, var) in vars {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| bad(format!("no tensor {name}")))?;
            if t.dims() != var.dims() {
                return Err(bad(format!(
                    "{name} has shape {:?}, the model {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Embeddings of every image of `images`, in order (evaluation mode), with the
    /// positions of the images embedded: all of them, unless the photo pipeline skipped
    /// unreadable ones (`skip_bad_images`).
    pub fn embed(&self, images: &Images, device: &Device) -> Result<Embedded> {
        self.embed_mode(images, device, false)
    }

    fn embed_mode(&self, images: &Images, device: &Device, train: bool) -> Result<Embedded> {
        let norm = self.embedder.backbone().input().normalization;
        let mut values = Vec::with_capacity(images.len() * self.embedder.head().config().dim);
        let mut kept = Vec::with_capacity(images.len());
        for batch in images.eval_batches(&norm, device)? {
            let (x, positions) = batch?;
            let e = nofuss_tensor::on_pool(device, || {
                nofuss_tensor::with_cached_layouts(device, || self.embedder.forward(&x, train))
            })?;
            values.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            kept.extend(positions);
        }
        Ok(Embedded { values, kept })
    }
}

/// The trainer's replayed steps (`cuda_graph`). The run's first step (in this process)
/// runs eagerly, with the optimiser as usual; then the optimiser takes its per-step
/// scalars from the device, the first full batch is copied into buffers of its own and
/// its step captured into a CUDA graph, and every later full batch is copied into those
/// buffers and the graph replayed. A partial batch (the end of an epoch) runs eagerly.
struct Replay {
    /// The batch size of the captured step.
    batch: usize,
    captured: Option<Captured>,
}

/// A captured training step and the buffers it reads and writes.
struct Captured {
    graph: nofuss_tensor::graph::StepGraph,
    images: Tensor,
    labels: Tensor,
    loss: Tensor,
}

impl Replay {
    /// Whether the batch of `batch_len` images is replayed (or captured): a full batch,
    /// once the optimiser takes its scalars from the device.
    fn ready(&self, opt: &Optimizer, batch_len: usize) -> bool {
        opt.uses_device_scalars() && batch_len == self.batch
    }

    /// After an eager step: the first turns the optimiser's device scalars on.
    fn after_eager_step(&mut self, opt: &mut Optimizer) -> Result<()> {
        if !opt.uses_device_scalars() && opt.steps() > 0 {
            opt.use_device_scalars()?;
        }
        Ok(())
    }

    /// One full batch's step at learning rate `lr`: copied into the captured step's
    /// buffers and replayed (captured first, if not yet). Returns a copy of its
    /// [`step_report`], read later.
    fn step(
        &mut self,
        model: &Model,
        opt: &mut Optimizer,
        (images, labels): (&Tensor, &Tensor),
        lr: f64,
    ) -> Result<Tensor> {
        opt.set_lr(lr);
        if let Some(c) = &self.captured {
            c.images.slice_set(images, 0, 0)?;
            c.labels.slice_set(labels, 0, 0)?;
            opt.advance()?;
            c.graph.replay()?;
            return Ok(c.loss.copy()?);
        }
        let (images, labels) = (images.copy()?, labels.copy()?);
        let loss_out = Tensor::zeros(2, DType::F32, images.device())?;
        opt.advance()?;
        let graph = capture_step(model, opt, (&images, &labels), &loss_out)?;
        // The capture ran nothing: its first replay is this step.
        graph.replay()?;
        let loss = loss_out.copy()?;
        self.captured = Some(Captured {
            graph,
            images,
            labels,
            loss: loss_out,
        });
        Ok(loss)
    }
}

/// Captures a training step of `model` on `images` and `labels` into a CUDA graph:
/// forward on the tape, loss, backward, `opt`'s step (its device scalars on and
/// [`Optimizer::advance`] called), the step's [`step_report`] written into `loss_out`
/// (`[2]`, f32). The inputs and `loss_out` must outlive the graph; nothing runs until its
/// first replay.
pub(crate) fn capture_step(
    model: &Model,
    opt: &mut Optimizer,
    (images, labels): (&Tensor, &Tensor),
    loss_out: &Tensor,
) -> Result<nofuss_tensor::graph::StepGraph> {
    nofuss_tensor::graph::StepGraph::capture(images.device(), || -> Result<()> {
        let pass = model.embedder.forward_train(images)?;
        let (loss, anchors) = model.loss.loss_with_anchors(&pass.embeddings, labels)?;
        let grads = pass.backward(&loss)?;
        opt.step(&grads)?;
        loss_out.slice_set(&step_report(&loss, anchors.as_ref())?, 0, 0)?;
        Ok(())
    })
}

/// A step's loss and the number of anchors that took part, as one `[2]` f32 tensor on
/// the loss's device, read in one go by [`LossQueue`]: the count where the loss picked
/// its anchors on the device (`MetricLoss::loss_with_anchors`; 0: the batch had nothing
/// to learn from), else -1.
pub(crate) fn step_report(loss: &Tensor, anchors: Option<&Tensor>) -> Result<Tensor> {
    let loss = loss.detach().to_dtype(DType::F32)?.reshape(1)?;
    let count = match anchors {
        Some(a) => a.detach().to_dtype(DType::F32)?.reshape(1)?,
        None => Tensor::full(-1f32, 1, loss.device())?,
    };
    Ok(Tensor::cat(&[&loss, &count], 0)?)
}

/// What one training step did.
enum StepOutcome {
    /// Updated the model; the step's [`step_report`] (not yet read).
    Trained(Tensor),
    /// Skipped: the batch had nothing to learn from (why).
    Skipped(String),
    /// The loss's own input check found a non-finite value.
    NonFinite,
}

/// Saves `state` as safetensors atomically.
pub fn save_checkpoint(path: &Path, state: &HashMap<String, Tensor>) -> Result<()> {
    run_dir::write_atomic_with(path, |tmp| Ok(candle_core::safetensors::save(state, tmp)?))
}

fn say(opts: &TrainOptions, s: impl AsRef<str>) {
    if opts.verbose {
        println!("{}", s.as_ref());
    }
}

/// Embeddings `[N, D]` (row-major) of the images at `kept` of a subset, in that order.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// The embeddings, `kept.len() * D` values.
    pub values: Vec<f32>,
    /// Each row's position in the subset (ascending).
    pub kept: Vec<usize>,
}

impl Embedded {
    /// The labels of the embedded images, from the subset's `labels`.
    pub fn labels(&self, labels: &[u32]) -> Vec<u32> {
        self.kept.iter().map(|&i| labels[i]).collect()
    }
}

fn evaluate(
    model: &Model,
    bank: &Images,
    labels: &[u32],
    cfg: &TrainConfig,
    device: &Device,
) -> Result<EvalReport> {
    let emb = model.embed(bank, device)?;
    // Unreadable images the photo pipeline skipped have no embedding, and no label here.
    let labels = emb.labels(labels);
    let emb = emb.values;
    let eval_cfg = EvalConfig {
        kmeans: KMeansConfig {
            seed: cfg.seed,
            ..cfg.eval.kmeans.clone()
        },
        ..cfg.eval.clone()
    };
    // The neighbour search runs where the model does (CPU: the tiled rayon search).
    Ok(nofuss_eval::evaluate_on(
        device,
        &emb,
        cfg.model.head.dim,
        &labels,
        &eval_cfg,
    )?)
}

/// A run's data: the zero-shot split and the images of each side.
pub struct PreparedData {
    /// Training subset (labels `0..train classes`).
    pub train_set: nofuss_data::Subset,
    /// Test subset (unseen classes).
    pub test_set: nofuss_data::Subset,
    /// Training images.
    pub train_images: Images,
    /// Test images.
    pub test_images: Images,
    /// Validation classes held out of training, and their images, when configured.
    pub val: Option<(nofuss_data::Subset, Images)>,
}

/// A run's dataset and its zero-shot split, before any image is read.
pub struct SplitData {
    /// The dataset.
    pub dataset: ImageDataset,
    /// Bounding boxes of its records, where the run crops to them (`crop_to_boxes`).
    pub boxes: Option<Vec<nofuss_data::BBox>>,
    /// Training subset (labels `0..train classes`), validation classes held out.
    pub train_set: nofuss_data::Subset,
    /// Test subset (unseen classes).
    pub test_set: nofuss_data::Subset,
    /// Validation classes held out of training, when configured.
    pub val_set: Option<nofuss_data::Subset>,
}

/// Loads the dataset of `cfg` (generating the glyphs if needed) and splits it; reads
/// annotations only, no image.
pub fn load_split(cfg: &TrainConfig, opts: &TrainOptions) -> Result<SplitData> {
    if cfg.data.dataset == DatasetKind::Glyphs {
        let p = glyphs::prepare(&cfg.data.dir, &cfg.data.glyphs)?;
        say(
            opts,
            format!(
                "dataset: {} glyph classes, {} images in {} ({})",
                p.num_classes,
                p.num_images,
                p.root.display(),
                if p.generated {
                    "generated"
                } else {
                    "already there"
                }
            ),
        );
    }
    let mut boxes = None;
    let (ds, split, warnings) = match cfg.data.dataset {
        DatasetKind::Glyphs => (cub::load(&cfg.data.dir)?, ZeroShotSplit::Halves, vec![]),
        DatasetKind::Cub => {
            let ds = cub::load(&cfg.data.dir)?;
            if cfg.data.crop_to_boxes {
                boxes = Some(cub::load_boxes(&cfg.data.dir, &ds)?);
            }
            let w = cub::count_warnings(&ds);
            (ds, ZeroShotSplit::Halves, w)
        }
        DatasetKind::Cars => {
            let l = cars::load(&cfg.data.dir)?;
            let w = l.count_warnings();
            boxes = Some(l.boxes);
            (l.dataset, ZeroShotSplit::Halves, w)
        }
        DatasetKind::Sop => {
            let l = sop::load(&cfg.data.dir)?;
            let (split, w) = (l.split(), l.count_warnings());
            (l.dataset, split, w)
        }
        DatasetKind::Folder => (folder::load(&cfg.data.dir)?, ZeroShotSplit::Halves, vec![]),
    };
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let (train_set, test_set) = split.apply(&ds)?;
    let (train_set, val_set) = match cfg.data.val_classes {
        0 => (train_set, None),
        n => {
            let (fit, val) = train_set.hold_out_classes(n)?;
            (fit, Some(val))
        }
    };
    if cfg.data.pipeline == PipelineKind::Photo && cfg.data.crop_to_boxes && boxes.is_none() {
        return Err(TrainError::Config(
            "--crop-to-boxes needs a dataset with bounding boxes (cars)".into(),
        ));
    }
    Ok(SplitData {
        dataset: ds,
        boxes: if cfg.data.crop_to_boxes { boxes } else { None },
        train_set,
        test_set,
        val_set,
    })
}

/// The image source of `subset` of `ds` as `cfg` reads images (decoded into memory, or
/// the photo pipeline), and the subset itself: fewer images when the in-memory
/// pipeline left unreadable ones out (`skip_bad_images`; they are added to `skipped`).
pub fn images_of(
    cfg: &TrainConfig,
    ds: &ImageDataset,
    boxes: Option<&[nofuss_data::BBox]>,
    subset: nofuss_data::Subset,
    skipped: &mut Vec<nofuss_data::Skipped>,
) -> Result<(Images, nofuss_data::Subset)> {
    let spec = ImageSpec {
        channels: cfg.data.channels,
        height: cfg.data.image_size,
        width: cfg.data.image_size,
    };
    Ok(match cfg.data.pipeline {
        PipelineKind::Photo => (
            Images::Photos(Box::new(PhotoSource {
                dataset: ds.clone(),
                subset: subset.clone(),
                size: cfg.data.image_size,
                m_per_class: cfg.data.m_per_class,
                boxes: boxes.map(<[_]>::to_vec),
                skip_bad_images: cfg.data.skip_bad_images,
                skipped: Default::default(),
            })),
            subset,
        ),
        PipelineKind::Memory if cfg.data.skip_bad_images => {
            let (bank, kept, more) = ImageBank::load_skipping(ds, &subset, spec)?;
            skipped.extend(more);
            (Images::memory(bank), kept)
        }
        PipelineKind::Memory => (Images::memory(ImageBank::load(ds, &subset, spec)?), subset),
    })
}

/// Loads the dataset of `cfg` (generating the glyphs if needed), splits it, and sets up
/// the image sources of both sides (in memory or the photo pipeline).
pub fn prepare_data(cfg: &TrainConfig, opts: &TrainOptions) -> Result<PreparedData> {
    let s = load_split(cfg, opts)?;
    let (ds, boxes) = (&s.dataset, s.boxes.as_deref());
    let mut skipped = Vec::new();
    let (train_bank, train_set) = images_of(cfg, ds, boxes, s.train_set, &mut skipped)?;
    let (test_bank, test_set) = images_of(cfg, ds, boxes, s.test_set, &mut skipped)?;
    let val = match s.val_set {
        Some(v) => {
            let (images, subset) = images_of(cfg, ds, boxes, v, &mut skipped)?;
            Some((subset, images))
        }
        None => None,
    };
    report_skipped("skipped", &skipped);
    Ok(PreparedData {
        train_set,
        test_set,
        train_images: train_bank,
        test_images: test_bank,
        val,
    })
}

/// A trained run opened for embedding: its configuration and checkpoint file.
struct TrainedRun {
    cfg: TrainConfig,
    file: PathBuf,
}

impl TrainedRun {
    /// The run at `checkpoint` (its directory, or a checkpoint file in one).
    fn open(checkpoint: &Path, device: Option<&str>) -> Result<Self> {
        if !checkpoint.exists() {
            let missing = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such run directory or checkpoint file",
            );
            return Err(TrainError::io(checkpoint, missing));
        }
        let (dir, file) = if checkpoint.is_dir() {
            let f = [run_dir::FINAL_CHECKPOINT, run_dir::LAST_CHECKPOINT]
                .iter()
                .map(|n| checkpoint.join(n))
                .find(|p| p.exists())
                .ok_or_else(|| TrainError::Input {
                    path: checkpoint.to_path_buf(),
                    message: format!(
                        "holds no {} or {} (a run writes them when its first epoch ends)",
                        run_dir::FINAL_CHECKPOINT,
                        run_dir::LAST_CHECKPOINT
                    ),
                })?;
            (checkpoint.to_path_buf(), f)
        } else {
            let parent = checkpoint.parent().unwrap_or(Path::new("."));
            (parent.to_path_buf(), checkpoint.to_path_buf())
        };
        let mut cfg = TrainConfig::from_file(&dir.join(run_dir::CONFIG))?;
        // The checkpoint sets every weight: the run's starting weights are not read (they
        // may not be on this machine).
        cfg.model.weights = None;
        if let Some(d) = device {
            cfg.device = d.to_string();
        }
        Ok(Self { cfg, file })
    }

    /// The trained model on `device`. The number of proxies comes from the checkpoint,
    /// so the training classes need not be at hand.
    fn model(&self, device: &Device) -> Result<Model> {
        let mut tensors = read_checkpoint(&self.file, device)?;
        let proxies = match tensors.get("proxies") {
            Some(p) => p.dim(0)?,
            None => 1,
        };
        let model = Model::new(&self.cfg, proxies, device)?;
        model.set_vars(&mut tensors, &self.file)?;
        Ok(model)
    }

    /// Embeds `subset` of `ds` with the trained model, its images read as the run reads
    /// its evaluation images, and reports the unreadable ones left out (`skip_bad_images`).
    /// Returns the embeddings and the subset as read (its `kept` positions index it).
    fn embed_subset(
        &self,
        ds: &ImageDataset,
        boxes: Option<&[nofuss_data::BBox]>,
        subset: nofuss_data::Subset,
    ) -> Result<(Embedded, nofuss_data::Subset)> {
        let picked = self.cfg.device.parse::<DeviceSpec>()?.select()?;
        let mut skipped = Vec::new();
        let (images, subset) = images_of(&self.cfg, ds, boxes, subset, &mut skipped)?;
        let emb = self.model(&picked.device)?.embed(&images, &picked.device)?;
        skipped.extend(images.skipped());
        report_skipped("skipped", &skipped);
        Ok((emb, subset))
    }
}

/// The tensors of the checkpoint file `path`, on `device`.
fn read_checkpoint(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| TrainError::Input {
        path: path.to_path_buf(),
        message: format!("cannot read this checkpoint: {e}"),
    })
}

/// Writes embeddings `[N, D]` (f32), their labels `[N]` (u32) and string `metadata` to
/// the safetensors file `out`.
fn write_embeddings(
    out: &Path,
    emb: Vec<f32>,
    labels: Vec<u32>,
    dim: usize,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let n = labels.len();
    let emb = Tensor::from_vec(emb, (n, dim), &Device::Cpu)?;
    let labels = Tensor::from_vec(labels, n, &Device::Cpu)?;
    let tensors = [("embeddings", &emb), ("labels", &labels)];
    run_dir::write_atomic_with(out, |tmp| {
        safetensors::serialize_to_file(tensors, metadata, tmp).map_err(|e| TrainError::Input {
            path: out.to_path_buf(),
            message: format!("cannot write embeddings: {e}"),
        })
    })
}

/// `nofuss embed`: embeds one side (`test` or `train`) of the split of the run at
/// `checkpoint` (a run directory or a checkpoint file in one) with its trained model,
/// and writes `embeddings` (f32 `[N, D]`) and `labels` (u32 `[N]`) to `out`. Only that
/// side's images are read. Returns N.
pub fn embed_split(
    checkpoint: &Path,
    data_dir: Option<&Path>,
    split: &str,
    out: &Path,
    device: Option<&str>,
) -> Result<usize> {
    let mut run = TrainedRun::open(checkpoint, device)?;
    if let Some(d) = data_dir {
        run.cfg.data.dir = d.to_path_buf();
    }
    let data = load_split(&run.cfg, &TrainOptions::default())?;
    let subset = match split {
        "train" => data.train_set,
        _ => data.test_set,
    };
    let (emb, subset) = run.embed_subset(&data.dataset, data.boxes.as_deref(), subset)?;
    let labels = emb.labels(&subset.labels);
    let n = labels.len();
    write_embeddings(out, emb.values, labels, run.cfg.model.head.dim, None)?;
    Ok(n)
}

/// `nofuss embed --images`: embeds every image under `images_dir` (`.jpg`, `.jpeg`,
/// `.png`, in subfolders too, in path order) with the trained model of the run at
/// `checkpoint`, read as the run reads its evaluation images (no bounding boxes). Writes
/// `embeddings` (f32 `[N, D]`) and `labels` (u32 `[N]`: the index of each image's folder
/// among the folders, so `dir/<class>/<image>` gives class labels and a flat folder all
/// 0) to `out`, with the metadata `paths` (each row's path relative to `images_dir`, one
/// per line) and `folders` (the folder of each label, one per line, `.` for
/// `images_dir` itself). Returns N.
pub fn embed_images(
    checkpoint: &Path,
    images_dir: &Path,
    out: &Path,
    device: Option<&str>,
) -> Result<usize> {
    let mut run = TrainedRun::open(checkpoint, device)?;
    run.cfg.data.crop_to_boxes = false;
    let ds = folder::load_tree(images_dir)?;
    let (emb, subset) = run.embed_subset(&ds, None, nofuss_data::Subset::all(&ds))?;
    let labels = emb.labels(&subset.labels);
    let paths: Vec<String> = emb
        .kept
        .iter()
        .map(|&i| {
            let path = &ds.records[subset.indices[i]].path;
            path.to_string_lossy().replace('\\', "/")
        })
        .collect();
    let metadata = HashMap::from([
        ("paths".to_string(), paths.join("\n")),
        ("folders".to_string(), ds.class_names.join("\n")),
    ]);
    let n = labels.len();
    write_embeddings(
        out,
        emb.values,
        labels,
        run.cfg.model.head.dim,
        Some(metadata),
    )?;
    Ok(n)
}

/// Runs the experiment of `cfg`: prepares the data, trains, evaluates after every
/// epoch, and writes the run directory.
pub fn train(cfg: &TrainConfig, opts: &TrainOptions) -> Result<RunSummary> {
    let start = Instant::now();
    // A resumed run with a finished epoch restores every weight and proxy from its saved
    // state: neither the starting weights (which may have moved since) nor the class
    // means are needed.
    let restoring = opts
        .resume
        .as_deref()
        .is_some_and(|dir| run_dir::finished_epochs(dir) > 0);
    let restored_cfg;
    let cfg = if restoring {
        let mut c = cfg.clone();
        c.model.weights = None;
        restored_cfg = c;
        &restored_cfg
    } else {
        cfg
    };
    cfg.check()?;
    let picked = cfg.device.parse::<DeviceSpec>()?.select()?;
    let device = picked.device.clone();
    say(opts, format!("device: {}", picked.description));
    if cfg.cuda_graph && !nofuss_tensor::graph::graphs_available(&device) {
        return Err(TrainError::Config(format!(
            "cuda_graph replays training steps on a CUDA device (a build with --features \
             cuda and a GPU); this run is on {}",
            picked.description
        )));
    }

    let PreparedData {
        train_set,
        test_set,
        train_images: train_bank,
        test_images: test_bank,
        val,
    } = prepare_data(cfg, opts)?;
    say(
        opts,
        format!(
            "zero-shot split: train {} classes / {} images, test {} unseen classes / {} images",
            train_set.num_classes(),
            train_bank.len(),
            test_set.num_classes(),
            test_bank.len()
        ),
    );
    if train_bank.len() < cfg.optim.batch_size {
        return Err(TrainError::Config(format!(
            "{} training images cannot fill one batch of {}",
            train_bank.len(),
            cfg.optim.batch_size
        )));
    }

    let prefix = match cfg.data.dataset {
        DatasetKind::Glyphs => "glyphs",
        DatasetKind::Cub => "cub",
        DatasetKind::Cars => "cars",
        DatasetKind::Sop => "sop",
        DatasetKind::Folder => "folder",
    };
    let dir = match &opts.resume {
        Some(d) => d.clone(),
        None => {
            let dir = run_dir::create(&cfg.run.out_dir, cfg.run.name.as_deref(), prefix)?;
            run_dir::write_atomic(&dir.join(run_dir::CONFIG), cfg.to_toml()?.as_bytes())?;
            dir
        }
    };
    say(opts, format!("run directory: {}", dir.display()));

    let model = Model::new(cfg, train_set.num_classes(), &device)?;
    if cfg.loss.proxy_init == ProxyInit::ClassMeans && !restoring {
        model.proxies_at_class_means(&train_bank, &train_set.labels, &device)?;
    }
    let mut opt = model.optimizer(&cfg.optim)?;
    let mut replay = cfg.cuda_graph.then(|| Replay {
        batch: cfg.optim.batch_size,
        captured: None,
    });
    let dynamic = model.loss.spec().assignment() == nofuss_losses::Assignment::Dynamic;
    let mut reseeder = match (model.loss.proxies(), cfg.loss.reseed_unused_after) {
        (Some(p), after) if dynamic && after > 0 => {
            Some(ProxyReseeder::new(p.dim(0)?, after, cfg.seed))
        }
        _ => None,
    };
    let proxy_var = model
        .proxy_params
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == "proxies")
        .map(|(_, v)| v);
    let norm = model.embedder.backbone().input().normalization;
    let augment = Augment {
        max_shift: cfg.data.max_shift,
        hflip: cfg.data.hflip,
    };

    let mut history = Vec::new();
    let t0 = Instant::now();
    // Prints, appends to metrics.jsonl (fsync) and redraws the plot: once per evaluation.
    let record = |history: &mut Vec<EpochMetrics>, m: EpochMetrics| -> Result<()> {
        say(opts, epoch_line(&m));
        run_dir::append_metrics(&dir, &m.to_json())?;
        history.push(m);
        write_plot(&dir, history, &cfg.loss.name)
    };
    // Evaluation on the validation classes, when held out.
    let validate = |val: &Option<(nofuss_data::Subset, Images)>| -> Result<Option<EvalReport>> {
        match val {
            Some((subset, images)) => Ok(Some(evaluate(
                &model,
                images,
                &subset.labels,
                cfg,
                &device,
            )?)),
            None => Ok(None),
        }
    };
    let (mut total_steps, mut total_train_secs) = (0usize, 0f64);
    let mut first_epoch = 1;
    let resumed = match &opts.resume {
        Some(_) => {
            let lines = run_dir::read_metrics(&dir)?;
            history = lines
                .iter()
                .map(EpochMetrics::from_json)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    TrainError::Config(format!(
                        "{}: a metrics line lacks epoch or recall fields",
                        dir.join(run_dir::METRICS).display()
                    ))
                })?;
            let finished = history.iter().filter(|m| m.epoch >= 1).count();
            if finished >= cfg.optim.epochs {
                return Err(TrainError::Config(format!(
                    "run {} already finished its {} epoch(s); pass --epochs N to train on",
                    dir.display(),
                    cfg.optim.epochs
                )));
            }
            if finished > 0 {
                let path = run_dir::resume_checkpoint(&dir, finished);
                let saved = model.load_resume(&path, &mut opt, finished, &device)?;
                if let Some(r) = reseeder.as_mut() {
                    if let Some(t) = saved.get("reseed.last_used") {
                        let used = t.to_vec1::<f64>()?.into_iter().map(|u| u as u64).collect();
                        r.set_last_used(used)?;
                    }
                }
                if let Some(last) = history.last() {
                    total_steps = last.steps;
                    total_train_secs = last.train_seconds;
                }
            }
            // Other resumable states are stale: older ones a kill left before their
            // removal, or one of an epoch whose metrics line never came.
            for e in (0..=cfg.optim.epochs + 1).filter(|&e| e != finished) {
                let stale = run_dir::resume_checkpoint(&dir, e);
                if stale.exists() {
                    std::fs::remove_file(&stale).map_err(|e| TrainError::io(&stale, e))?;
                }
            }
            first_epoch = finished + 1;
            say(
                opts,
                format!("resuming after epoch {finished} of {}", cfg.optim.epochs),
            );
            !history.is_empty()
        }
        None => false,
    };
    if !resumed {
        let m0 = EpochMetrics {
            epoch: 0,
            train_loss: None,
            skipped_steps: 0,
            steps: 0,
            train_seconds: 0.0,
            eval: evaluate(&model, &test_bank, &test_set.labels, cfg, &device)?,
            val: validate(&val)?,
            images_per_sec: None,
            seconds: t0.elapsed().as_secs_f64(),
        };
        record(&mut history, m0)?;
    }

    for epoch in first_epoch..=cfg.optim.epochs {
        let t_epoch = Instant::now();
        let (num_batches, batches) = train_bank.train_epoch(
            &train_set.labels,
            cfg.optim.batch_size,
            cfg.seed,
            epoch as u64,
            augment,
            &norm,
            &device,
        )?;
        let pb = if opts.progress {
            ProgressBar::new(num_batches as u64)
        } else {
            ProgressBar::hidden()
        };
        pb.set_style(
            ProgressStyle::with_template(
                "epoch {prefix:>3} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_prefix(format!("{epoch}/{}", cfg.optim.epochs));
        let (mut steps, mut images) = (0usize, 0usize);
        let (mut skipped, mut skip_reason) = (0usize, String::new());
        let mut losses = LossQueue::default();
        let non_finite = |(step, loss): (usize, f32), dir: &Path| TrainError::NonFinite {
            epoch,
            step,
            loss,
            run_dir: dir.to_path_buf(),
            finished: epoch - 1,
        };
        let t_train = Instant::now();
        for (i, batch) in batches.enumerate() {
            let step = i + 1;
            let (batch_images, batch_labels, batch_len) = batch?;
            let lr = cfg.optim.schedule.factor(epoch - 1)
                * warmup_factor(opt.steps(), cfg.optim.warmup_steps);
            // `cuda_graph`: every full batch after the run's first step is a replay.
            let replayed = replay.as_mut().filter(|r| r.ready(&opt, batch_len));
            // The step's operations run on rayon's pool (CPU): see `on_pool`. The next
            // batch is waited for outside it.
            let outcome = if let Some(r) = replayed {
                let loss = r
                    .step(&model, &mut opt, (&batch_images, &batch_labels), lr)
                    .map_err(|e| TrainError::Replay {
                        epoch,
                        step,
                        reason: e.to_string(),
                        run_dir: dir.clone(),
                        finished: epoch - 1,
                    })?;
                StepOutcome::Trained(loss)
            } else {
                nofuss_tensor::on_pool(&device, || -> Result<StepOutcome> {
                    // On a GPU, candle's layout uploads are cached (`with_cached_layouts`),
                    // except around a loss that uploads what it picks from each batch.
                    use nofuss_tensor::with_cached_layouts as cached;
                    let pass = cached(&device, || model.embedder.forward_train(&batch_images))?;
                    let emb = pass.embeddings.clone();
                    let reseed = |r: &mut Option<ProxyReseeder>| -> Result<()> {
                        if let (Some(r), Some(v)) = (r.as_mut(), proxy_var.as_ref()) {
                            r.step(&emb, v, global_step(epoch, num_batches, step))?;
                        }
                        Ok(())
                    };
                    let loss = if model.loss.spec().selects_on_host() {
                        model.loss.loss_with_anchors(&emb, &batch_labels)
                    } else {
                        cached(&device, || {
                            model.loss.loss_with_anchors(&emb, &batch_labels)
                        })
                    };
                    let (loss, anchors) = match loss {
                        Ok(l) => l,
                        Err(LossError::NonFinite(_)) => return Ok(StepOutcome::NonFinite),
                        // A batch without a usable pair or negative teaches nothing: skip the
                        // step (counted in the metrics) rather than end the run.
                        Err(LossError::NoPairs(reason)) => {
                            reseed(&mut reseeder)?;
                            return Ok(StepOutcome::Skipped(reason));
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let grads = cached(&device, || pass.backward(&loss))?;
                    opt.set_lr(lr);
                    if opt.uses_device_scalars() {
                        opt.advance()?; // `cuda_graph`: a partial batch, eagerly
                    }
                    cached(&device, || opt.step(&grads))?;
                    reseed(&mut reseeder)?;
                    Ok(StepOutcome::Trained(step_report(&loss, anchors.as_ref())?))
                })?
            };
            if let Some(r) = replay.as_mut() {
                // After the run's first step every parameter has its optimiser state:
                // from now on the optimiser takes its per-step scalars from the device.
                r.after_eager_step(&mut opt)?;
            }
            let loss = match outcome {
                StepOutcome::Trained(loss) => loss,
                StepOutcome::NonFinite => return Err(non_finite((step, f32::NAN), &dir)),
                StepOutcome::Skipped(reason) => {
                    skipped += 1;
                    skip_reason = reason;
                    pb.inc(1);
                    continue;
                }
            };
            steps += 1;
            images += batch_len;
            if let Err(bad) = losses.push(step, &loss)? {
                return Err(non_finite(bad, &dir));
            }
            let rate = images as f64 / t_train.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!("loss {:.4} | {rate:.0} img/s", losses.mean()));
            pb.inc(1);
        }
        if let Err(bad) = losses.flush()? {
            return Err(non_finite(bad, &dir));
        }
        if losses.without_anchors > 0 {
            // Found on the device (dynamic assignment off the CPU): those steps ran, with
            // zero gradients, and count as skipped.
            steps -= losses.without_anchors;
            skipped += losses.without_anchors;
            skip_reason = "no anchor had a negative proxy: every example of the batch's \
                           other classes was assigned to its positive proxy (found on the \
                           device, after the step ran with zero gradients)"
                .into();
        }
        pb.finish_and_clear();
        if steps == 0 && skipped > 0 {
            return Err(TrainError::NothingToLearn {
                epoch,
                reason: skip_reason,
                run_dir: dir,
                finished: epoch - 1,
            });
        }
        let train_secs = t_train.elapsed().as_secs_f64();
        total_steps += steps;
        total_train_secs += train_secs;
        let m = EpochMetrics {
            epoch,
            train_loss: Some(losses.mean()),
            skipped_steps: skipped,
            steps: total_steps,
            train_seconds: total_train_secs,
            eval: evaluate(&model, &test_bank, &test_set.labels, cfg, &device)?,
            val: validate(&val)?,
            images_per_sec: Some(images as f64 / train_secs.max(1e-9)),
            seconds: t_epoch.elapsed().as_secs_f64(),
        };
        // Checkpoints first, then the metrics line that declares the epoch finished,
        // then the previous resumable state goes.
        let mut resume = model.state();
        for (k, v) in opt.state()? {
            resume.insert(format!("optim.{k}"), v);
        }
        resume.insert(
            "nofuss.epoch".into(),
            Tensor::new(&[epoch as f64], &Device::Cpu)?,
        );
        if let Some(r) = &reseeder {
            let used: Vec<f64> = r.last_used().iter().map(|&u| u as f64).collect();
            let n = used.len();
            resume.insert(
                "reseed.last_used".into(),
                Tensor::from_vec(used, n, &Device::Cpu)?,
            );
        }
        save_checkpoint(&run_dir::resume_checkpoint(&dir, epoch), &resume)?;
        save_checkpoint(&dir.join(run_dir::LAST_CHECKPOINT), &model.state())?;
        record(&mut history, m)?;
        if selected_epoch(&history) == Some(epoch) {
            save_checkpoint(&dir.join(run_dir::BEST_CHECKPOINT), &model.state())?;
        }
        let previous = run_dir::resume_checkpoint(&dir, epoch - 1);
        if previous.exists() {
            std::fs::remove_file(&previous).map_err(|e| TrainError::io(&previous, e))?;
        }
    }
    save_checkpoint(&dir.join(run_dir::FINAL_CHECKPOINT), &model.state())?;
    let mut skipped = train_bank.skipped();
    skipped.extend(test_bank.skipped());
    if let Some((_, v)) = &val {
        skipped.extend(v.skipped());
    }
    report_skipped("the photo pipeline skipped", &skipped);
    Ok(RunSummary {
        run_dir: dir,
        device: picked.description,
        train_classes: train_set.num_classes(),
        // Less the images the photo pipeline skipped (each counted once).
        train_images: train_bank.len() - train_bank.skipped().len(),
        test_classes: test_set.num_classes(),
        test_images: test_bank.len() - test_bank.skipped().len(),
        val_classes: val.as_ref().map(|(s, _)| s.num_classes()).unwrap_or(0),
        selected_epoch: selected_epoch(&history),
        history,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn write_plot(dir: &Path, history: &[EpochMetrics], loss_name: &str) -> Result<()> {
    let loss: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| m.train_loss.map(|l| (m.epoch as f64, l)))
        .collect();
    let r1: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| m.eval.recall.first().map(|&(_, r)| (m.epoch as f64, r)))
        .collect();
    let k = history
        .first()
        .and_then(|m| m.eval.recall.first())
        .map(|r| r.0)
        .unwrap_or(1);
    let title = format!("Recall@{k}, unseen classes");
    let loss_title = format!("training loss ({loss_name})");
    crate::plot::plot(
        &dir.join(run_dir::PLOT),
        "epoch",
        &[
            crate::plot::Series {
                title: &loss_title,
                points: &loss,
            },
            crate::plot::Series {
                title: &title,
                points: &r1,
            },
        ],
    )
}

fn epoch_line(m: &EpochMetrics) -> String {
    let recall: Vec<String> = m
        .eval
        .recall
        .iter()
        .map(|(k, r)| format!("R@{k} {:.4}", r))
        .collect();
    let loss = m
        .train_loss
        .map(|l| format!("loss {l:.4} | "))
        .unwrap_or_else(|| "untrained | ".into());
    let nmi = m
        .eval
        .nmi
        .map(|n| format!(" | NMI {n:.4}"))
        .unwrap_or_default();
    let nmi = match m.eval.map_at_r {
        Some(x) => format!("{nmi} | MAP@R {:.4}", x.map_at_r),
        None => nmi,
    };
    let nmi = match &m.val {
        Some(v) => match v.recall.first() {
            Some((k, r)) => format!("{nmi} | val R@{k} {r:.4}"),
            None => nmi,
        },
        None => nmi,
    };
    let rate = m
        .images_per_sec
        .map(|r| format!(" | {r:.0} img/s"))
        .unwrap_or_default();
    format!(
        "epoch {:>2}: {loss}{}{nmi}{rate} | {:.1}s",
        m.epoch,
        recall.join(" "),
        m.seconds
    )
}

/// The final summary table of a run.
pub fn summary_table(s: &RunSummary) -> String {
    let mut out = String::new();
    let ks: Vec<usize> = s
        .history
        .first()
        .map(|m| m.eval.recall.iter().map(|r| r.0).collect())
        .unwrap_or_default();
    out.push_str(&format!("{:>5}  {:>8}", "epoch", "loss"));
    for k in &ks {
        out.push_str(&format!("  {:>6}", format!("R@{k}")));
    }
    out.push_str(&format!("  {:>6}\n", "NMI"));
    for m in &s.history {
        out.push_str(&format!(
            "{:>5}  {:>8}",
            m.epoch,
            m.train_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into())
        ));
        for (_, r) in &m.eval.recall {
            out.push_str(&format!("  {r:>6.4}"));
        }
        out.push_str(&format!(
            "  {:>6}\n",
            m.eval
                .nmi
                .map(|n| format!("{n:.4}"))
                .unwrap_or_else(|| "-".into())
        ));
    }
    if let (Some(first), Some(last)) = (s.history.first(), s.history.last()) {
        let k = ks.first().copied().unwrap_or(1);
        out.push_str(&format!(
            "\nRecall@{k} on {} unseen classes ({} images): {:.4} untrained -> {:.4} after {} epoch(s)\n",
            s.test_classes,
            s.test_images,
            first.eval.recall_at(k).unwrap_or(f64::NAN),
            last.eval.recall_at(k).unwrap_or(f64::NAN),
            last.epoch
        ));
    }
    if let Some(e) = s.selected_epoch {
        if let Some(m) = s.history.iter().find(|m| m.epoch == e) {
            let (k, v) = m
                .val
                .as_ref()
                .and_then(|v| v.recall.first().copied())
                .unwrap_or((1, f64::NAN));
            out.push_str(&format!(
                "selected epoch {e} on {} validation classes (their Recall@{k} {v:.4}); test Recall@{k} at that epoch: {:.4} (test classes played no part in the choice)\n",
                s.val_classes,
                m.eval.recall_at(k).unwrap_or(f64::NAN),
            ));
        }
    }
    out.push_str(&format!(
        "trained on {} classes / {} images, device {}, {:.1}s in all\nrun directory: {}\n",
        s.train_classes,
        s.train_images,
        s.device,
        s.seconds,
        s.run_dir.display()
    ));
    out
}

/// The training losses of an epoch, each read one step late: the loss of step `i` is read
/// once step `i + 1` is queued, so on a GPU the host keeps queueing work while the device
/// runs the step before, instead of waiting for every step (reading a value waits for
/// the device). A non-finite loss is still seen, one step later, and stops the run before
/// anything of its epoch is saved: [`LossQueue::flush`] reads the last one before the
/// epoch's evaluation. Each step comes as its [`step_report`]; a step whose loss picked
/// no anchor on the device is counted in [`LossQueue::without_anchors`], not in the mean.
#[derive(Default)]
struct LossQueue {
    /// The step whose report is not read yet, and that report (detached from its graph).
    pending: Option<(usize, Tensor)>,
    /// Sum of the losses read.
    sum: f64,
    /// How many were read.
    read: usize,
    /// Steps whose loss reported no anchor (a batch with nothing to learn from, found on
    /// the device after its step ran with zero gradients).
    without_anchors: usize,
}

impl LossQueue {
    /// Queues `step`'s report and reads the one before: `Err((step, value))` for a
    /// non-finite loss.
    fn push(
        &mut self,
        step: usize,
        report: &Tensor,
    ) -> Result<std::result::Result<(), (usize, f32)>> {
        let before = self.pending.replace((step, report.detach()));
        self.settle(before)
    }

    /// Reads the last queued report.
    fn flush(&mut self) -> Result<std::result::Result<(), (usize, f32)>> {
        let last = self.pending.take();
        self.settle(last)
    }

    fn settle(
        &mut self,
        queued: Option<(usize, Tensor)>,
    ) -> Result<std::result::Result<(), (usize, f32)>> {
        let Some((step, report)) = queued else {
            return Ok(Ok(()));
        };
        let v = report.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (value, anchors) = (v[0], v.get(1).copied().unwrap_or(-1.0));
        if !value.is_finite() {
            return Ok(Err((step, value)));
        }
        if anchors == 0.0 {
            self.without_anchors += 1;
            return Ok(Ok(()));
        }
        self.sum += value as f64;
        self.read += 1;
        Ok(Ok(()))
    }

    /// Mean of the losses read so far (0 before any).
    fn mean(&self) -> f64 {
        self.sum / self.read.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step's report without an anchor count.
    fn scalar(v: f32) -> Tensor {
        step_report(&Tensor::new(v, &Device::Cpu).unwrap(), None).unwrap()
    }

    #[test]
    fn losses_are_read_one_step_late_and_non_finite_ones_name_their_step() {
        let mut q = LossQueue::default();
        assert_eq!(q.push(1, &scalar(2.0)).unwrap(), Ok(()));
        assert_eq!((q.read, q.mean()), (0, 0.0)); // step 1 not read yet
        assert_eq!(q.push(2, &scalar(4.0)).unwrap(), Ok(()));
        assert_eq!((q.read, q.mean()), (1, 2.0));
        assert_eq!(q.flush().unwrap(), Ok(()));
        assert_eq!((q.read, q.mean()), (2, 3.0));
        assert_eq!(q.flush().unwrap(), Ok(())); // nothing queued
                                                // A NaN at step 3 surfaces when step 4 is queued, naming step 3.
        let mut q = LossQueue::default();
        q.push(3, &scalar(f32::NAN)).unwrap().unwrap();
        let (step, value) = q.push(4, &scalar(1.0)).unwrap().unwrap_err();
        assert!(step == 3 && value.is_nan());
        // An infinite last loss surfaces at the flush.
        let mut q = LossQueue::default();
        q.push(7, &scalar(f32::INFINITY)).unwrap().unwrap();
        assert_eq!(q.flush().unwrap(), Err((7, f32::INFINITY)));
    }

    #[test]
    fn steps_without_anchors_are_counted_apart_from_the_mean() {
        let cpu = &Device::Cpu;
        let report = |loss: f32, anchors: f32| {
            let a = Tensor::new(anchors, cpu).unwrap();
            step_report(&Tensor::new(loss, cpu).unwrap(), Some(&a)).unwrap()
        };
        let mut q = LossQueue::default();
        q.push(1, &report(2.0, 5.0)).unwrap().unwrap();
        q.push(2, &report(0.0, 0.0)).unwrap().unwrap();
        q.push(3, &scalar(4.0)).unwrap().unwrap();
        q.flush().unwrap().unwrap();
        assert_eq!((q.read, q.without_anchors, q.mean()), (2, 1, 3.0));
        // A non-finite loss stops the run whatever its count says.
        q.push(4, &report(f32::NAN, 0.0)).unwrap().unwrap();
        assert_eq!(q.flush().unwrap().unwrap_err().0, 4);
    }

    #[test]
    fn a_queued_loss_does_not_keep_its_graph() {
        let w = candle_core::Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        let mut q = LossQueue::default();
        q.push(1, &step_report(&loss, None).unwrap())
            .unwrap()
            .unwrap();
        let (_, queued) = q.pending.as_ref().unwrap();
        assert!(!queued.track_op());
    }
}
