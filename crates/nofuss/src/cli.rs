//! The `nofuss` command line. `main.rs` only calls [`run`].
//!
//! The doc comments of the argument structs are also the `--help` text, so they are
//! written for a terminal: `<name>` and `[N,D]` there are placeholders, not HTML or links.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use nofuss_backbone::BatchNormMode;
use nofuss_losses::{Assignment, ProxyInit, ProxyNcaForm};
use nofuss_tensor::optim::{OptimizerKind, Schedule};
use nofuss_tensor::Precision;

use crate::config::{DatasetKind, PipelineKind, TrainConfig};
use crate::train::{summary_table, train, TrainOptions};
use crate::{Result, TrainError};

/// No Fuss distance metric learning with proxies.
#[derive(Debug, Parser)]
#[command(name = "nofuss", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train an embedding with Proxy-NCA and evaluate it on unseen classes.
    ///
    /// With no option, trains the small CNN on the embedded glyph dataset (generated
    /// into data/glyphs on first use) and writes runs/<name>/. Settings come from the
    /// defaults, then --config FILE, then the flags below (flags win).
    Train(Box<TrainArgs>),
    /// The paper's convergence experiment: train the same model with each loss and
    /// compare Recall@1 on unseen classes against training steps and time.
    ///
    /// Every training option applies to all runs (--loss is overridden). Writes
    /// <out-dir>/<name>/<loss>/ for each loss, compare.png and compare.md.
    Compare(Box<CompareArgs>),
    /// Print the default configuration as TOML (a starting point for --config).
    DefaultConfig,
    /// Embed a split of a run's dataset, or a folder of any images, with its trained model
    /// and write the embeddings for `nofuss eval` (or any tool): `embeddings` (f32 [N,D])
    /// and `labels` (u32 [N]).
    Embed {
        /// The run directory (its config.toml and final.safetensors, else
        /// last.safetensors), or a checkpoint file inside one: RUN/best.safetensors for
        /// the epoch its validation classes chose, when it had some.
        #[arg(long, value_name = "RUN|FILE")]
        checkpoint: PathBuf,
        /// Dataset root, if it moved since training.
        #[arg(long, value_name = "DIR", conflicts_with = "images")]
        data_dir: Option<PathBuf>,
        /// Which side of the zero-shot split: test (unseen classes) or train.
        #[arg(long, default_value = "test", value_parser = ["test", "train"])]
        split: String,
        /// Embed every .jpg/.jpeg/.png under DIR (sub-folders too, in path order) instead
        /// of a split, read as the run reads its evaluation images. Labels number the
        /// folders (DIR/<class>/<image> gives class labels); the file's metadata `paths`
        /// lists each row's image and `folders` each label's folder, one per line.
        #[arg(long, value_name = "DIR", conflicts_with = "split")]
        images: Option<PathBuf>,
        /// The .safetensors file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Device: cpu, cuda (or gpu: the first GPU), cuda:N or auto.
        #[arg(long)]
        device: Option<String>,
    },
    /// Evaluate embeddings of any model: Recall@K, and optionally NMI and MAP@R.
    ///
    /// Reads a safetensors file holding `embeddings` (float [N,D]) and `labels` (integer
    /// [N]), or EMBEDDINGS.npy with --labels LABELS.npy. Every point is a query against all
    /// the others, or, with --gallery, against the gallery's points.
    Eval(EvalArgs),
    /// Find the nearest gallery images of query images by their embeddings (files
    /// written by `nofuss embed`, or any safetensors file with `embeddings` [N,D], or
    /// .npy): for each query, its K nearest gallery rows, nearest first, named by the
    /// file's `paths` metadata (`embed --images` writes it) or by row number.
    Search {
        /// The embeddings to search among.
        #[arg(long, value_name = "FILE")]
        gallery: PathBuf,
        /// The embeddings to search with; without it, every gallery row is searched
        /// among the others (itself left out: near-duplicates in a collection).
        #[arg(long, value_name = "FILE")]
        queries: Option<PathBuf>,
        /// Neighbours per query.
        #[arg(long, default_value_t = 5)]
        k: usize,
        /// Distance: euclidean or cosine.
        #[arg(long, default_value = "euclidean", value_parser = parse_metric)]
        metric: nofuss_eval::Metric,
        /// Print one JSON object per query (`query`, `neighbours` with `rank`, `row`,
        /// `name`, `distance`) instead of text.
        #[arg(long)]
        json: bool,
        /// Where the search runs: auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Convert a PyTorch checkpoint (.pth: a pickled state dict) to .safetensors,
    /// tensor names unchanged.
    ConvertWeights {
        /// The .pth (or .pt, .bin) file.
        input: PathBuf,
        /// The .safetensors file to write.
        output: PathBuf,
    },
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// What `nofuss bench` measures.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Images/s of the backbone alone: forward (evaluation mode) and forward + backward
    /// (training mode) of the pooled features, synthetic input on the device; one JSON line.
    Backbone {
        /// Backbone: small-cnn or bn-inception.
        #[arg(long, default_value = "bn-inception")]
        backbone: String,
        /// Images per call.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Input side (default: 224 for bn-inception, 32 for small-cnn).
        #[arg(long)]
        image_size: Option<usize>,
        /// Timed calls per mode; the median is reported.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed warm-up calls per mode.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Device: auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Backbone arithmetic: f32 or bf16 (mixed precision).
        #[arg(long, default_value = "f32")]
        precision: Precision,
    },
    /// Images/s of whole training steps (forward, Proxy-NCA, backward, optimisers) on
    /// synthetic input already on the device; prints one JSON line.
    TrainStep {
        /// Backbone: small-cnn or bn-inception.
        #[arg(long, default_value = "small-cnn")]
        backbone: String,
        /// Images per step.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Input side (default: 224 for bn-inception, 32 for small-cnn).
        #[arg(long)]
        image_size: Option<usize>,
        /// Number of proxies (classes).
        #[arg(long, default_value_t = 100)]
        classes: usize,
        /// Timed steps; the median is reported.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Device: auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Backbone arithmetic: f32 or bf16 (mixed precision).
        #[arg(long, default_value = "f32")]
        precision: Precision,
        /// Also time forward, backward and optimiser separately, waiting for the device
        /// after each: queueing time against completion time per phase.
        #[arg(long)]
        phases: bool,
        /// Choose cuDNN's convolution algorithms by timing each once (PyTorch's
        /// cudnn.benchmark) instead of its heuristic's pick (CUDA only).
        #[arg(long)]
        cudnn_benchmark: bool,
        /// Also time each of nofuss's own operations (CUDA kernels and cuDNN passes, or the
        /// CPU operations) in extra steps: milliseconds per step, largest first, under "ops".
        #[arg(long)]
        profile_ops: bool,
        /// Differentiate the backbone through candle's graph instead of nofuss's tape
        /// (to compare the two).
        #[arg(long)]
        graph_backward: bool,
        /// Capture one step into a CUDA graph after the warm-up and time its replays
        /// (one launch per step; CUDA only).
        #[arg(long)]
        cuda_graph: bool,
        /// Loss, as `train --loss` names it.
        #[arg(long, default_value = "proxy-nca", value_name = "NAME")]
        loss: String,
        /// Proxy assignment: static, or dynamic over --classes proxies (picked on the
        /// device off the CPU).
        #[arg(long, value_enum, default_value = "static")]
        assignment: AssignmentArg,
    },
}

