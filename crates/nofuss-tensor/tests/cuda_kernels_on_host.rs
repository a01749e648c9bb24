//! The CUDA kernels of `kernels/*.cu`, compiled as plain C++ with `kernels/host_emulation.h`
//! (a block's threads as real threads meeting at `__syncthreads`) by
//! `tests/reference/kernels_on_host/harness.cpp`, against this crate's CPU operations, which
//! the PyTorch parity tests check: pooling, batch norm + ReLU (statistics, backward,
//! running statistics), the fused NCA rows, fused Adam steps, the scaled row normalisation
//! and the squared distances, in f32 and f64, and the row selection of kNN searches. So the GPU
//! kernels' arithmetic, indexing and reductions are tested on every CI run, without a GPU.
//! Needs a C++20 compiler: `CXX`, else `g++`.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use nofuss_tensor::batch_norm::batch_norm_train;
use nofuss_tensor::ops::{nca_rows, pairwise_squared_distances, scaled_l2_normalize_rows};
use nofuss_tensor::optim::{Optimizer, OptimizerKind, ParamGroup};
use nofuss_tensor::pool::{avg_pool2d, max_pool2d, Pool2d};
use nofuss_tensor::select::smallest_k;

struct Harness {
    exe: PathBuf,
    dir: tempfile::TempDir,
}

impl Harness {
    fn build() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("harness");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        let out = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-pthread", "-DNOFUSS_HOST_EMULATION"])
            .arg(format!("-I{}", root.join("kernels").display()))
            .arg(root.join("../../tests/reference/kernels_on_host/harness.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("{cxx} (a C++20 compiler) is needed: {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { exe, dir }
    }

    fn write(&self, name: &str, v: &[f64], dt: DType) {
        let bytes: Vec<u8> = match dt {
            DType::F64 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            _ => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
        };
        std::fs::write(self.dir.path().join(format!("{name}.bin")), bytes).unwrap();
    }

    fn write_u32(&self, name: &str, v: &[u32]) {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(self.dir.path().join(format!("{name}.bin")), bytes).unwrap();
    }

    fn read(&self, name: &str, dt: DType) -> Vec<f64> {
        let b = std::fs::read(self.dir.path().join(format!("{name}.bin"))).unwrap();
        match dt {
            DType::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            _ => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
        }
    }

    fn read_u32(&self, name: &str) -> Vec<u32> {
        let b = std::fs::read(self.dir.path().join(format!("{name}.bin"))).unwrap();
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn run(&self, op: &str, dt: DType, args: &[String]) {
        let dts = if dt == DType::F64 { "f64" } else { "f32" };
        let out = Command::new(&self.exe)
            .arg(op)
            .arg(dts)
            .arg(self.dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn values(n: usize, seed: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104729) % 1009) as f64 / 504.5 - 1.0) * 1.7)
        .collect()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn close(what: &str, got: &[f64], want: &[f64], dt: DType) {
    let tol = if dt == DType::F64 { 1e-10 } else { 2e-5 };
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}[{i}] ({dt:?}): kernel {a}, CPU {b}"
        );
    }
}

