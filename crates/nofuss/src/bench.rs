//! `nofuss bench train-step`: images per second of whole training steps (forward,
//! Proxy-NCA, backward, both optimiser steps) on synthetic device-resident input,
//! for side-by-side comparison with `crates/nofuss/benches/torch_train_step.py`.

use std::time::Instant;

use candle_core::{DType, Tensor};
use nofuss_losses::Assignment;
use nofuss_tensor::{DeviceSpec, Precision};
use serde_json::{json, Value};

use crate::config::TrainConfig;
use crate::train::Model;
use crate::{Result, TrainError};

/// What to time.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainStepBench {
    /// Backbone name (`small-cnn`, `bn-inception`).
    pub backbone: String,
    /// Images per step.
    pub batch_size: usize,
    /// Input side; `None`: 224 for BN-Inception, the default data size otherwise.
    pub image_size: Option<usize>,
    /// Proxies (classes).
    pub classes: usize,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// Device string (`auto`, `cpu`, `cuda[:N]`).
    pub device: String,
    /// Backbone arithmetic.
    pub precision: Precision,
    /// Also time the phases of a step (forward with the loss, backward, optimiser
    /// steps) in separate steps that wait for the device after each phase: how long the
    /// host takes to queue each phase and how long until the device has finished it. A
    /// phase whose queueing takes about as long as its completion is bound by the host
    /// (launch overhead), not by the device.
    pub phases: bool,
    /// Choose cuDNN's convolution algorithms by timing them all (on the warm-up's first
    /// step) instead of taking its heuristic's pick (CUDA only).
    pub cudnn_benchmark: bool,
    /// Also run `steps` steps with per-operation timing ([`nofuss_tensor::profile`]) and
    /// report each operation's milliseconds per step, largest first.
    pub profile_ops: bool,
    /// Differentiate the backbone through candle's graph instead of nofuss's tape
    /// ([`nofuss_tensor::tape`]), to compare the two.
    pub graph_backward: bool,
    /// After the warm-up, capture one step into a CUDA graph ([`nofuss_tensor::graph`],
    /// the optimiser's per-step scalars on the device) and time `steps` replays of it,
    /// each followed by reading its loss, instead of eager steps. CUDA only.
    pub cuda_graph: bool,
    /// The loss, by its `train --loss` name (`proxy-nca` by default).
    pub loss: String,
    /// The proxy losses' assignment: static, or dynamic (nearest of `classes` proxies,
    /// picked on the device off the CPU).
    pub assignment: Assignment,
}

impl Default for TrainStepBench {
    fn default() -> Self {
        Self {
            backbone: "small-cnn".into(),
            batch_size: 64,
            image_size: None,
            classes: 124,
            steps: 20,
            warmup: 3,
            device: "auto".into(),
            precision: Precision::F32,
            phases: false,
            cudnn_benchmark: false,
            profile_ops: false,
            graph_backward: false,
            cuda_graph: false,
            loss: "proxy-nca".into(),
            assignment: Assignment::Static,
        }
    }
}