/// Options of `nofuss compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Losses to compare: proxy-nca, proxy-triplet, triplet, triplet-semihard, nca.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "proxy-nca,proxy-triplet,triplet-semihard,nca",
        value_name = "L,L,..."
    )]
    pub losses: Vec<String>,
    /// Training options shared by all runs.
    #[command(flatten)]
    pub train: TrainArgs,
}

/// Options of `nofuss train`; every flag overrides the configuration file.
#[derive(Debug, Args, Default)]
pub struct TrainArgs {
    /// TOML configuration file (see `nofuss default-config`).
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// Start from a shipped recipe: cub, cars, sop (the paper's) or cub-repro,
    /// cars-repro, sop-repro (the public reproduction's); see crates/nofuss/presets/.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Dataset kind.
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetKind>,
    /// Dataset root (CUB-200-2011 layout); the glyph dataset is generated here if absent.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Images are resized to SIZE x SIZE.
    #[arg(long, value_name = "SIZE")]
    pub image_size: Option<usize>,
    /// Image channels: 1 (grayscale) or 3 (RGB).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Image pipeline: memory (decode once, resize; the default) or photo (stream from
    /// disk with RandomResizedCrop for training, resize + center crop for evaluation).
    #[arg(long, value_enum)]
    pub pipeline: Option<PipelineKind>,
    /// Hold out the last N training classes for validation: the reported epoch is the
    /// one with the best validation Recall@K, never chosen on the test classes.
    #[arg(long, value_name = "N")]
    pub val_classes: Option<usize>,
    /// Class-balanced batches with M images per class (photo pipeline).
    #[arg(long, value_name = "M")]
    pub m_per_class: Option<usize>,
    /// Crop inside the bounding boxes of CUB-200-2011 (bounding_boxes.txt) or Cars196
    /// (photo pipeline).
    #[arg(long)]
    pub crop_to_boxes: bool,
    /// Continue the run in RUN_DIR after its last finished epoch, with its own
    /// config.toml (other options are ignored, except --epochs to train longer).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Leave out unreadable or corrupt images (counted, listed on stderr) instead of
    /// stopping at the first one.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Glyph dataset: keep only the first N classes (quick experiments).
    #[arg(long, value_name = "N")]
    pub max_classes: Option<usize>,
    /// Glyph dataset: distorted renders per character and font.
    #[arg(long, value_name = "N")]
    pub renders_per_font: Option<usize>,
    /// Backbone: small-cnn or bn-inception (3-channel input, e.g. --channels 3
    /// --image-size 224).
    #[arg(long, value_name = "NAME")]
    pub backbone: Option<String>,
    /// Backbone weights to start from: .pth (e.g. bn_inception-52deb4733.pth from
    /// `cargo xtask fetch-weights bn-inception`) or .safetensors.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Batch normalisation while training: train (batch statistics) or frozen
    /// (running statistics; BN-Inception only).
    #[arg(long, value_enum)]
    pub bn: Option<BnArg>,
    /// Backbone arithmetic: f32, or bf16 (mixed precision: parameters, batch-norm
    /// statistics, embeddings, proxies and the loss stay f32).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Small CNN block widths, e.g. 16,32,64.
    #[arg(long, value_delimiter = ',', value_name = "W,W,...")]
    pub widths: Option<Vec<usize>>,
    /// Embedding dimension.
    #[arg(long, value_name = "D")]
    pub embedding_dim: Option<usize>,
    /// Loss: proxy-nca, proxy-triplet, triplet (all in-batch triplets),
    /// triplet-semihard (FaceNet) or nca (in-batch NCA).
    #[arg(long, value_name = "NAME")]
    pub loss: Option<String>,
    /// Proxy assignment of the proxy losses: static (one proxy per class) or dynamic
    /// (nearest proxy; allows --num-proxies different from the number of classes).
    #[arg(long, value_enum)]
    pub assignment: Option<AssignmentArg>,
    /// Number of proxies (dynamic assignment); default: one per training class.
    #[arg(long, value_name = "P")]
    pub num_proxies: Option<usize>,
    /// Dynamic assignment: move proxies unused for N steps onto example embeddings
    /// (off by default; not part of the paper's method).
    #[arg(long, value_name = "N")]
    pub reseed_unused: Option<u64>,
    /// Proxy initialisation: normal (randn/8), xavier, or class-means (the classes'
    /// mean embeddings at the start; what dynamic assignment needs).
    #[arg(long, value_enum)]
    pub proxy_init: Option<ProxyInitArg>,
    /// Margin of proxy-triplet, triplet and triplet-semihard.
    #[arg(long, value_name = "M")]
    pub margin: Option<f64>,
    /// Proxy-Triplet: only the K nearest (hardest) negative proxies of each anchor;
    /// default: all of them.
    #[arg(long, value_name = "K")]
    pub hardest_negatives: Option<usize>,
    /// Proxy-NCA form: paper (positive excluded from the denominator) or softmax.
    #[arg(long, value_parser = parse_form)]
    pub loss_form: Option<ProxyNcaForm>,
    /// Scale of the normalised embeddings and proxies (inverse temperature) of
    /// proxy-nca and proxy-triplet.
    #[arg(long, value_name = "S")]
    pub loss_scale: Option<f64>,
    /// Label smoothing (softmax form only).
    #[arg(long, value_name = "EPS")]
    pub label_smoothing: Option<f64>,
    /// Training epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate of the backbone and head.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of the proxies.
    #[arg(long)]
    pub proxy_lr: Option<f64>,
    /// Weight decay of the backbone and head (decoupled for adamw, L2 otherwise).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Optimiser: sgd, rmsprop, rmsprop-tf (TensorFlow's RMSProp), adam or adamw, with
    /// PyTorch's defaults (TensorFlow's for rmsprop-tf: decay 0.9, momentum 0.9, eps 1).
    #[arg(long, value_name = "NAME")]
    pub optimizer: Option<String>,
    /// Momentum of sgd and rmsprop.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Epsilon of rmsprop and adam(w) (Proxy-NCA reproductions use Adam with eps 1).
    #[arg(long)]
    pub eps: Option<f64>,
    /// Learning-rate schedule per epoch: constant, exponential:GAMMA (e.g. 0.94),
    /// step:EVERY:GAMMA, cosine (to 0 over the run) or cosine:MIN_FACTOR.
    #[arg(long, value_name = "SCHEDULE")]
    pub schedule: Option<String>,
    /// Linear learning-rate warm-up over the first N steps.
    #[arg(long, value_name = "N")]
    pub warmup_steps: Option<u64>,
    /// Clip the global gradient norm to this value.
    #[arg(long, value_name = "NORM")]
    pub clip_norm: Option<f64>,
    /// Learning rate of the embedding head as a multiple of --lr.
    #[arg(long, value_name = "FACTOR")]
    pub head_lr_scale: Option<f64>,
    /// The K of Recall@K, e.g. 1,2,4,8.
    #[arg(long, value_delimiter = ',', value_name = "K,K,...")]
    pub eval_k: Option<Vec<usize>>,
    /// Skip k-means and NMI.
    #[arg(long)]
    pub no_nmi: bool,
    /// Also report MAP@R and R-Precision on the unseen classes.
    #[arg(long)]
    pub map_at_r: bool,
    /// Seed of parameters, proxies, shuffling, augmentation and k-means.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// On CUDA, choose cuDNN's convolution algorithms by timing each once (PyTorch's
    /// cudnn.benchmark; a slower first step) instead of its heuristic's pick.
    #[arg(long)]
    pub cudnn_benchmark: bool,
    /// On CUDA, capture the training step into a CUDA graph after the first step and
    /// replay it for every full batch (proxy losses, static or dynamic, without
    /// --reseed-unused; `compare` runs the other losses eagerly and says so in its report).
    #[arg(long)]
    pub cuda_graph: bool,
    /// Parent folder of run directories.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Run name (default: <dataset>-<UTC time>); an existing run with finished epochs is refused.
    #[arg(long)]
    pub name: Option<String>,
    /// Print only the final summary.
    #[arg(long)]
    pub quiet: bool,
}

