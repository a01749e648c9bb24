//! The configuration of a training run: defaults, a TOML file, and command-line
//! overrides, in that order of precedence (flags win).

use std::path::{Path, PathBuf};

use nofuss_backbone::{BnInceptionConfig, HeadConfig, SmallCnnConfig};
use nofuss_data::glyphs::GlyphConfig;
use nofuss_eval::EvalConfig;
use nofuss_losses::{
    Assignment, LossSpec, NcaConfig, ProxyInit, ProxyNcaConfig, ProxyTripletConfig, TripletConfig,
    TripletMining,
};
use serde::{Deserialize, Serialize};

use nofuss_tensor::optim::{OptimizerKind, Schedule};
use nofuss_tensor::Precision;

use crate::{Result, TrainError};

/// Which dataset to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// The embedded default: glyphs generated offline into `data.dir` if absent.
    #[default]
    Glyphs,
    /// Any dataset in the CUB-200-2011 layout (CUB itself, or your own); first half of
    /// the classes for training.
    Cub,
    /// Cars196 (`cars_annos.mat`, `car_ims/`): classes 1-98 for training, 99-196 for testing.
    Cars,
    /// Stanford Online Products (`Ebay_train.txt`, `Ebay_test.txt`): the files' split.
    Sop,
    /// A folder per class (`root/<class>/<image>`); first half of the classes (in name
    /// order) for training.
    Folder,
}

/// How images reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PipelineKind {
    /// Decoded once into memory, resized to `image_size` (small images: the glyphs).
    #[default]
    Memory,
    /// Streamed from disk: RandomResizedCrop to `image_size` and flips for training,
    /// resize + center crop for evaluation, decoded in parallel ahead of the model.
    Photo,
}

/// Data settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset kind.
    pub dataset: DatasetKind,
    /// Dataset root (generated there for `glyphs`).
    pub dir: PathBuf,
    /// Images are resized to `image_size` x `image_size`.
    pub image_size: usize,
    /// 1 (grayscale) or 3 (RGB; grayscale images such as the glyphs are replicated).
    pub channels: usize,
    /// Random translation at training time, in pixels.
    pub max_shift: usize,
    /// Random horizontal flips at training time.
    pub hflip: bool,
    /// Hold out the last N training classes for validation (0: none). The epoch with the
    /// best validation Recall@K (first K) is the one reported; test classes are never used
    /// for that choice.
    pub val_classes: usize,
    /// How images reach the model.
    pub pipeline: PipelineKind,
    /// Class-balanced training batches of this many images per class (photo pipeline).
    pub m_per_class: Option<usize>,
    /// Crop inside the dataset's bounding boxes (CUB-200-2011, Cars196; photo pipeline).
    pub crop_to_boxes: bool,
    /// Leave out images that cannot be read or decoded (counted and listed) instead of
    /// stopping with an error naming the first one.
    pub skip_bad_images: bool,
    /// How the glyph dataset is generated.
    pub glyphs: GlyphConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::Glyphs,
            dir: PathBuf::from("data/glyphs"),
            image_size: 32,
            channels: 1,
            max_shift: 2,
            hflip: false,
            skip_bad_images: false,
            val_classes: 0,
            pipeline: PipelineKind::Memory,
            m_per_class: None,
            crop_to_boxes: false,
            glyphs: GlyphConfig::default(),
        }
    }
}

/// Model settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Backbone name: `small-cnn` or `bn-inception`.
    pub backbone: String,
    /// Backbone weights to start from (`.pth` or `.safetensors`, tensor names as the
    /// backbone's, e.g. the public `bn_inception-52deb4733.pth`); none: fresh weights.
    pub weights: Option<PathBuf>,
    /// Small CNN settings (`in_channels` and `input_size` follow the data settings).
    pub small_cnn: SmallCnnConfig,
    /// BN-Inception settings.
    pub bn_inception: BnInceptionConfig,
    /// Embedding head.
    pub head: HeadConfig,
    /// Backbone arithmetic: `f32`, or `bf16` (mixed precision: parameters, batch-norm
    /// statistics, embeddings, proxies and the loss stay f32).
    pub precision: Precision,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            backbone: "small-cnn".into(),
            weights: None,
            small_cnn: SmallCnnConfig::default(),
            bn_inception: BnInceptionConfig::default(),
            head: HeadConfig::default(),
            precision: Precision::F32,
        }
    }
}