/// Runs the benchmark; returns one JSON object with the median milliseconds per step
/// and images per second.
pub fn train_step(b: &TrainStepBench) -> Result<Value> {
    if b.steps == 0 || b.batch_size < 2 || b.classes < 2 {
        return Err(TrainError::Config(
            "bench needs steps >= 1, batch size >= 2 and classes >= 2".into(),
        ));
    }
    if b.cuda_graph && (b.phases || b.profile_ops || b.warmup == 0) {
        return Err(TrainError::Config(
            "--cuda-graph times replays of a step captured after at least one warm-up \
             step; --phases and --profile-ops time eager steps (run them separately)"
                .into(),
        ));
    }
    let (cfg, description, dev, mut model, x) = setup(
        &b.backbone,
        b.image_size,
        b.batch_size,
        &b.device,
        b.classes,
        b.precision,
        b.cudnn_benchmark,
        (&b.loss, b.assignment),
    )?;
    model.embedder.set_tape(!b.graph_backward);
    if b.assignment == Assignment::Dynamic {
        proxies_on_batch(&model, &x)?;
    }
    let opt = model.optimizer(&cfg.optim)?;
    let size = cfg.data.image_size;
    let labels: Vec<u32> = (0..b.batch_size as u32)
        .map(|i| i % b.classes as u32)
        .collect();
    let y = Tensor::from_vec(labels, b.batch_size, &dev)?;
    let mut run = Steps {
        dev: &dev,
        model: &model,
        opt,
        x: &x,
        y: &y,
    };
    let mut times = Vec::with_capacity(b.steps);
    let eager = if b.cuda_graph { 0 } else { b.steps };
    for i in 0..eager + b.warmup {
        let t = Instant::now();
        run.step()?;
        if i >= b.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    if b.cuda_graph {
        times = run.replays(b.steps)?;
    }
    let med = median(times);
    let mut out = json!({
        "impl": "nofuss (candle 0.11.1)",
        "device": description,
        "backbone": b.backbone,
        "precision": b.precision.to_string(),
        "cudnn_algorithms": if b.cudnn_benchmark { "benchmark" } else { "heuristic" },
        "backward": if b.graph_backward { "candle graph" } else { "tape" },
        "cuda_graph": b.cuda_graph,
        "loss": b.loss,
        "assignment": if b.assignment == Assignment::Dynamic { "dynamic" } else { "static" },
        "layout_cache": nofuss_tensor::caches_layouts(&dev),
        "batch": b.batch_size,
        "image_size": size,
        "steps": b.steps,
        "median_ms": ms(med),
        "images_per_sec": (b.batch_size as f64 / med * 10.0).round() / 10.0,
    });
    if let Some(p) = nofuss_tensor::cuda_pool_stats(&dev) {
        // Whether the device kept freed memory between steps (allocations from a pool
        // that returned it at every synchronisation would wait for the driver).
        let mb = |b: u64| (b as f64 / 1e6).round();
        if let Some(o) = out.as_object_mut() {
            o.insert("pool_reserved_mb".into(), json!(mb(p.reserved_bytes)));
            o.insert("pool_used_mb".into(), json!(mb(p.used_bytes)));
            o.insert(
                "pool_keeps_freed_memory".into(),
                json!(p.release_threshold == u64::MAX),
            );
        }
    }
    if b.phases {
        let phases = time_phases(b, &mut run)?;
        if let (Some(o), Value::Object(p)) = (out.as_object_mut(), phases) {
            o.extend(p);
        }
    }
    if b.profile_ops {
        let ops = profile_ops(b, &mut run)?;
        if let (Some(o), Value::Object(p)) = (out.as_object_mut(), ops) {
            o.extend(p);
        }
    }
    Ok(out)
}

/// [`TrainStepBench::profile_ops`]: `steps` steps with per-operation timing on; the
/// median profiled step and each operation's milliseconds and calls per step.
fn profile_ops(b: &TrainStepBench, run: &mut Steps<'_>) -> Result<Value> {
    use nofuss_tensor::profile;
    profile::set_enabled(true);
    profile::take();
    let mut times = Vec::with_capacity(b.steps);
    let run = (0..b.steps).try_for_each(|_| -> Result<()> {
        let t = Instant::now();
        run.step()?;
        times.push(t.elapsed().as_secs_f64());
        Ok(())
    });
    profile::set_enabled(false);
    let ops = profile::take();
    run?;
    let per_step = b.steps as f64;
    let listed: f64 = ops.iter().map(|o| o.seconds).sum::<f64>() / per_step;
    let ops: Vec<Value> = ops
        .iter()
        .map(|o| {
            json!({
                "name": o.name,
                "ms": ms(o.seconds / per_step),
                "calls": (o.calls as f64 / per_step * 100.0).round() / 100.0,
            })
        })
        .collect();
    Ok(json!({
        "profiled_step_ms": ms(median(times)),
        "profiled_ops_ms": ms(listed),
        "ops": ops,
    }))
}

/// What the timed steps run: device, model, optimiser and the synthetic batch.
struct Steps<'a> {
    dev: &'a candle_core::Device,
    model: &'a Model,
    opt: nofuss_tensor::optim::Optimizer,
    x: &'a Tensor,
    y: &'a Tensor,
}

impl Steps<'_> {
    /// One training step as the trainer runs it (on rayon's pool on the CPU), ended by
    /// reading the loss, which waits for the device.
    fn step(&mut self) -> Result<()> {
        let (dev, model, opt, x, y) = (self.dev, self.model, &mut self.opt, self.x, self.y);
        nofuss_tensor::on_pool(dev, || -> Result<()> {
            // As the trainer runs a static proxy loss: candle's layout uploads cached.
            let loss = nofuss_tensor::with_cached_layouts(dev, || -> Result<Tensor> {
                let pass = model.embedder.forward_train(x)?;
                let loss = model.loss.loss(&pass.embeddings, y)?;
                let grads = pass.backward(&loss)?;
                opt.step(&grads)?;
                Ok(loss)
            })?;
            loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            Ok(())
        })
    }
}