/// Proxy initialisation on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyInitArg {
    /// `randn / 8`.
    Normal,
    /// Xavier uniform.
    Xavier,
    /// Class means of the initial embeddings.
    ClassMeans,
}

/// Proxy assignment on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AssignmentArg {
    /// One proxy per class.
    Static,
    /// Nearest proxy.
    Dynamic,
}

impl From<AssignmentArg> for Assignment {
    fn from(a: AssignmentArg) -> Self {
        match a {
            AssignmentArg::Static => Assignment::Static,
            AssignmentArg::Dynamic => Assignment::Dynamic,
        }
    }
}

/// Batch-norm mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BnArg {
    /// Batch statistics while training.
    Train,
    /// Running statistics always.
    Frozen,
}

/// Options of `nofuss eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Embeddings: a .safetensors file with `embeddings` and `labels`, or a .npy file.
    #[arg(long, value_name = "FILE")]
    pub embeddings: PathBuf,
    /// Labels as .npy (only with .npy embeddings).
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Search the embeddings as queries among this gallery (same formats as
    /// --embeddings): the In-Shop Clothes protocol, a hit being a gallery row of the
    /// query's class. Recall@K and MAP@R; NMI clusters one set, so not with --nmi.
    #[arg(long, value_name = "FILE", conflicts_with = "nmi")]
    pub gallery: Option<PathBuf>,
    /// The gallery's labels as .npy (only with a .npy gallery).
    #[arg(long, value_name = "FILE", requires = "gallery")]
    pub gallery_labels: Option<PathBuf>,
    /// The K of Recall@K.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8",
        value_name = "K,K,..."
    )]
    pub k: Vec<usize>,
    /// Also cluster with k-means (k = number of classes) and report NMI.
    #[arg(long)]
    pub nmi: bool,
    /// Also report MAP@R and R-Precision.
    #[arg(long)]
    pub map_at_r: bool,
    /// Distance: euclidean or cosine.
    #[arg(long, default_value = "euclidean", value_parser = parse_metric)]
    pub metric: nofuss_eval::Metric,
    /// Seed of k-means.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON (keys recall@K, nmi, map@r, r_precision) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where the neighbour search runs: auto, cpu, cuda or cuda:N (auto: the GPU when
    /// built with CUDA and one answers; the choice is printed to stderr).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// An optimiser by name, with its usual defaults.
