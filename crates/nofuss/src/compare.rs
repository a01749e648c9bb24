//! `nofuss compare`: the paper's convergence experiment (its Figure 1). The same
//! backbone, data, seed and budget are trained with each loss; Recall@1 on the unseen
//! classes is logged against training steps and training time, drawn into one PNG, and
//! summarised as "steps to reach the baseline's best Recall@1".

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::config::TrainConfig;
use crate::plot::{plot_panels, Curve, Panel};
use crate::train::{train, TrainOptions};
use crate::{run_dir, Result, TrainError};

/// One loss's curve: `(steps, training seconds, Recall@1)` per evaluation (step 0 is
/// the untrained network), or why the run stopped early.
#[derive(Debug, Clone)]
pub struct LossCurve {
    /// The loss name.
    pub loss: String,
    /// Evaluation points.
    pub points: Vec<(usize, f64, f64)>,
    /// The run directory.
    pub run_dir: PathBuf,
    /// The error that stopped the run, if any (its finished epochs are kept).
    pub stopped: Option<String>,
    /// Whether its steps were replayed from a CUDA graph (`cuda_graph`). With
    /// `cuda_graph` on, a loss that picks from each batch on the host runs eagerly.
    pub cuda_graph: bool,
}

impl LossCurve {
    /// The best Recall@1 and the first step count that reached it.
    pub fn best(&self) -> Option<(f64, usize)> {
        let mut best: Option<(f64, usize)> = None;
        for &(s, _, r) in &self.points {
            if best.is_none_or(|(b, _)| r > b) {
                best = Some((r, s));
            }
        }
        best
    }

    /// The first step count at which Recall@1 reached `target`.
    pub fn steps_to(&self, target: f64) -> Option<usize> {
        self.points
            .iter()
            .find(|&&(_, _, r)| r >= target)
            .map(|&(s, _, _)| s)
    }
}

/// What `compare` produced.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// One curve per loss, in the order given.
    pub curves: Vec<LossCurve>,
    /// The folder holding the runs, `compare.png` and `compare.md`.
    pub dir: PathBuf,
    /// The Markdown report (also in `compare.md`).
    pub report: String,
}