/// Loss settings: the loss `name` picks which of the sections below applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// `proxy-nca`, `proxy-triplet`, `triplet` (all in-batch triplets),
    /// `triplet-semihard` (FaceNet's semi-hard negatives) or `nca` (in-batch NCA).
    pub name: String,
    /// Proxy initialisation.
    pub proxy_init: ProxyInit,
    /// Number of proxies of the proxy losses; none: one per training class. With
    /// dynamic assignment (`assignment = "dynamic"` in the loss section) any number works,
    /// e.g. half the classes; static assignment needs one per class.
    pub num_proxies: Option<usize>,
    /// Dynamic assignment: move a proxy that no example was assigned to for this many
    /// steps onto an example's embedding (0: never, the paper's method). See
    /// `nofuss_losses::ProxyReseeder`.
    pub reseed_unused_after: u64,
    /// Proxy-NCA settings.
    pub proxy_nca: ProxyNcaConfig,
    /// Proxy-Triplet settings.
    pub proxy_triplet: ProxyTripletConfig,
    /// Triplet settings (`mining` follows the loss name).
    pub triplet: TripletConfig,
    /// In-batch NCA settings.
    pub nca: NcaConfig,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            name: "proxy-nca".into(),
            proxy_init: ProxyInit::Normal,
            num_proxies: None,
            reseed_unused_after: 0,
            proxy_nca: ProxyNcaConfig::default(),
            proxy_triplet: ProxyTripletConfig::default(),
            triplet: TripletConfig::default(),
            nca: NcaConfig::default(),
        }
    }
}

impl LossConfig {
    /// The loss named by `name` with its section's settings.
    pub fn spec(&self) -> Result<LossSpec> {
        Ok(match self.name.as_str() {
            "proxy-nca" => LossSpec::ProxyNca(self.proxy_nca),
            "proxy-triplet" => LossSpec::ProxyTriplet(self.proxy_triplet),
            "triplet" => LossSpec::Triplet(TripletConfig {
                mining: TripletMining::All,
                ..self.triplet
            }),
            "triplet-semihard" => LossSpec::Triplet(TripletConfig {
                mining: TripletMining::SemiHard,
                ..self.triplet
            }),
            "nca" => LossSpec::Nca(self.nca),
            other => {
                return Err(TrainError::Config(format!(
                    "unknown loss '{other}': available: {}",
                    LossSpec::NAMES
                )))
            }
        })
    }

    /// The number of proxies for `classes` training classes (checked against the
    /// assignment).
    pub fn proxies_for(&self, classes: usize) -> Result<usize> {
        let spec = self.spec()?;
        match (self.num_proxies, spec.assignment()) {
            (None, _) => Ok(classes),
            (Some(n), Assignment::Dynamic) => Ok(n),
            (Some(n), Assignment::Static) if n == classes || !spec.uses_proxies() => Ok(n),
            (Some(n), Assignment::Static) => Err(TrainError::Config(format!(
                "num_proxies = {n} differs from the {classes} training classes: static \
                 assignment needs one proxy per class (set assignment = \"dynamic\")"
            ))),
        }
    }
}

/// Optimisation settings (Adam; the paper's RMSprop recipe comes with its own issue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Training epochs.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Learning rate of the backbone and the head.
    pub lr: f64,
    /// Learning rate of the proxies (their own optimiser).
    pub proxy_lr: f64,
    /// Weight decay of the backbone and head (decoupled for AdamW, L2 otherwise); none
    /// on proxies.
    pub weight_decay: f64,
    /// The update rule and its settings (PyTorch's rules; see `nofuss_tensor::optim`).
    pub optimizer: OptimizerKind,
    /// Learning rate of the embedding head as a multiple of `lr`.
    pub head_lr_scale: f64,
    /// How the learning rates change from epoch to epoch.
    pub schedule: Schedule,
    /// Linear warm-up over the first steps (0: none).
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this value before each step.
    pub clip_norm: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            epochs: 6,
            batch_size: 64,
            lr: 3e-3,
            proxy_lr: 3e-2,
            weight_decay: 0.0,
            optimizer: OptimizerKind::adamw(),
            head_lr_scale: 1.0,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            clip_norm: None,
        }
    }
}

/// Where results go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Parent of run directories.
    pub out_dir: PathBuf,
    /// Run name (a fresh timestamped name when absent).
    pub name: Option<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs"),
            name: None,
        }
    }
}

/// Everything a training run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of parameters, proxies, shuffling, augmentation and k-means.
    pub seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// On CUDA, choose each convolution shape's cuDNN algorithm by timing them all once
    /// (PyTorch's `cudnn.benchmark`) instead of taking cuDNN's heuristic pick.
    pub cudnn_benchmark: bool,
    /// On CUDA, capture the training step into a CUDA graph after the run's first step
    /// and replay it for every full batch: one launch per step instead of a few thousand
    /// (`nofuss_tensor::graph`). Proxy losses only (no selection on the host; dynamic
    /// assignment picks on the device), without reseeding; gradient clipping replays too
    /// (its scale comes from the norm on the device).
    pub cuda_graph: bool,
    /// Data.
    pub data: DataConfig,
    /// Model.
    pub model: ModelConfig,
    /// Loss.
    pub loss: LossConfig,
    /// Optimisation.
    pub optim: OptimConfig,
    /// Evaluation on the unseen classes.
    pub eval: EvalConfig,
    /// Output.
    pub run: RunConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            device: "auto".into(),
            cudnn_benchmark: false,
            cuda_graph: false,
            data: DataConfig::default(),
            model: ModelConfig::default(),
            loss: LossConfig::default(),
            optim: OptimConfig::default(),
            eval: EvalConfig::default(),
            run: RunConfig::default(),
        }
    }
}