fn parse_optimizer(name: &str) -> Result<OptimizerKind> {
    Ok(match name {
        "sgd" => OptimizerKind::sgd(0.9, false),
        "sgd-nesterov" => OptimizerKind::sgd(0.9, true),
        "rmsprop" => OptimizerKind::rmsprop(0.0),
        "rmsprop-tf" => OptimizerKind::RmsProp {
            alpha: 0.9,
            eps: 1.0,
            momentum: 0.9,
            centered: false,
            tf_style: true,
        },
        "adam" => OptimizerKind::adam(),
        "adamw" => OptimizerKind::adamw(),
        other => {
            return Err(TrainError::Config(format!(
                "unknown optimiser '{other}': sgd, sgd-nesterov, rmsprop, rmsprop-tf, adam or adamw"
            )))
        }
    })
}

/// A schedule from `constant`, `exponential:G`, `step:N:G`, `cosine` or `cosine:MIN`.
fn parse_schedule(s: &str, epochs: usize) -> Result<Schedule> {
    let bad = || {
        TrainError::Config(format!(
            "schedule '{s}': expected constant, exponential:GAMMA, step:EVERY:GAMMA, cosine or cosine:MIN_FACTOR"
        ))
    };
    let parts: Vec<&str> = s.split(':').collect();
    let num = |i: usize| -> Result<f64> {
        parts
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(bad)
    };
    Ok(match parts[0] {
        "constant" if parts.len() == 1 => Schedule::Constant,
        "exponential" if parts.len() == 2 => Schedule::Exponential { gamma: num(1)? },
        "step" if parts.len() == 3 => Schedule::Step {
            every: num(1)? as usize,
            gamma: num(2)?,
        },
        "cosine" if parts.len() <= 2 => Schedule::Cosine {
            epochs,
            min_factor: if parts.len() == 2 { num(1)? } else { 0.0 },
        },
        _ => return Err(bad()),
    })
}

