//! Decode + RandomResizedCrop(224) + flip + normalise on CUB-like JPEGs, for comparison
//! with `benches/torchvision_pipeline.py` on the same files (`cargo xtask bench pipeline`).
//!
//! `cargo bench -p nofuss-data --bench pipeline -- DIR [ROUNDS]` prints one JSON line:
//! median images/s over ROUNDS passes on one thread (per core, as the reference), and
//! the rate of the full loader (parallel decoding, all cores), and the single thread's
//! time per image split into decoding alone and the transform alone (on images decoded
//! beforehand), medians over the rounds.

use std::path::PathBuf;
use std::time::Instant;

use nofuss_data::pipeline::{BadImages, Loader, LoaderConfig, Sampler};
use nofuss_data::transform::{decode_rgb, load_transformed, resample_into, Transform};
use nofuss_data::{ImageDataset, ImageRecord, Subset};
use nofuss_tensor::Normalization;
use rand::SeedableRng;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let dir = PathBuf::from(args.first().ok_or("usage: pipeline DIR [ROUNDS]")?);
    let rounds: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(5);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no .jpg in {}", dir.display()));
    }
    let t = Transform::train(224);
    let norm = Normalization::imagenet_rgb();
    let mut out = vec![0f32; 3 * 224 * 224];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let single: Vec<f64> = (0..rounds.max(1))
        .map(|_| {
            let start = Instant::now();
            for f in &files {
                load_transformed(f, &t, &norm, &mut rng, &mut out).map_err(|e| e.to_string())?;
            }
            Ok(files.len() as f64 / start.elapsed().as_secs_f64())
        })
        .collect::<Result<_, String>>()?;

    // The two halves of a single thread's time per image (ms): decoding, and the
    // transform (crop, resample, flip, normalise) on images decoded beforehand.
    let decoded = files
        .iter()
        .map(|f| decode_rgb(f).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, String>>()?;
    let per_image = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64() * 1e3 / files.len() as f64)
    };
    let mut decode_ms = Vec::new();
    let mut transform_ms = Vec::new();
    for _ in 0..rounds.max(1) {
        decode_ms.push(per_image(&mut || {
            for f in &files {
                std::hint::black_box(decode_rgb(f).map_err(|e| e.to_string())?);
            }
            Ok(())
        })?);
        transform_ms.push(per_image(&mut || {
            for img in &decoded {
                let region = t.region(img.width(), img.height(), &mut rng);
                resample_into(img, &region, t.size(), &norm, &mut out)
                    .map_err(|e| e.to_string())?;
                std::hint::black_box(&out);
            }
            Ok(())
        })?);
    }

    // The whole loader: all cores, batches of 32 behind the prefetch queue.
    let ds = ImageDataset {
        root: dir.clone(),
        images_dir: dir.clone(),
        records: files
            .iter()
            .enumerate()
            .map(|(i, f)| ImageRecord {
                id: i as u32 + 1,
                path: f.file_name().map(PathBuf::from).unwrap_or_default(),
                class: (i % 8) as u32,
            })
            .collect(),
        class_names: (0..8).map(|c| c.to_string()).collect(),
    };
    let subset = Subset::of_classes(&ds, &(0..8).collect::<Vec<u32>>());
    let loader = Loader::new(
        &ds,
        &subset,
        LoaderConfig {
            batch_size: 32,
            sampler: Sampler::Random,
            transform: t,
            normalization: norm,
            seed: 0,
            prefetch: 4,
            bad_images: BadImages::Fail,
            threads: 0,
        },
    )
    .map_err(|e| e.to_string())?;
    let parallel: Vec<f64> = (0..rounds.max(1) as u64)
        .map(|epoch| {
            let start = Instant::now();
            let mut n = 0;
            for b in loader.epoch(epoch) {
                n += b.map_err(|e| e.to_string())?.labels.len();
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        })
        .collect::<Result<_, String>>()?;
    println!(
        "{}",
        serde_json::json!({
            "impl": "nofuss-data",
            "threads": 1,
            "images": files.len(),
            "images_per_s": (median(single) * 10.0).round() / 10.0,
            "loader_threads": rayon::current_num_threads(),
            "loader_images_per_s": (median(parallel) * 10.0).round() / 10.0,
            "decode_ms": (median(decode_ms) * 1e3).round() / 1e3,
            "transform_ms": (median(transform_ms) * 1e3).round() / 1e3,
        })
    );
    Ok(())
}
