//! Exact kNN + Recall@K at SOP scale, for comparison with `benches/faiss_knn.py` on the
//! same files. `cargo xtask bench knn` runs both and checks that the recalls agree.
//!
//! `cargo bench -p nofuss-eval --bench knn -- EMB.npy LABELS.npy [REPEATS]` prints one JSON
//! line: median seconds of `knn` (K = 1,000) over REPEATS runs (the search alone, as the
//! references time theirs), the median seconds of the Recall@{1,10,100,1000} pass after
//! it, the recalls, and the process's peak resident memory.
//!
//! `... --features cuda --bench knn -- EMB.npy LABELS.npy REPEATS cuda` runs the search on
//! the GPU (`nofuss_eval::device::knn_on`) instead; `benches/torch_knn.py` is the PyTorch
//! reference for that case (blocked matmul + topk on the same GPU).
//!
//! `... --bench knn -- EMB.npy LABELS.npy REPEATS kmeans RESTARTS ITERS [TRIALS]` times
//! k-means (k = number of classes, greedy k-means++ seeding with TRIALS candidates, 0 = auto, RESTARTS runs of at most ITERS Lloyd
//! iterations) + NMI instead, as `benches/kmeans_ref.py` does with faiss and scikit-learn.

use std::time::Instant;

use nofuss_eval::{
    kmeans, knn, nmi, recall_from_neighbors, KMeansConfig, Metric, NmiNormalization,
};

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0).round())
}

/// Reads a little-endian C-order `.npy` array: its shape and raw data bytes.
fn read_npy(path: &str, descr: &str) -> Result<(Vec<usize>, Vec<u8>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(format!("{path}: not a .npy file"));
    }
    let (hlen, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        )
    };
    let header = String::from_utf8_lossy(&bytes[start..start + hlen]).to_string();
    if !header.contains(&format!("'descr': '{descr}'")) || header.contains("'fortran_order': True")
    {
        return Err(format!("{path}: expected C-order {descr}, header {header}"));
    }
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("no shape")?;
    let shape = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| "bad shape".to_string()))
        .collect::<Result<Vec<usize>, _>>()?;
    Ok((shape, bytes[start + hlen..].to_vec()))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (emb_path, lab_path) = match (args.first(), args.get(1)) {
        (Some(e), Some(l)) => (e.clone(), l.clone()),
        _ => return Err("usage: knn EMB.npy LABELS.npy [REPEATS]".into()),
    };
    let repeats: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(1);
    let (shape, raw) = read_npy(&emb_path, "<f4")?;
    let emb: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (_, raw) = read_npy(&lab_path, "<i8")?;
    let labels: Vec<u32> = raw
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as u32)
        .collect();
    let (n, dim) = (shape[0], shape[1]);
    if args.get(3).map(String::as_str) == Some("kmeans") {
        let restarts: usize = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(1);
        let max_iter: usize = args.get(5).and_then(|r| r.parse().ok()).unwrap_or(20);
        let mut classes = labels.clone();
        classes.sort_unstable();
        classes.dedup();
        let cfg = KMeansConfig {
            k: classes.len(),
            restarts,
            max_iter,
            tol: 0.0,
            seed: 0,
            local_trials: args.get(6).and_then(|t| t.parse().ok()).unwrap_or(0),
        };
        let mut times = Vec::new();
        let mut score = 0.0;
        let mut inertia = 0.0;
        for _ in 0..repeats.max(1) {
            let t = Instant::now();
            let km = kmeans(&emb, dim, &cfg).map_err(|e| e.to_string())?;
            score = nmi(&labels, &km.assignments, NmiNormalization::Arithmetic)
                .map_err(|e| e.to_string())?;
            times.push(t.elapsed().as_secs_f64());
            inertia = km.inertia;
        }
        times.sort_by(f64::total_cmp);
        let line = serde_json::json!({
            "impl": "nofuss-eval kmeans",
            "threads": rayon::current_num_threads(),
            "n": n,
            "dim": dim,
            "k": cfg.k,
            "restarts": restarts,
            "iters": max_iter,
            "local_trials": cfg.local_trials,
            "seconds": (times[times.len() / 2] * 1000.0).round() / 1000.0,
            "nmi": score,
            "inertia": inertia,
            "peak_rss_mib": peak_rss_mib(),
        });
        println!("{line}");
        return Ok(());
    }
    let ks = [1, 10, 100, 1000];
    let device = args.get(3).map(String::as_str).unwrap_or("cpu").to_string();
    // The GPU is opened once (its context, cuBLAS handle and kernel modules), as the
    // PyTorch reference's is, and not inside the timed search.
    #[cfg(feature = "candle")]
    let gpu = match device.as_str() {
        "cuda" => Some(candle_core::Device::new_cuda(0).map_err(|e| e.to_string())?),
        _ => None,
    };
    let search = |emb: &[f32]| -> Result<nofuss_eval::Neighbors, String> {
        match device.as_str() {
            "cpu" => knn(emb, dim, 1000, Metric::Euclidean).map_err(|e| e.to_string()),
            #[cfg(feature = "candle")]
            "cuda" => {
                let dev = gpu.as_ref().ok_or("no GPU opened")?;
                nofuss_eval::device::knn_on(dev, emb, dim, 1000, Metric::Euclidean)
                    .map_err(|e| e.to_string())
            }
            other => Err(format!(
                "device '{other}': cpu, or cuda with --features cuda"
            )),
        }
    };
    if device != "cpu" {
        // One untimed search first, as the PyTorch reference makes (kernels, allocator).
        search(&emb)?;
    }
    // The search timed alone, as the references time theirs (faiss's search, PyTorch's
    // blocks of matmul + topk with the indices copied back); the Recall@K pass beside it.
    let mut times = Vec::new();
    let mut recall_times = Vec::new();
    let mut recall = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let nb = search(&emb)?;
        times.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        recall = recall_from_neighbors(&nb, &labels, &ks).map_err(|e| e.to_string())?;
        recall_times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    recall_times.sort_by(f64::total_cmp);
    let mut line = serde_json::json!({
        "impl": "nofuss-eval knn",
        "device": device,
        "threads": rayon::current_num_threads(),
        "n": n,
        "dim": dim,
        "seconds": (times[times.len() / 2] * 1000.0).round() / 1000.0,
        "recall_seconds": (recall_times[recall_times.len() / 2] * 1000.0).round() / 1000.0,
        "peak_rss_mib": peak_rss_mib(),
    });
    for (k, r) in recall {
        line[format!("recall@{k}")] = r.into();
    }
    println!("{line}");
    Ok(())
}
