//! The photo pipeline's resampling against torchvision's PIL transforms on the same image
//! (`tests/reference/pipeline_pil.py`): Resize + CenterCrop, and a resized crop with and
//! without flip. Pillow resamples in fixed point and rounds between its two passes; we
//! keep f32 between passes, so values may differ by one level.

use nofuss_data::transform::{decode_rgb, resample_into, Region, Transform};
use nofuss_tensor::{ChannelOrder, Normalization};
use serde_json::Value;

fn unit() -> Normalization {
    Normalization {
        scale: 1.0,
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
        order: ChannelOrder::Rgb,
    }
}

/// Our `[3, S, S]` output against PIL's HWC bytes: the largest difference in levels.
fn max_diff(ours: &[f32], want: &Value, size: usize) -> f32 {
    let hwc: Vec<f32> = want["hwc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(hwc.len(), 3 * size * size);
    let mut worst = 0f32;
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                let a = ours[c * size * size + y * size + x];
                let b = hwc[(y * size + x) * 3 + c];
                worst = worst.max((a - b).abs());
            }
        }
    }
    worst
}

#[test]
fn resampling_matches_pillow_within_one_level() {
    let dir = nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("pipeline");
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pil.json")).unwrap()).unwrap();
    let img = decode_rgb(&dir.join("source.png")).unwrap();
    assert_eq!((img.width(), img.height()), (61, 47));

    let t = Transform::Eval {
        resize: 36,
        size: 32,
    };
    let region = t.region(61, 47, &mut rand::thread_rng());
    let mut out = vec![0f32; 3 * 32 * 32];
    resample_into(&img, &region, 32, &unit(), &mut out).unwrap();
    let d = max_diff(&out, &want["eval_resize36_crop32"], 32);
    assert!(d <= 1.0, "eval transform differs from PIL by {d} levels");

    for (flip, key) in [
        (false, "crop_5_7_30x41_to24"),
        (true, "crop_5_7_30x41_to24_flip"),
    ] {
        let region = Region {
            x: 7.0,
            y: 5.0,
            w: 41.0,
            h: 30.0,
            flip,
            inside: true,
        };
        let mut out = vec![0f32; 3 * 24 * 24];
        resample_into(&img, &region, 24, &unit(), &mut out).unwrap();
        let d = max_diff(&out, &want[key], 24);
        assert!(d <= 1.0, "{key}: differs from PIL by {d} levels");
    }
}