/// The presets shipped with nofuss (`crates/nofuss/presets/*.toml`): name and TOML.
pub const PRESETS: &[(&str, &str)] = &[
    ("cub", include_str!("../presets/cub.toml")),
    ("cars", include_str!("../presets/cars.toml")),
    ("sop", include_str!("../presets/sop.toml")),
    ("cub-repro", include_str!("../presets/cub-repro.toml")),
    ("cars-repro", include_str!("../presets/cars-repro.toml")),
    ("sop-repro", include_str!("../presets/sop-repro.toml")),
];

impl TrainConfig {
    /// The preset called `name` (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        let (_, text) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            TrainError::Config(format!(
                "unknown preset '{name}': {}",
                PRESETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        toml::from_str(text).map_err(|e| TrainError::Config(format!("preset {name}: {e}")))
    }

    /// Reads a TOML file; missing keys take their defaults, unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| TrainError::Config(e.to_string()))
    }

    /// Checks values and cross-section consistency.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        self.device.parse::<nofuss_tensor::DeviceSpec>()?;
        if self.loss.reseed_unused_after > 0
            && self.loss.spec()?.assignment() != nofuss_losses::Assignment::Dynamic
        {
            return bad(
                "reseeding unused proxies applies to dynamic assignment (--assignment dynamic)"
                    .into(),
            );
        }
        if self.cuda_graph {
            let spec = self.loss.spec()?;
            if spec.selects_on_host() {
                return bad(format!(
                    "cuda_graph replays a captured step, which cannot read the batch on the \
                     host as {} with these settings does (more than 4,096 hardest \
                     negatives and the in-batch baselines pick on the host); use a proxy \
                     loss or turn cuda_graph off",
                    spec.name()
                ));
            }
            if self.loss.reseed_unused_after > 0 {
                return bad(
                    "cuda_graph replays a captured step, and reseeding unused proxies reads \
                     each batch's assignments on the host between steps; turn one of them \
                     off (reseed_unused_after = 0, or cuda_graph = false)"
                        .into(),
                );
            }
        }
        if self.loss.proxy_triplet.hardest_negatives.is_some() && self.loss.name != "proxy-triplet"
        {
            return bad(format!(
                "hardest_negatives applies to proxy-triplet (--loss proxy-triplet), not {}",
                self.loss.name
            ));
        }
        match self.model.backbone.as_str() {
            "small-cnn" => {}
            "bn-inception" => {
                if self.data.channels != 3 {
                    return bad(format!(
                        "bn-inception takes 3-channel images, but data.channels is {}",
                        self.data.channels
                    ));
                }
                if nofuss_backbone::bn_inception_feature_len(self.data.image_size).is_none() {
                    return bad(format!(
                        "bn-inception cannot take {0}x{0} images (its stride-2 branches \
                         disagree in size); use e.g. 224, 227 or a multiple of 32",
                        self.data.image_size
                    ));
                }
            }
            other => {
                return bad(format!(
                    "unknown backbone '{other}': available: small-cnn, bn-inception"
                ))
            }
        }
        if let Some(w) = &self.model.weights {
            if !w.is_file() {
                return bad(format!(
                    "weights file {} does not exist (the BN-Inception ImageNet weights: cargo xtask fetch-weights bn-inception)",
                    w.display()
                ));
            }
        }
        match self.loss.spec()? {
            LossSpec::ProxyNca(c) => c.check()?,
            LossSpec::ProxyTriplet(c) => c.check()?,
            _ => {}
        }
        if self.loss.num_proxies.is_some_and(|n| n < 2) {
            return bad("num_proxies must be at least 2".into());
        }
        let o = &self.optim;
        if o.batch_size < 2 {
            return bad(format!(
                "batch_size must be at least 2 (batch normalisation), got {}",
                o.batch_size
            ));
        }
        for (name, v) in [("lr", o.lr), ("proxy_lr", o.proxy_lr)] {
            if !(v > 0.0 && v.is_finite()) {
                return bad(format!("{name} must be a positive number, got {v}"));
            }
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return bad(format!("weight_decay must be >= 0, got {}", o.weight_decay));
        }
        if !matches!(self.data.channels, 1 | 3) {
            return bad(format!(
                "channels must be 1 or 3, got {}",
                self.data.channels
            ));
        }
        if self.eval.ks.is_empty() || self.eval.ks.contains(&0) {
            return bad(format!(
                "eval.ks must be a non-empty list of K >= 1, got {:?}",
                self.eval.ks
            ));
        }
        if let Some(name) = &self.run.name {
            if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
                return bad(format!("run name '{name}' must be a plain folder name"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_checks_and_says_where_it_comes_from() {
        for (name, text) in PRESETS {
            let mut c = TrainConfig::preset(name).unwrap();
            // Without the downloaded weights the check says how to get them.
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains("cargo xtask fetch-weights bn-inception"), "{e}");
            c.model.weights = None;
            c.check().unwrap();
            assert_eq!(c.model.backbone, "bn-inception", "{name}");
            assert_eq!(c.optim.batch_size, 32, "{name}");
            assert_eq!(c.model.head.dim, 64, "{name}");
            assert_eq!(c.data.pipeline, PipelineKind::Photo, "{name}");
            assert!(text.contains("cargo run --release -p nofuss -- train --preset"));
            if name.ends_with("-repro") {
                assert!(text.contains("github.com/dichotomies/proxy-nca"), "{name}");
                assert_eq!(c.loss.proxy_nca.label_smoothing, 0.1);
            } else {
                assert!(text.contains("Movshovitz-Attias"), "{name}");
                assert!(matches!(
                    c.optim.optimizer,
                    nofuss_tensor::optim::OptimizerKind::RmsProp { tf_style: true, .. }
                ));
            }
        }
        assert!(TrainConfig::preset("imagenet").is_err());
    }

    #[test]
    fn cuda_graph_refuses_what_a_replayed_step_cannot_do() {
        let with = |f: &dyn Fn(&mut TrainConfig)| {
            let mut c = TrainConfig {
                cuda_graph: true,
                ..Default::default()
            };
            f(&mut c);
            c.check()
        };
        with(&|_| {}).unwrap(); // static Proxy-NCA
        with(&|c| c.loss.name = "proxy-triplet".into()).unwrap();
        // Clipping, on the GPU from the norm on the device, replays too, and so do the
        // k hardest static negatives (picked on the device).
        with(&|c| c.optim.clip_norm = Some(1.0)).unwrap();
        with(&|c| {
            c.loss.name = "proxy-triplet".into();
            c.loss.proxy_triplet.hardest_negatives = Some(3);
        })
        .unwrap();
        // Dynamic assignment picks on the device.
        let dynamic = |c: &mut TrainConfig| {
            c.loss.proxy_nca.assignment = nofuss_losses::Assignment::Dynamic;
        };
        with(&dynamic).unwrap();
        for (what, f) in [
            (
                "reseeding",
                &(|c: &mut TrainConfig| {
                    dynamic(c);
                    c.loss.reseed_unused_after = 10;
                }) as &dyn Fn(&mut TrainConfig),
            ),
            ("hardest", &|c: &mut TrainConfig| {
                c.loss.name = "proxy-triplet".into();
                c.loss.proxy_triplet.hardest_negatives = Some(5000);
            }),
            ("triplet", &|c: &mut TrainConfig| {
                c.loss.name = "triplet".into()
            }),
            ("nca", &|c: &mut TrainConfig| c.loss.name = "nca".into()),
        ] {
            let e = with(f).unwrap_err().to_string();
            assert!(e.contains("cuda_graph"), "{what}: {e}");
        }
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = TrainConfig::default();
        let again: TrainConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again, c);
        c.check().unwrap();
    }

    #[test]
    fn partial_files_and_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "seed = 5\n[optim]\nepochs = 2\n").unwrap();
        let c = TrainConfig::from_file(&p).unwrap();
        assert_eq!((c.seed, c.optim.epochs, c.optim.batch_size), (5, 2, 64));
        std::fs::write(&p, "[optim]\nepoch = 2\n").unwrap();
        let e = TrainConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("c.toml") && e.contains("epoch") && e.contains("line 2"),
            "{e}"
        );
        let e = TrainConfig::from_file(&d.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }

    #[test]
    fn invalid_values() {
        let base = TrainConfig::default;
        let mut c = base();
        c.optim.batch_size = 1;
        assert!(c.check().is_err());
        let c = TrainConfig {
            device: "tpu".into(),
            ..base()
        };
        assert!(c.check().unwrap_err().to_string().contains("tpu"));
        let mut c = base();
        c.run.name = Some("../x".into());
        assert!(c.check().is_err());
        let mut c = base();
        c.optim.lr = f64::NAN;
        assert!(c.check().is_err());
        let mut c = base();
        c.model.backbone = "resnet".into();
        assert!(c.check().unwrap_err().to_string().contains("small-cnn"));
    }
}