fn parse_metric(s: &str) -> std::result::Result<nofuss_eval::Metric, String> {
    match s {
        "euclidean" => Ok(nofuss_eval::Metric::Euclidean),
        "cosine" => Ok(nofuss_eval::Metric::Cosine),
        _ => Err(format!("'{s}' is not a metric: use euclidean or cosine")),
    }
}

fn parse_form(s: &str) -> std::result::Result<ProxyNcaForm, String> {
    match s {
        "paper" => Ok(ProxyNcaForm::Paper),
        "softmax" => Ok(ProxyNcaForm::Softmax),
        _ => Err(format!(
            "'{s}' is not a Proxy-NCA form: use paper or softmax"
        )),
    }
}

impl TrainArgs {
    /// The configuration: defaults, then `--config`, then flags.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let mut c = match (&self.config, &self.preset) {
            (Some(p), _) => TrainConfig::from_file(p)?,
            (None, Some(name)) => TrainConfig::preset(name)?,
            (None, None) => TrainConfig::default(),
        };
        macro_rules! set {
            ($field:expr, $opt:expr) => {
                if let Some(v) = $opt.clone() {
                    $field = v;
                }
            };
        }
        set!(c.data.dataset, self.dataset);
        set!(c.data.dir, self.data_dir);
        set!(c.data.image_size, self.image_size);
        set!(c.data.channels, self.channels);
        if self.skip_bad_images {
            c.data.skip_bad_images = true;
        }
        set!(c.data.pipeline, self.pipeline);
        set!(c.data.val_classes, self.val_classes);
        if self.m_per_class.is_some() {
            c.data.m_per_class = self.m_per_class;
        }
        if self.crop_to_boxes {
            c.data.crop_to_boxes = true;
        }
        if self.max_classes.is_some() {
            c.data.glyphs.max_classes = self.max_classes;
        }
        set!(c.data.glyphs.renders_per_font, self.renders_per_font);
        set!(c.model.backbone, self.backbone);
        set!(c.model.precision, self.precision);
        if self.weights.is_some() {
            c.model.weights = self.weights.clone();
        }
        if let Some(bn) = self.bn {
            c.model.bn_inception.batch_norm = match bn {
                BnArg::Train => BatchNormMode::Train,
                BnArg::Frozen => BatchNormMode::Frozen,
            };
        }
        set!(c.model.small_cnn.widths, self.widths);
        set!(c.model.head.dim, self.embedding_dim);
        set!(c.loss.proxy_nca.form, self.loss_form);
        if let Some(s) = self.loss_scale {
            c.loss.proxy_nca.embedding_scale = s;
            c.loss.proxy_nca.proxy_scale = s;
            c.loss.proxy_triplet.embedding_scale = s;
            c.loss.proxy_triplet.proxy_scale = s;
        }
        set!(c.loss.name, self.loss);
        if let Some(a) = self.assignment {
            let a = Assignment::from(a);
            c.loss.proxy_nca.assignment = a;
            c.loss.proxy_triplet.assignment = a;
        }
        set!(c.loss.reseed_unused_after, self.reseed_unused);
        if self.num_proxies.is_some() {
            c.loss.num_proxies = self.num_proxies;
        }
        if let Some(i) = self.proxy_init {
            c.loss.proxy_init = match i {
                ProxyInitArg::Normal => ProxyInit::Normal,
                ProxyInitArg::Xavier => ProxyInit::Xavier,
                ProxyInitArg::ClassMeans => ProxyInit::ClassMeans,
            };
        }
        if let Some(m) = self.margin {
            c.loss.proxy_triplet.margin = m;
            c.loss.triplet.margin = m;
        }
        if self.hardest_negatives.is_some() {
            c.loss.proxy_triplet.hardest_negatives = self.hardest_negatives;
        }
        set!(c.loss.proxy_nca.label_smoothing, self.label_smoothing);
        set!(c.optim.epochs, self.epochs);
        set!(c.optim.batch_size, self.batch_size);
        set!(c.optim.lr, self.lr);
        set!(c.optim.proxy_lr, self.proxy_lr);
        set!(c.optim.weight_decay, self.weight_decay);
        if let Some(name) = &self.optimizer {
            c.optim.optimizer = parse_optimizer(name)?;
        }
        if let Some(m) = self.momentum {
            match &mut c.optim.optimizer {
                OptimizerKind::Sgd { momentum, .. } | OptimizerKind::RmsProp { momentum, .. } => {
                    *momentum = m
                }
                _ => {
                    return Err(TrainError::Config(
                        "--momentum applies to sgd and rmsprop".into(),
                    ))
                }
            }
        }
        if let Some(e) = self.eps {
            match &mut c.optim.optimizer {
                OptimizerKind::RmsProp { eps, .. }
                | OptimizerKind::Adam { eps, .. }
                | OptimizerKind::AdamW { eps, .. } => *eps = e,
                OptimizerKind::Sgd { .. } => {
                    return Err(TrainError::Config("--eps does not apply to sgd".into()))
                }
            }
        }
        if let Some(sch) = &self.schedule {
            c.optim.schedule = parse_schedule(sch, c.optim.epochs)?;
        }
        set!(c.optim.warmup_steps, self.warmup_steps);
        if self.clip_norm.is_some() {
            c.optim.clip_norm = self.clip_norm;
        }
        set!(c.optim.head_lr_scale, self.head_lr_scale);
        set!(c.eval.ks, self.eval_k);
        if self.no_nmi {
            c.eval.nmi = false;
        }
        if self.map_at_r {
            c.eval.map_at_r = true;
        }
        set!(c.seed, self.seed);
        set!(c.device, self.device);
        if self.cudnn_benchmark {
            c.cudnn_benchmark = true;
        }
        if self.cuda_graph {
            c.cuda_graph = true;
        }
        set!(c.run.out_dir, self.out_dir);
        if self.name.is_some() {
            c.run.name = self.name.clone();
        }
        c.check()?;
        Ok(c)
    }
}