impl Steps<'_> {
    /// [`TrainStepBench::cuda_graph`]: the step captured once (after the eager warm-up
    /// steps, which set up everything a capture cannot make), then `steps` timed replays,
    /// each followed by reading its loss as [`Steps::step`] does; the seconds of each.
    fn replays(&mut self, steps: usize) -> Result<Vec<f64>> {
        let (dev, model, x, y) = (self.dev, self.model, self.x, self.y);
        let opt = &mut self.opt;
        opt.use_device_scalars()?;
        let loss_out = Tensor::zeros(2, DType::F32, dev)?; // the step's report
        let read = |t: &Tensor, replay: usize| -> Result<f32> {
            let v = t.to_vec1::<f32>()?[0];
            if !v.is_finite() {
                let e = format!("replay {replay} of the captured step: loss {v}");
                return Err(nofuss_tensor::Error::Graph(e).into());
            }
            Ok(v)
        };
        opt.advance()?;
        let graph = crate::train::capture_step(model, opt, (x, y), &loss_out)?;
        // The capture ran nothing: the first replay is the step `advance` counted.
        graph.replay()?;
        read(&loss_out, 0)?;
        let mut times = Vec::with_capacity(steps);
        for i in 1..=steps {
            let t = Instant::now();
            opt.advance()?;
            graph.replay()?;
            read(&loss_out, i)?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(times)
    }
}

/// Milliseconds rounded to two decimals.
fn ms(seconds: f64) -> f64 {
    (seconds * 1e5).round() / 100.0
}