fn tensor(v: &[f64], shape: &[usize], dt: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

#[test]
fn cuda_kernels_match_the_cpu_operations() {
    let h = Harness::build();
    for dt in [DType::F64, DType::F32] {
        // Pooling: BN-Inception's three kinds and odd ones (a stride that is not a power
        // of two, windows with gaps between them).
        let (n, c, hh, ww) = (2usize, 3usize, 11usize, 9usize);
        for (avg, k, s, p, ceil, inc) in [
            (false, 3, 2, 0, true, true),
            (false, 3, 1, 1, true, true),
            (true, 3, 1, 1, true, true),
            (true, 3, 2, 1, true, false),
            (false, 3, 3, 1, true, true),
            (true, 2, 3, 0, false, true),
        ] {
            let pool = Pool2d {
                kernel: k,
                stride: s,
                padding: p,
                ceil_mode: ceil,
            };
            let xv = values(n * c * hh * ww, k + s);
            let x = Var::from_tensor(&tensor(&xv, &[n, c, hh, ww], dt)).unwrap();
            let y = if avg {
                avg_pool2d(x.as_tensor(), &pool, inc).unwrap()
            } else {
                max_pool2d(x.as_tensor(), &pool).unwrap()
            };
            let (oh, ow) = (y.dim(2).unwrap(), y.dim(3).unwrap());
            let dyv = values(y.elem_count(), 3);
            let dy = tensor(&dyv, y.dims(), dt);
            let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            h.write("x", &xv, dt);
            h.write("dy", &dyv, dt);
            let kind = if avg { "avg" } else { "max" };
            let args = [
                kind.to_string(),
                n.to_string(),
                c.to_string(),
                hh.to_string(),
                ww.to_string(),
                oh.to_string(),
                ow.to_string(),
                k.to_string(),
                s.to_string(),
                p.to_string(),
                (inc as i32).to_string(),
            ];
            h.run("pool", dt, &args);
            let what = format!("{kind} pool k{k} s{s} p{p}");
            close(&format!("{what} y"), &h.read("y", dt), &host(&y), dt);
            let (got, want) = (h.read("dx", dt), host(grads.get(x.as_tensor()).unwrap()));
            close(&format!("{what} dx"), &got, &want, dt);
            if !avg {
                // Max pooling's input gradient: the same sums in the same order in the
                // element type on both sides, so the same values.
                assert!(got == want, "{what} dx: the kernel's and the CPU's differ");
            }
        }

        // Batch norm + ReLU in training mode, several reduction slices per channel: short
        // slices (under one element per thread), and long ones (the reductions' four-loads
        // loop and its remainder).
        // `rows`: channels per grid.z plane of the reductions (the launcher folds channels
        // into planes past 65,535): 5 channels as 2 + 2 + 1 (the last plane's second row
        // idle), and 2 in one plane.
        for (n, c, hh, ww, slices, rows) in [
            (4usize, 5usize, 6usize, 7usize, 3usize, 2usize),
            (2, 2, 40, 53, 2, 2),
        ] {
            let hw = hh * ww;
            let pdt = if dt == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let xv: Vec<f64> = values(n * c * hw, 11)
                .iter()
                .map(|v| v * 2.0 + 0.3)
                .collect();
            let (gv, bv) = (
                values(c, 5).iter().map(|v| v + 1.5).collect::<Vec<_>>(),
                values(c, 6),
            );
            let (rm, rv) = (
                values(c, 8),
                values(c, 9)
                    .iter()
                    .map(|v| v.abs() + 0.5)
                    .collect::<Vec<_>>(),
            );
            let x = Var::from_tensor(&tensor(&xv, &[n, c, hh, ww], dt)).unwrap();
            let gamma = Var::from_tensor(&tensor(&gv, &[c], pdt)).unwrap();
            let beta = Var::from_tensor(&tensor(&bv, &[c], pdt)).unwrap();
            let out = batch_norm_train(
                x.as_tensor(),
                gamma.as_tensor(),
                beta.as_tensor(),
                1e-5,
                true,
            )
            .unwrap();
            let dyv = values(n * c * hw, 12);
            let grads = (&out.y * tensor(&dyv, &[n, c, hh, ww], dt))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &xv), ("dy", &dyv)] {
                h.write(name, v, dt);
            }
            for (name, v) in [
                ("gamma", &gv),
                ("beta", &bv),
                ("running_mean", &rm),
                ("running_var", &rv),
            ] {
                h.write(name, v, pdt);
            }
            h.run(
                "bn",
                dt,
                &[n, c, hw, slices]
                    .map(|v| v.to_string())
                    .into_iter()
                    .chain(["1", "1", "1e-5"].map(String::from))
                    .chain([rows.to_string()])
                    .collect::<Vec<_>>(),
            );
            close("bn y", &h.read("y", dt), &host(&out.y), dt);
            close(
                "bn dx",
                &h.read("dx", dt),
                &host(grads.get(x.as_tensor()).unwrap()),
                dt,
            );
            let stats = h.read("stats", pdt);
            close("bn mean", &stats[..c], &host(&out.mean), dt);
            close("bn var", &stats[c..2 * c], &host(&out.var), dt);
            // The one-launch reductions' "last block" test: per channel exactly the fifth of
            // five blocks (as another thread than the one that counted sees it), and the
            // counters back at zero for the next launch.
            h.run("last", DType::F32, &[]);
            let once = [0, 0, 0, 0, 1, 0, 0, 0, 0, 1];
            assert_eq!(h.read_u32("winners"), [once, once].concat());
            assert_eq!(h.read_u32("done"), [0, 0]);
            // The two-launch reductions (NOFUSS_BN_TWO_PASS=1) merge in the same order.
            assert_eq!(h.read("stats_two_pass", pdt), stats, "two-pass statistics");
            let sums = h.read("sums", pdt);
            assert_eq!(h.read("sums_two_pass", pdt), sums, "two-pass sums");
            close(
                "bn dbeta",
                &sums[..c],
                &host(grads.get(beta.as_tensor()).unwrap()),
                dt,
            );
            close(
                "bn dgamma",
                &sums[c..],
                &host(grads.get(gamma.as_tensor()).unwrap()),
                dt,
            );
            let m = (n * hw) as f64;
            let want_rm: Vec<f64> = rm
                .iter()
                .zip(host(&out.mean))
                .map(|(r, b)| 0.9 * r + 0.1 * b)
                .collect();
            let want_rv: Vec<f64> = rv
                .iter()
                .zip(host(&out.var))
                .map(|(r, b)| 0.9 * r + 0.1 * b * m / (m - 1.0))
                .collect();
            close(
                "bn running mean",
                &h.read("running_mean", pdt),
                &want_rm,
                dt,
            );
            close("bn running var", &h.read("running_var", pdt), &want_rv, dt);
            let want_shifted: Vec<f64> = rm
                .iter()
                .zip(host(&out.mean))
                .zip(&gv)
                .map(|((r, b), s)| 0.9 * r + 0.1 * (b + s))
                .collect();
            close(
                "bn running mean with a shift",
                &h.read("running_mean_shifted", pdt),
                &want_shifted,
                dt,
            );
        }

        // Fused NCA rows, both forms, a row count and width that exercise the reductions.
        let (n, p) = (5usize, 300usize);
        let dv: Vec<f64> = values(n * p, 21).iter().map(|v| v.abs() * 4.0).collect();
        let labels = [0u32, 17, 299, 150, 3];
        for (paper, eps) in [(true, 0.0), (false, 0.1)] {
            let d = Var::from_tensor(&tensor(&dv, &[n, p], dt)).unwrap();
            let lab = Tensor::new(&labels, &Device::Cpu).unwrap();
            let rows = nca_rows(d.as_tensor(), &lab, paper, eps).unwrap();
            let gv = values(n, 4);
            let grads = (&rows * tensor(&gv, &[n], dt))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            h.write("d", &dv, dt);
            h.write_u32("labels", &labels);
            let g2: Vec<f64> = gv.iter().flat_map(|&g| [g, 0.0]).collect();
            h.write("g", &g2, dt);
            h.run(
                "nca",
                dt,
                &[
                    n.to_string(),
                    p.to_string(),
                    (paper as i32).to_string(),
                    eps.to_string(),
                ],
            );
            let out = h.read("out", dt);
            let loss: Vec<f64> = out.chunks(2).map(|c| c[0]).collect();
            close("nca loss", &loss, &host(&rows), dt);
            close(
                "nca grad",
                &h.read("dd", dt),
                &host(grads.get(d.as_tensor()).unwrap()),
                dt,
            );
        }

        // Three Adam steps with L2 weight decay and gradient clipping, the last two
        // reading their scalars from the `live` address, the last its clipping scale
        // from the summed squares at the `clip` address (as on a GPU).
        let pv = values(37, 31);
        let var = Var::from_tensor(&tensor(&pv, &[37], dt)).unwrap();
        let max_norm = 0.5;
        let mut opt = Optimizer::new(
            OptimizerKind::adam(),
            0.01,
            vec![ParamGroup::new("p", vec![var.clone()]).weight_decay(0.1)],
        )
        .unwrap()
        .with_clip_norm(max_norm);
        let (mut p_k, mut state) = (pv.clone(), vec![0f64; 3 * 37]);
        for t in 1..=3i32 {
            let gv = values(37, 40 + t as usize);
            let loss = (var.as_tensor() * tensor(&gv, &[37], dt))
                .unwrap()
                .sum_all()
                .unwrap();
            let norm = opt.step(&loss.backward().unwrap()).unwrap().unwrap();
            assert!(norm > max_norm, "the clip binds: {norm}");
            // The gradient as the optimiser saw it (rounded to the test's type).
            let sumsq: f64 = host(&tensor(&gv, &[37], dt)).iter().map(|g| g * g).sum();
            let clip = t == 3;
            let scale = if clip {
                7.0
            } else {
                (max_norm / (sumsq.sqrt() + 1e-6)).min(1.0)
            };
            if clip {
                h.write("clip", &[sumsq, max_norm], DType::F64);
            }
            h.write("p", &p_k, dt);
            h.write("grad", &gv, dt);
            h.write("state", &state, dt);
            let (b1, b2) = (0.9f64, 0.999f64);
            let (lr, bc1, bc2) = (0.01, 1.0 - b1.powi(t), 1.0 - b2.powi(t));
            // From step 2 on, the learning rate and bias corrections come from the
            // `live` address (as in a replayed CUDA graph) and the fields passed by value
            // are wrong on purpose.
            let live = t >= 2;
            let passed = if live {
                (7.0, 0.5, 0.25)
            } else {
                (lr, bc1, bc2)
            };
            if live {
                h.write("live", &[lr, bc1, bc2], DType::F64);
            }
            let mut args: Vec<String> = ["2", "0", "0", "0", "0"]
                .iter()
                .map(|s| s.to_string())
                .chain(
                    [
                        scale, 0.1, 0.0, passed.0, 0.0, 0.0, 0.0, 1e-8, b1, b2, passed.1, passed.2,
                    ]
                    .iter()
                    .map(|v| format!("{v:e}")),
                )
                .collect();
            if live {
                args.push("live".into());
            }
            if clip {
                args.push("clip".into());
            }
            h.run("optim", dt, &args);
            p_k = h.read("p", dt);
            state = h.read("state", dt);
        }
        close("adam parameter", &p_k, &host(var.as_tensor()), dt);

        // Two steps of SGD with Nesterov momentum (state row a only) and of centred
        // RMSprop (rows b and c only): the kernels load and store only the rows an
        // optimiser uses, and must still agree with the CPU's optimiser.
        let kinds: [(&str, OptimizerKind, [f64; 4]); 2] = [
            // (name, kind, [kind code, nesterov, centered, unused]) and its arguments below
            (
                "sgd nesterov",
                OptimizerKind::sgd(0.9, true),
                [0.0, 1.0, 0.0, 0.0],
            ),
            (
                "rmsprop centred",
                OptimizerKind::RmsProp {
                    alpha: 0.9,
                    eps: 1e-3,
                    momentum: 0.0,
                    centered: true,
                    tf_style: false,
                },
                [1.0, 0.0, 1.0, 0.0],
            ),
        ];
        for (name, kind, [code, nesterov, centered, _]) in kinds {
            let var = Var::from_tensor(&tensor(&pv, &[37], dt)).unwrap();
            let mut opt = Optimizer::new(
                kind,
                0.01,
                vec![ParamGroup::new("p", vec![var.clone()]).weight_decay(0.1)],
            )
            .unwrap();
            let (mut p_k, mut state) = (pv.clone(), vec![0f64; 3 * 37]);
            for t in 1..=2 {
                let gv = values(37, 60 + t);
                let loss = (var.as_tensor() * tensor(&gv, &[37], dt))
                    .unwrap()
                    .sum_all()
                    .unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
                h.write("p", &p_k, dt);
                h.write("grad", &gv, dt);
                h.write("state", &state, dt);
                let first = (t == 1) as i32;
                // scale wd_l2 wd_dec lr momentum dampening alpha eps beta1 beta2 bc1 bc2
                let (momentum, alpha, eps) = if code == 0.0 {
                    (0.9, 0.0, 0.0)
                } else {
                    (0.0, 0.9, 1e-3)
                };
                let args: Vec<String> = [code as i32, first, nesterov as i32, centered as i32, 0]
                    .iter()
                    .map(|v| v.to_string())
                    .chain(
                        [
                            1.0, 0.1, 0.0, 0.01, momentum, 0.0, alpha, eps, 0.0, 0.0, 1.0, 1.0,
                        ]
                        .iter()
                        .map(|v| format!("{v:e}")),
                    )
                    .collect();
                h.run("optim", dt, &args);
                p_k = h.read("p", dt);
                state = h.read("state", dt);
            }
            close(name, &p_k, &host(var.as_tensor()), dt);
        }

        // Many parameters in one step, as the GPU's optimiser launches them: 70 tensors
        // (two tables of up to 64), some crossing chunk boundaries, laid end to end,
        // two AdamW steps against the CPU optimiser's per-parameter steps.
        let lens: Vec<usize> = (0..70)
            .map(|i| match i {
                3 => 4095,
                10 => 4096,
                20 => 4097,
                64 => 9000,
                65 => 1,
                _ => 1 + (i * 37) % 300,
            })
            .collect();
        let total: usize = lens.iter().sum();
        let pv = values(total, 81);
        let mut at = 0;
        let vars: Vec<Var> = lens
            .iter()
            .map(|&n| {
                at += n;
                Var::from_tensor(&tensor(&pv[at - n..at], &[n], dt)).unwrap()
            })
            .collect();
        let mut opt = Optimizer::new(
            OptimizerKind::adamw(),
            0.01,
            vec![ParamGroup::new("p", vars.clone()).weight_decay(0.1)],
        )
        .unwrap();
        let (mut p_k, mut state) = (pv.clone(), vec![0f64; 3 * total]);
        h.write_u32("lens", &lens.iter().map(|&n| n as u32).collect::<Vec<_>>());
        for t in 1..=2i32 {
            let gv = values(total, 90 + t as usize);
            let mut at = 0;
            let mut loss = Tensor::zeros((), dt, &Device::Cpu).unwrap();
            for (v, &n) in vars.iter().zip(&lens) {
                let g = tensor(&gv[at..at + n], &[n], dt);
                loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
                at += n;
            }
            opt.step(&loss.backward().unwrap()).unwrap();
            h.write("p", &p_k, dt);
            h.write("grad", &gv, dt);
            h.write("state", &state, dt);
            let (b1, b2) = (0.9f64, 0.999f64);
            let args: Vec<String> = ["2", "0", "0", "0", "0"]
                .iter()
                .map(|s| s.to_string())
                .chain(
                    [
                        1.0,
                        0.0,
                        0.1,
                        0.01,
                        0.0,
                        0.0,
                        0.0,
                        1e-8,
                        b1,
                        b2,
                        1.0 - b1.powi(t),
                        1.0 - b2.powi(t),
                    ]
                    .iter()
                    .map(|v| format!("{v:e}")),
                )
                .chain(["lens".to_string()])
                .collect();
            h.run("optim", dt, &args);
            p_k = h.read("p", dt);
            state = h.read("state", dt);
        }
        let want: Vec<f64> = vars.iter().flat_map(|v| host(v.as_tensor())).collect();
        close("adamw, 70 parameters in tables", &p_k, &want, dt);
        assert_ne!(p_k, pv, "the parameters moved");
    }

    // Scaled row normalisation, a zero row included, forward and backward.
    for dt in [DType::F64, DType::F32] {
        let (n, d, scale) = (4usize, 300usize, 3.0f64);
        let mut xv = values(n * d, 51);
        xv[d..2 * d].iter_mut().for_each(|v| *v = 0.0);
        let gv = values(n * d, 52);
        let x = Var::from_tensor(&tensor(&xv, &[n, d], dt)).unwrap();
        let y = scaled_l2_normalize_rows(x.as_tensor(), scale).unwrap();
        let grads = (&y * tensor(&gv, &[n, d], dt))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        h.write("x", &xv, dt);
        h.write("g", &gv, dt);
        h.run(
            "l2n",
            dt,
            &[n, d]
                .map(|v| v.to_string())
                .into_iter()
                .chain([scale.to_string()])
                .collect::<Vec<_>>(),
        );
        close("l2n y", &h.read("y", dt), &host(&y), dt);
        // The zero row's gradient (scale / 1e-12 times g) apart: it would swamp the
        // others' tolerance.
        let (got, want) = (h.read("dx", dt), host(grads.get(x.as_tensor()).unwrap()));
        close("l2n dx zero row", &got[d..2 * d], &want[d..2 * d], dt);
        let others = |v: &[f64]| [&v[..d], &v[2 * d..]].concat();
        close("l2n dx", &others(&got), &others(&want), dt);
    }

    // Squared distances from a product and norms: the kernel on the same product and
    // norms as the CPU op, and the product's gradient (-2 g where d > 0).
    for dt in [DType::F64, DType::F32] {
        let (n, p, d) = (9usize, 70usize, 16usize);
        let (av, mut bv) = (values(n * d, 61), values(p * d, 62));
        bv[..d].copy_from_slice(&av[..d]);
        let (a, b) = (tensor(&av, &[n, d], dt), tensor(&bv, &[p, d], dt));
        let dist = pairwise_squared_distances(&a, &b).unwrap();
        let ab = a.matmul(&b.t().unwrap()).unwrap();
        let (aa, bb) = (
            a.sqr().unwrap().sum(1).unwrap(),
            b.sqr().unwrap().sum(1).unwrap(),
        );
        let gv = values(n * p, 63);
        for (name, t) in [("ab", &ab), ("aa", &aa), ("bb", &bb)] {
            h.write(name, &host(t), dt);
        }
        h.write("g", &gv, dt);
        h.run("sqdist", dt, &[n.to_string(), p.to_string()]);
        let want = host(&dist);
        close("sqdist d", &h.read("out", dt), &want, dt);
        let want_dab: Vec<f64> = gv
            .iter()
            .zip(&want)
            .map(|(g, d)| if *d > 0.0 { -2.0 * g } else { 0.0 })
            .collect();
        close("sqdist d(ab)", &h.read("dab", dt), &want_dab, dt);
    }

    // Row selection (f32 only): a kNN-sized selection with the query skipped, many ties
    // across the k-th place, and the largest k over a row that is not a power of two.
    for (rows, cols, k, skip) in [
        (3usize, 5000usize, 1000usize, Some(0usize)),
        (4, 300, 10, Some(2)),
        (2, 4100, 4096, None),
    ] {
        let mut xv: Vec<f64> = values(rows * cols, k)
            .iter()
            .map(|v| (v * 8.0).round() / 8.0)
            .collect();
        xv[1] = f64::NAN;
        xv[cols + 3] = -0.0;
        xv[cols + 4] = f64::NEG_INFINITY;
        let x = tensor(&xv, &[rows, cols], DType::F32);
        let (vals, idx) = smallest_k(&x, k, skip).unwrap();
        h.write("x", &xv, DType::F32);
        h.run(
            "select",
            DType::F32,
            &[
                rows.to_string(),
                cols.to_string(),
                k.to_string(),
                skip.unwrap_or(0).to_string(),
                (skip.is_some() as i32).to_string(),
            ],
        );
        let what = format!("smallest {k} of {cols}");
        assert_eq!(
            h.read_u32("idx"),
            idx.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            "{what}: columns"
        );
        let (got, want) = (h.read("vals", DType::F32), host(&vals));
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: values"
        );
    }

    // The gradients' summed squares of clipping: 70 f32 tensors (two tables' worth: a
    // second launch numbering its blocks on from the first's) and three f64 ones, with
    // empty tensors, lengths at and around the chunk size and more partial sums than a
    // block has threads, against the CPU optimiser's gradient norm.
    let chunk = 4096usize;
    let mut lens32: Vec<u32> = (0..70u32).map(|i| (i * 977) % 30011).collect();
    lens32[3] = 0;
    lens32[10] = chunk as u32;
    lens32[11] = chunk as u32 + 1;
    lens32[12] = chunk as u32 - 1;
    lens32[69] = 1;
    let lens64: Vec<u32> = vec![2 * chunk as u32 + 5, 0, 17];
    let mut vars = vec![];
    let mut all = [vec![], vec![]];
    for (k, (lens, dt)) in [(&lens32, DType::F32), (&lens64, DType::F64)]
        .iter()
        .enumerate()
    {
        for (i, &n) in lens.iter().enumerate() {
            let v = values(n as usize, 80 + i + 100 * k);
            all[k].extend_from_slice(&v);
            vars.push(Var::from_tensor(&tensor(&v, &[n as usize], *dt)).unwrap());
        }
    }
    let blocks: u32 = lens32
        .iter()
        .chain(&lens64)
        .map(|&n| n.div_ceil(chunk as u32))
        .sum();
    assert!(blocks > 256, "{blocks} partial sums");
    h.write_u32("lens32", &lens32);
    h.write("x32", &all[0], DType::F32);
    h.write_u32("lens64", &lens64);
    h.write("x64", &all[1], DType::F64);
    h.run("sumsq", DType::F64, &[]);
    // Each variable's gradient is the variable itself.
    let loss = vars
        .iter()
        .map(|v| {
            (v.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        })
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let grads = loss.backward().unwrap();
    let opt = Optimizer::new(
        OptimizerKind::sgd(0.0, false),
        0.1,
        vec![ParamGroup::new("all", vars.clone())],
    )
    .unwrap();
    let want = opt.grad_norm(&grads).unwrap().powi(2);
    let partial = h.read("partial", DType::F64);
    assert_eq!(partial.len(), blocks as usize);
    assert!(
        partial.iter().all(|p| p.is_finite()),
        "a block wrote no sum"
    );
    let got = h.read("sumsq", DType::F64)[0];
    assert!(
        (got - want).abs() <= 1e-12 * want,
        "summed squares: kernels {got}, CPU {want}"
    );
}