/// Runs the command line `cli`.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => {
            let (cfg, resume) = match &args.resume {
                Some(dir) => {
                    if !dir.is_dir() {
                        return Err(TrainError::Input {
                            path: dir.clone(),
                            message: "no such run directory to resume".into(),
                        });
                    }
                    let path = dir.join(crate::run_dir::CONFIG);
                    let mut cfg = TrainConfig::from_file(&path)?;
                    if let Some(e) = args.epochs {
                        cfg.optim.epochs = e;
                        crate::run_dir::write_atomic(&path, cfg.to_toml()?.as_bytes())?;
                    }
                    (cfg, Some(dir.clone()))
                }
                None => (args.resolve()?, None),
            };
            let opts = TrainOptions {
                verbose: !args.quiet,
                progress: !args.quiet,
                resume,
            };
            let summary = train(&cfg, &opts)?;
            println!("\n{}", summary_table(&summary));
            Ok(())
        }
        Command::Eval(a) => {
            let e = crate::eval_cmd::load(&a.embeddings, a.labels.as_deref())?;
            let cfg = nofuss_eval::EvalConfig {
                ks: a.k.clone(),
                metric: a.metric,
                nmi: a.nmi,
                map_at_r: a.map_at_r,
                kmeans: nofuss_eval::KMeansConfig {
                    seed: a.seed,
                    ..Default::default()
                },
            };
            let picked = a.device.parse::<nofuss_tensor::DeviceSpec>()?.select()?;
            eprintln!("device: {}", picked.description);
            let (report, heading) = match &a.gallery {
                None => (
                    nofuss_eval::evaluate_on(&picked.device, &e.data, e.dim, &e.labels, &cfg)?,
                    format!("{} embeddings of dimension {}", e.labels.len(), e.dim),
                ),
                Some(g) => {
                    let gallery = crate::eval_cmd::load(g, a.gallery_labels.as_deref())?;
                    crate::eval_cmd::check_same_dim(&a.embeddings, e.dim, g, gallery.dim)?;
                    let report = nofuss_eval::evaluate_between_on(
                        &picked.device,
                        &e.data,
                        &e.labels,
                        &gallery.data,
                        &gallery.labels,
                        e.dim,
                        &cfg,
                    )?;
                    let heading = format!(
                        "{} queries among {} gallery embeddings of dimension {}",
                        e.labels.len(),
                        gallery.labels.len(),
                        e.dim
                    );
                    (report, heading)
                }
            };
            if a.json {
                println!("{}", crate::eval_cmd::report_json(&report));
            } else {
                println!("{heading}");
                print!("{}", crate::eval_cmd::report_table(&report));
            }
            Ok(())
        }
        Command::Search {
            gallery,
            queries,
            k,
            metric,
            json,
            device,
        } => {
            let g = crate::search::load_named(&gallery)?;
            let q = match &queries {
                Some(path) => {
                    let q = crate::search::load_named(path)?;
                    crate::eval_cmd::check_same_dim(path, q.dim, &gallery, g.dim)?;
                    Some(q)
                }
                None => None,
            };
            let picked = device.parse::<nofuss_tensor::DeviceSpec>()?.select()?;
            eprintln!("device: {}", picked.description);
            let nb = crate::search::search(&picked.device, q.as_ref(), &g, k, metric)?;
            let names = q.as_ref().map_or(&g.names, |q| &q.names);
            let mut out = std::io::stdout().lock();
            for (i, name) in names.iter().enumerate() {
                let line = if json {
                    format!("{}\n", crate::search::result_json(name, &nb, i, &g))
                } else {
                    crate::search::result_text(name, &nb, i, &g)
                };
                match std::io::Write::write_all(&mut out, line.as_bytes()) {
                    Ok(()) => {}
                    // `nofuss search ... | head`: the reader has what it wanted.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                    Err(error) => {
                        return Err(TrainError::Io {
                            path: "<stdout>".into(),
                            error,
                        })
                    }
                }
            }
            Ok(())
        }
        Command::ConvertWeights { input, output } => {
            let n = crate::convert::convert_weights(&input, &output)?;
            println!("wrote {n} tensors to {}", output.display());
            Ok(())
        }
        Command::Bench(BenchCommand::Backbone {
            backbone,
            batch_size,
            image_size,
            steps,
            warmup,
            device,
            precision,
        }) => {
            let b = crate::bench::BackboneBench {
                backbone,
                batch_size,
                image_size,
                steps,
                warmup,
                device,
                precision,
            };
            println!("{}", crate::bench::backbone(&b)?);
            Ok(())
        }
        Command::Bench(BenchCommand::TrainStep {
            backbone,
            batch_size,
            image_size,
            classes,
            steps,
            warmup,
            device,
            precision,
            phases,
            cudnn_benchmark,
            profile_ops,
            graph_backward,
            cuda_graph,
            loss,
            assignment,
        }) => {
            let b = crate::bench::TrainStepBench {
                backbone,
                batch_size,
                image_size,
                classes,
                steps,
                warmup,
                device,
                precision,
                phases,
                cudnn_benchmark,
                profile_ops,
                graph_backward,
                cuda_graph,
                loss,
                assignment: assignment.into(),
            };
            println!("{}", crate::bench::train_step(&b)?);
            Ok(())
        }
        Command::Compare(a) => {
            let cfg = a.train.resolve()?;
            let opts = TrainOptions {
                verbose: !a.train.quiet,
                progress: !a.train.quiet,
                resume: None,
            };
            let c = crate::compare::compare(&cfg, &a.losses, &opts)?;
            println!("\n{}", c.report);
            println!("runs, compare.png and compare.md in {}", c.dir.display());
            Ok(())
        }
        Command::Embed {
            checkpoint,
            data_dir,
            split,
            images,
            out,
            device,
        } => {
            let n = match images {
                Some(dir) => {
                    crate::train::embed_images(&checkpoint, &dir, &out, device.as_deref())?
                }
                None => crate::train::embed_split(
                    &checkpoint,
                    data_dir.as_deref(),
                    &split,
                    &out,
                    device.as_deref(),
                )?,
            };
            println!("{n} embeddings written to {}", out.display());
            Ok(())
        }
        Command::DefaultConfig => {
            print!("{}", TrainConfig::default().to_toml()?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> TrainArgs {
        let cli =
            Cli::try_parse_from(std::iter::once("nofuss").chain(args.iter().copied())).unwrap();
        match cli.command {
            Command::Train(a) => *a,
            _ => panic!("not train"),
        }
    }

    #[test]
    fn flags_override_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "seed = 3\n[optim]\nepochs = 9\nlr = 0.5\n").unwrap();
        let c = parse(&[
            "train",
            "--config",
            p.to_str().unwrap(),
            "--epochs",
            "2",
            "--eval-k",
            "1,5",
        ])
        .resolve()
        .unwrap();
        assert_eq!((c.seed, c.optim.epochs, c.optim.lr), (3, 2, 0.5));
        assert_eq!(c.eval.ks, vec![1, 5]);
        let c = parse(&[
            "train",
            "--loss-form",
            "softmax",
            "--label-smoothing",
            "0.1",
            "--no-nmi",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.loss.proxy_nca.form, ProxyNcaForm::Softmax);
        assert!(!c.eval.nmi);
        assert!(!c.cudnn_benchmark);
        let c = parse(&["train", "--cudnn-benchmark"]).resolve().unwrap();
        assert!(c.cudnn_benchmark);
        // It reaches the run's config.toml and reads back.
        let back: TrainConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert!(back.cudnn_benchmark);
        assert!(!c.cuda_graph);
        let c = parse(&["train", "--cuda-graph"]).resolve().unwrap();
        let back: TrainConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert!(c.cuda_graph && back.cuda_graph);
    }

    #[test]
    fn bad_options_are_rejected() {
        assert!(Cli::try_parse_from(["nofuss", "train", "--epoch", "3"]).is_err());
        assert!(Cli::try_parse_from(["nofuss", "train", "--loss-form", "nope"]).is_err());
        let e = parse(&["train", "--label-smoothing", "0.1"])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("softmax"), "{e}");
        assert!(parse(&["train", "--device", "tpu"]).resolve().is_err());
    }

    #[test]
    fn every_flag_is_documented() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let train = cmd.find_subcommand("train").unwrap();
        for a in train.get_arguments() {
            if a.get_id() != "help" {
                assert!(a.get_help().is_some(), "--{} has no help", a.get_id());
            }
        }
    }
}