/// Runs `f` and waits for `dev`: its result, the seconds until `f` returned (the work is
/// queued) and until the device had finished it.
fn queued_and_done<T: Send>(
    dev: &candle_core::Device,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<(T, f64, f64)> {
    let t = Instant::now();
    let v = nofuss_tensor::on_pool(dev, || nofuss_tensor::with_cached_layouts(dev, f))?;
    let queued = t.elapsed().as_secs_f64();
    dev.synchronize()?;
    Ok((v, queued, t.elapsed().as_secs_f64()))
}

/// [`TrainStepBench::phases`]: `steps` more steps after `warmup` more, the device waited
/// for after each phase; per phase the median time to queue it (`{phase}_queue_ms`) and
/// to finish it (`{phase}_ms`).
fn time_phases(b: &TrainStepBench, run: &mut Steps<'_>) -> Result<Value> {
    const PHASES: [&str; 3] = ["forward", "backward", "optimizer"];
    let (dev, model, x, y) = (run.dev, run.model, run.x, run.y);
    let opt = &mut run.opt;
    let mut queued = vec![Vec::new(); 3];
    let mut done = vec![Vec::new(); 3];
    for i in 0..b.steps + b.warmup {
        let ((pass, loss), q0, d0) = queued_and_done(dev, || {
            let pass = model.embedder.forward_train(x)?;
            let loss = model.loss.loss(&pass.embeddings, y)?;
            Ok((pass, loss))
        })?;
        let (grads, q1, d1) = queued_and_done(dev, || Ok(pass.backward(&loss)?))?;
        let ((), q2, d2) = queued_and_done(dev, || {
            opt.step(&grads)?;
            Ok(())
        })?;
        loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if i >= b.warmup {
            for (k, (q, d)) in [(q0, d0), (q1, d1), (q2, d2)].into_iter().enumerate() {
                queued[k].push(q);
                done[k].push(d);
            }
        }
    }
    let mut m = serde_json::Map::new();
    for ((name, q), d) in PHASES.iter().zip(queued).zip(done) {
        m.insert(format!("{name}_queue_ms"), json!(ms(median(q))));
        m.insert(format!("{name}_ms"), json!(ms(median(d))));
    }
    Ok(Value::Object(m))
}

/// The configuration, device (with its description), a fresh model and a synthetic
/// device-resident input batch of a benchmark: BN-Inception at 224x224 RGB unless
/// `image_size` says otherwise; the loss by name, with its assignment.
#[allow(clippy::too_many_arguments)]
fn setup(
    backbone: &str,
    image_size: Option<usize>,
    batch_size: usize,
    device: &str,
    classes: usize,
    precision: Precision,
    cudnn_benchmark: bool,
    (loss, assignment): (&str, Assignment),
) -> Result<(TrainConfig, String, candle_core::Device, Model, Tensor)> {
    let mut cfg = TrainConfig {
        cudnn_benchmark,
        ..Default::default()
    };
    cfg.loss.name = loss.to_string();
    cfg.loss.proxy_nca.assignment = assignment;
    cfg.loss.proxy_triplet.assignment = assignment;
    cfg.model.backbone = backbone.to_string();
    if backbone == "bn-inception" {
        cfg.data.channels = 3;
        cfg.data.image_size = 224;
    }
    if let Some(s) = image_size {
        cfg.data.image_size = s;
    }
    cfg.optim.batch_size = batch_size.max(2);
    cfg.device = device.to_string();
    cfg.model.precision = precision;
    cfg.check()?;
    let picked = device.parse::<DeviceSpec>()?.select()?;
    let model = Model::new(&cfg, classes, &picked.device)?;
    let size = cfg.data.image_size;
    let x = Tensor::randn(
        0f32,
        1.0,
        (batch_size, cfg.data.channels, size, size),
        &picked.device,
    )?;
    Ok((cfg, picked.description, picked.device, model, x))
}

/// For dynamic assignment from a fresh model: an untrained network maps every synthetic
/// image to about the same point, so every example would share one nearest proxy and no
/// step have an anchor (on the CPU an error, elsewhere zero losses). Puts proxy `i` on
/// example `i`'s embedding (the first `min(N, P)`), so that each starts nearest its own.
fn proxies_on_batch(model: &Model, x: &Tensor) -> Result<()> {
    // Training mode, as the steps see them (batch statistics).
    let emb = model.embedder.forward_train(x)?.embeddings.detach();
    for (name, var) in model.proxy_params.named_vars() {
        if name == "proxies" {
            let rows = emb.dim(0)?.min(var.dim(0)?);
            var.slice_set(&emb.narrow(0, 0, rows)?.to_dtype(var.dtype())?, 0, 0)?;
        }
    }
    Ok(())
}

/// The median of `times` (not empty).
fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// What [`backbone`] times.
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneBench {
    /// Backbone name.
    pub backbone: String,
    /// Images per call.
    pub batch_size: usize,
    /// Input side; `None`: the backbone's nominal size (224 for BN-Inception).
    pub image_size: Option<usize>,
    /// Timed calls per mode.
    pub steps: usize,
    /// Untimed warm-up calls per mode.
    pub warmup: usize,
    /// Device string.
    pub device: String,
    /// Backbone arithmetic.
    pub precision: Precision,
}

/// Images per second of the backbone's pooled features: forward in evaluation mode
/// (`forward`), and forward in training mode plus the backward pass of their sum
/// (`forward_backward`, the backbone on its tape as in training); medians over `steps`
/// calls. One JSON object.
pub fn backbone(b: &BackboneBench) -> Result<Value> {
    if b.steps == 0 || b.batch_size == 0 {
        return Err(TrainError::Config(
            "bench needs steps >= 1 and a batch".into(),
        ));
    }
    let (cfg, description, dev, model, x) = setup(
        &b.backbone,
        b.image_size,
        b.batch_size,
        &b.device,
        2,
        b.precision,
        false,
        ("proxy-nca", Assignment::Static),
    )?;
    let size = cfg.data.image_size;
    let embedder = &model.embedder;
    let time = |train: bool| -> Result<f64> {
        let mut times = Vec::with_capacity(b.steps);
        for i in 0..b.steps + b.warmup {
            let t = Instant::now();
            nofuss_tensor::on_pool(&dev, || -> Result<()> {
                let f = nofuss_tensor::with_cached_layouts(&dev, || -> Result<Tensor> {
                    if train {
                        // As the trainer runs it: the backbone on its tape.
                        let pass = embedder.forward_train_features(&x)?;
                        let f = pass.embeddings.clone();
                        drop(pass.backward(&f.sum_all()?)?);
                        Ok(f)
                    } else {
                        Ok(embedder.forward_features(&x, false)?)
                    }
                })?;
                f.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                Ok(())
            })?;
            if i >= b.warmup {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(median(times))
    };
    let (fwd, fb) = (time(false)?, time(true)?);
    let ips = |t: f64| (b.batch_size as f64 / t * 10.0).round() / 10.0;
    Ok(json!({
        "impl": "nofuss (candle 0.11.1)",
        "device": description,
        "backbone": b.backbone,
        "precision": b.precision.to_string(),
        "batch": b.batch_size,
        "image_size": size,
        "steps": b.steps,
        "forward_images_per_sec": ips(fwd),
        "forward_backward_images_per_sec": ips(fb),
        "forward_ms": ms(fwd),
        "forward_backward_ms": ms(fb),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_runs_and_reports() {
        let v = train_step(&TrainStepBench {
            batch_size: 4,
            steps: 1,
            warmup: 0,
            device: "cpu".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(v["batch"], 4);
        assert!(v["images_per_sec"].as_f64().unwrap() > 0.0);
        assert!(v.get("forward_ms").is_none());
        assert_eq!(v["backward"], "tape");
        assert_eq!(
            v["layout_cache"], false,
            "candle caches layouts on CUDA only"
        );
        let v = train_step(&TrainStepBench {
            batch_size: 4,
            steps: 1,
            warmup: 0,
            device: "cpu".into(),
            graph_backward: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(v["backward"], "candle graph");
        // Dynamic assignment, both proxy losses: the proxies start on the batch, so the
        // steps have anchors (on the CPU a step without any is an error).
        for loss in ["proxy-nca", "proxy-triplet"] {
            let v = train_step(&TrainStepBench {
                batch_size: 8,
                steps: 2,
                warmup: 1,
                device: "cpu".into(),
                loss: loss.into(),
                assignment: Assignment::Dynamic,
                ..Default::default()
            })
            .unwrap();
            assert_eq!(
                (&v["loss"], &v["assignment"]),
                (&json!(loss), &json!("dynamic"))
            );
        }
        let v = train_step(&TrainStepBench {
            batch_size: 4,
            steps: 2,
            warmup: 1,
            device: "cpu".into(),
            phases: true,
            ..Default::default()
        })
        .unwrap();
        for phase in ["forward", "backward", "optimizer"] {
            let (q, d) = (
                v[format!("{phase}_queue_ms")].as_f64().unwrap(),
                v[format!("{phase}_ms")].as_f64().unwrap(),
            );
            // Queued no later than done; on the CPU the work is done when queued.
            assert!(d > 0.0 && q <= d, "{phase}: {q} {d}");
        }
        // Per-operation timing: on the CPU each of nofuss-tensor's operations by name,
        // once per call (a small-CNN step: 3 blocks, each a convolution, batch norm and
        // max pool forward and backward).
        let v = train_step(&TrainStepBench {
            batch_size: 4,
            steps: 2,
            warmup: 0,
            device: "cpu".into(),
            profile_ops: true,
            ..Default::default()
        })
        .unwrap();
        let step = v["profiled_step_ms"].as_f64().unwrap();
        let listed = v["profiled_ops_ms"].as_f64().unwrap();
        assert!(step > 0.0 && listed > 0.0 && listed <= step * 1.01, "{v}");
        let ops = v["ops"].as_array().unwrap();
        let calls = |name: &str| {
            ops.iter()
                .find(|o| o["name"] == name)
                .map(|o| o["calls"].as_f64().unwrap())
        };
        assert_eq!(calls("nofuss-batch-norm-stats"), Some(3.0), "{v}");
        assert_eq!(calls("nofuss-max-pool2d"), Some(3.0), "{v}");
        let ms: Vec<f64> = ops.iter().map(|o| o["ms"].as_f64().unwrap()).collect();
        assert!(ms.windows(2).all(|w| w[0] >= w[1]), "largest first: {ms:?}");
        assert!(!nofuss_tensor::profile::enabled());
        let v = backbone(&BackboneBench {
            backbone: "small-cnn".into(),
            batch_size: 2,
            image_size: None,
            steps: 1,
            warmup: 0,
            device: "cpu".into(),
            precision: Precision::F32,
        })
        .unwrap();
        assert!(v["forward_backward_images_per_sec"].as_f64().unwrap() > 0.0);
        assert!(train_step(&TrainStepBench {
            steps: 0,
            ..Default::default()
        })
        .is_err());
        // Replays of a captured step: a CUDA graph needs a CUDA device, and eager phases or
        // profiles do not mix with it.
        let graph = |phases| {
            train_step(&TrainStepBench {
                batch_size: 4,
                steps: 1,
                warmup: 1,
                device: "cpu".into(),
                cuda_graph: true,
                phases,
                ..Default::default()
            })
            .unwrap_err()
            .to_string()
        };
        assert!(
            graph(false).contains("CUDA graphs need a CUDA device"),
            "{}",
            graph(false)
        );
        assert!(graph(true).contains("--phases"), "{}", graph(true));
    }
}