/// Trains `base` once per loss in `losses` (each run in `<out_dir>/<name>/<loss>`) and
/// compares them. A loss whose run stops early (a non-finite loss, nothing to learn) is
/// reported with the epochs it finished; the other losses still run. With `cuda_graph`
/// on, the losses a replayed step cannot run (those that pick from each batch on the
/// host: the triplet and NCA baselines, dynamic assignment, more than 4,096 hardest negatives) run
/// eagerly, and the report says so beside their times.
pub fn compare(base: &TrainConfig, losses: &[String], opts: &TrainOptions) -> Result<Comparison> {
    if losses.is_empty() {
        return Err(TrainError::Config("compare needs at least one loss".into()));
    }
    let name = base
        .run
        .name
        .clone()
        .unwrap_or_else(|| format!("compare-{}", run_dir::utc_stamp()));
    let dir = base.run.out_dir.join(&name);
    // Every loss's settings and run directory are checked before the first trains.
    let mut configs = Vec::with_capacity(losses.len());
    for (i, loss) in losses.iter().enumerate() {
        if losses[..i].contains(loss) {
            return Err(TrainError::Config(format!(
                "loss '{loss}' is listed twice in --losses"
            )));
        }
        configs.push(run_config(base, loss, &dir)?);
        run_dir::check_free(&dir.join(loss))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let mut curves = Vec::new();
    for (loss, cfg) in losses.iter().zip(configs) {
        if opts.verbose {
            println!("== {loss} ==");
        }
        let run = dir.join(loss);
        let stopped = match train(&cfg, opts) {
            Ok(_) => None,
            Err(e @ (TrainError::NonFinite { .. } | TrainError::NothingToLearn { .. })) => {
                Some(e.to_string())
            }
            Err(e) => return Err(e),
        };
        let points = read_points(&run)?;
        curves.push(LossCurve {
            loss: loss.clone(),
            points,
            run_dir: run,
            stopped,
            cuda_graph: cfg.cuda_graph,
        });
    }
    let report = report(&curves, base);
    run_dir::write_atomic(&dir.join("compare.md"), report.as_bytes())?;
    draw(&dir, &curves)?;
    Ok(Comparison {
        curves,
        dir,
        report,
    })
}

/// The configuration of `loss`'s run in `dir`: `base` with that loss, checked. Under
/// `cuda_graph` a loss that picks on the host, or reseeds unused proxies, runs eagerly
/// instead of being refused.
fn run_config(base: &TrainConfig, loss: &str, dir: &std::path::Path) -> Result<TrainConfig> {
    let mut cfg = base.clone();
    cfg.loss.name = loss.to_string();
    cfg.run.out_dir = dir.to_path_buf();
    cfg.run.name = Some(loss.to_string());
    if cfg.cuda_graph && (cfg.loss.spec()?.selects_on_host() || cfg.loss.reseed_unused_after > 0) {
        cfg.cuda_graph = false;
    }
    cfg.check()?;
    Ok(cfg)
}

/// `(steps, training seconds, Recall@1)` per evaluation of a run, from its
/// `metrics.jsonl` (complete, or up to where the run stopped).
fn read_points(run: &std::path::Path) -> Result<Vec<(usize, f64, f64)>> {
    let path = run.join(run_dir::METRICS);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            (
                v["steps"].as_u64().unwrap_or(0) as usize,
                v["train_seconds"].as_f64().unwrap_or(0.0),
                v["recall@1"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect())
}

fn draw(dir: &std::path::Path, curves: &[LossCurve]) -> Result<()> {
    // One point list per loss, x chosen by `x`.
    let series = |x: fn(&(usize, f64, f64)) -> f64| -> Vec<Vec<(f64, f64)>> {
        curves
            .iter()
            .map(|c| c.points.iter().map(|p| (x(p), p.2)).collect())
            .collect()
    };
    let (by_steps, by_time) = (series(|p| p.0 as f64), series(|p| p.1));
    let (steps, time) = (labelled(curves, &by_steps), labelled(curves, &by_time));
    plot_panels(
        &dir.join("compare.png"),
        &[
            Panel {
                title: "Recall@1 (unseen classes) vs steps",
                x_label: "training steps",
                curves: &steps,
            },
            Panel {
                title: "Recall@1 (unseen classes) vs time",
                x_label: "training seconds",
                curves: &time,
            },
        ],
    )
}

/// Curves labelled with their loss names.
fn labelled<'a>(curves: &'a [LossCurve], points: &'a [Vec<(f64, f64)>]) -> Vec<Curve<'a>> {
    curves
        .iter()
        .zip(points)
        .map(|(c, p)| Curve {
            label: &c.loss,
            points: p,
        })
        .collect()
}

/// The baseline of the "3x fewer steps" claim: the semi-hard triplet loss if it ran,
/// else the batch-all triplet loss.
fn baseline(curves: &[LossCurve]) -> Option<&LossCurve> {
    curves
        .iter()
        .find(|c| c.loss == "triplet-semihard")
        .or_else(|| curves.iter().find(|c| c.loss == "triplet"))
}

/// The report's note on a loss run eagerly while the others replay CUDA graphs.
const EAGER_NOTE: &str =
    "run eagerly (it picks from each batch on the host, or reseeds proxies from it, which a \
     replayed CUDA graph cannot): its training seconds include the per-step host work the \
     replayed runs skip";

fn report(curves: &[LossCurve], cfg: &TrainConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Backbone {}, batch {}, {} epochs, seed {}, dataset {:?}.\n",
        cfg.model.backbone, cfg.optim.batch_size, cfg.optim.epochs, cfg.seed, cfg.data.dataset
    );
    let base = baseline(curves).and_then(|b| b.best().map(|(r, st)| (b.loss.clone(), r, st)));
    let _ = writeln!(
        s,
        "| loss | Recall@1 untrained | best Recall@1 | at step | steps to the baseline's best | training s | note |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    for c in curves {
        let first = c.points.first().map(|p| p.2).unwrap_or(f64::NAN);
        let (best, at) = c.best().unwrap_or((f64::NAN, 0));
        let to_base = match &base {
            Some((_, r, _)) => c
                .steps_to(*r)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "not reached".into()),
            None => "-".into(),
        };
        let secs = c.points.last().map(|p| p.1).unwrap_or(0.0);
        let mut note = c
            .stopped
            .as_deref()
            .map(|e| e.split(';').next().unwrap_or(e).to_string())
            .unwrap_or_default();
        if cfg.cuda_graph && !c.cuda_graph {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(EAGER_NOTE);
        }
        let _ = writeln!(
            s,
            "| {} | {first:.4} | {best:.4} | {at} | {to_base} | {secs:.1} | {note} |",
            c.loss
        );
    }
    if let Some((name, r, steps)) = &base {
        let _ = writeln!(
            s,
            "\nBaseline: {name}, best Recall@1 {r:.4} first reached at step {steps}."
        );
        if let Some(p) = curves.iter().find(|c| c.loss == "proxy-nca") {
            match p.steps_to(*r) {
                Some(ps) if ps > 0 => {
                    let ratio = *steps as f64 / ps as f64;
                    let _ = writeln!(
                        s,
                        "Proxy-NCA reached it at step {ps}: {ratio:.1}x fewer steps ({}).",
                        if ratio >= 3.0 {
                            "the paper's claim of about 3x holds here"
                        } else {
                            "less than the paper's 3x"
                        }
                    );
                }
                Some(_) => {
                    let _ = writeln!(s, "Proxy-NCA matched it before training (step 0).");
                }
                None => {
                    let _ = writeln!(s, "Proxy-NCA did not reach it within the budget.");
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(loss: &str, r: &[f64]) -> LossCurve {
        LossCurve {
            loss: loss.into(),
            points: r
                .iter()
                .enumerate()
                .map(|(i, &v)| (i * 10, i as f64, v))
                .collect(),
            run_dir: PathBuf::new(),
            stopped: None,
            cuda_graph: false,
        }
    }

    #[test]
    fn every_loss_is_checked_before_the_first_trains() {
        let tmp = tempfile::tempdir().unwrap();
        let mut base = TrainConfig::default();
        base.run.out_dir = tmp.path().to_path_buf();
        base.run.name = Some("c".into());
        let quiet = TrainOptions::default();
        let losses = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let twice = compare(&base, &losses(&["nca", "proxy-nca", "nca"]), &quiet);
        let e = twice.err().unwrap().to_string();
        assert!(e.contains("'nca' is listed twice"), "{e}");
        let unknown = compare(&base, &losses(&["proxy-nca", "nonsense"]), &quiet);
        let e = unknown.err().unwrap().to_string();
        assert!(e.contains("unknown loss 'nonsense'"), "{e}");
        // A finished run of a later loss is refused before the earlier one trains.
        let nca = tmp.path().join("c/nca");
        std::fs::create_dir_all(&nca).unwrap();
        std::fs::write(nca.join(run_dir::METRICS), "{\"epoch\":1}\n").unwrap();
        let taken = compare(&base, &losses(&["proxy-nca", "nca"]), &quiet);
        assert!(matches!(
            taken,
            Err(TrainError::RunExists { epochs: 1, .. })
        ));
        assert!(!tmp.path().join("c/proxy-nca").exists());
    }

    #[test]
    fn under_cuda_graph_losses_that_pick_on_the_host_run_eagerly_and_say_so() {
        let base = TrainConfig {
            cuda_graph: true,
            ..TrainConfig::default()
        };
        let dir = std::path::Path::new("runs/x");
        let proxy = run_config(&base, "proxy-nca", dir).unwrap();
        assert!(proxy.cuda_graph);
        assert_eq!(proxy.run.name.as_deref(), Some("proxy-nca"));
        for loss in ["triplet", "triplet-semihard", "nca"] {
            let c = run_config(&base, loss, dir).unwrap();
            assert!(!c.cuda_graph, "{loss}");
        }
        // The configuration is still checked.
        let mut bad = base.clone();
        bad.device = "nonsense".into();
        assert!(run_config(&bad, "proxy-nca", dir).is_err());

        let mut curves = vec![
            curve("proxy-nca", &[0.2, 0.6]),
            curve("triplet", &[0.2, 0.5]),
        ];
        curves[0].cuda_graph = true;
        let r = report(&curves, &base);
        let row = |loss: &str| {
            r.lines()
                .find(|l| l.starts_with(&format!("| {loss} |")))
                .unwrap()
                .to_string()
        };
        assert!(row("triplet").contains("run eagerly"), "{r}");
        assert!(!row("proxy-nca").contains("run eagerly"), "{r}");
        // Without cuda_graph nothing is said.
        assert!(!report(&curves, &TrainConfig::default()).contains("run eagerly"));
    }

    #[test]
    fn steps_to_the_baseline_and_the_verdict() {
        let curves = vec![
            curve("proxy-nca", &[0.2, 0.6, 0.8, 0.9]),
            curve("triplet-semihard", &[0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.6]),
        ];
        assert_eq!(curves[1].best(), Some((0.6, 50)));
        assert_eq!(curves[0].steps_to(0.6), Some(10));
        let r = report(&curves, &TrainConfig::default());
        assert!(r.contains("first reached at step 50"), "{r}");
        assert!(r.contains("5.0x fewer steps"), "{r}");
        assert!(r.contains("claim of about 3x holds"), "{r}");
        let slow = vec![
            curve("proxy-nca", &[0.1, 0.2]),
            curve("triplet", &[0.1, 0.5]),
        ];
        assert!(report(&slow, &TrainConfig::default()).contains("did not reach it"));
    }
}
