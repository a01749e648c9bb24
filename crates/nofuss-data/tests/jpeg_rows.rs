//! Decoding a sequential JPEG only down to the rows a crop reads gives the crop of the
//! whole decoded image, to the bit: every layout of `tests/reference/jpeg_layouts.py`
//! (4:2:0, 4:2:2, 4:4:4, grayscale, restart markers, optimised tables, a tall image, and
//! a progressive file, which is decoded whole), through random resized crops, the
//! evaluation crop and crops inside a bounding box, both outputs. And damaged files are
//! errors that name them.

use std::path::{Path, PathBuf};

use nofuss_data::transform::{decode_rgb, load_transformed_within, resample_into, Transform};
use nofuss_data::BBox;
use nofuss_tensor::Normalization;
use rand::SeedableRng;

fn fixtures() -> PathBuf {
    nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("jpeg")
}

/// The crop as it was before rows were skipped: the whole image decoded, the region
/// drawn from its size.
fn whole<P: nofuss_data::transform::Texel>(
    path: &Path,
    t: &Transform,
    norm: &Normalization,
    rng: &mut impl rand::Rng,
    within: Option<BBox>,
    out: &mut [P],
) {
    let img = decode_rgb(path).unwrap();
    let (x0, y0, w, h) = match within {
        Some(b) => b.clip(img.width(), img.height()),
        None => (0, 0, img.width(), img.height()),
    };
    let mut region = t.region(w, h, rng);
    region.x += x0 as f64;
    region.y += y0 as f64;
    resample_into(&img, &region, t.size(), norm, out).unwrap();
}

#[test]
fn crops_of_partly_decoded_jpegs_equal_crops_of_the_whole_image() {
    let mut names: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 9, "{names:?}");
    let norm = Normalization::imagenet_rgb();
    let boxes = [
        None,
        Some(BBox {
            x1: 10,
            y1: 4,
            x2: 90,
            y2: 60,
        }),
    ];
    for path in &names {
        for (t, seeds) in [
            (Transform::train(64), 0..60u64),
            (Transform::train(224), 0..10),
            (Transform::eval(48), 0..2),
        ] {
            for seed in seeds {
                for within in boxes {
                    let n = 3 * t.size() * t.size();
                    let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                    load_transformed_within(path, &t, &norm, &mut rng, within, &mut got).unwrap();
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                    whole(path, &t, &norm, &mut rng, within, &mut want);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{} {t:?} seed {seed} {within:?}", path.display());
                    let (mut got, mut want) = (vec![0u8; n], vec![0u8; n]);
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                    load_transformed_within(path, &t, &norm, &mut rng, within, &mut got).unwrap();
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                    whole(path, &t, &norm, &mut rng, within, &mut want);
                    assert_eq!(got, want, "{} {t:?} seed {seed} {within:?}", path.display());
                }
            }
        }
    }
}

#[test]
fn damaged_jpegs_are_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("s420.jpg")).unwrap();
    let t = Transform::train(32);
    let norm = Normalization::imagenet_rgb();
    let mut out = vec![0f32; 3 * 32 * 32];
    let p = dir.path().join("header.jpg");
    std::fs::write(&p, &bytes[..40]).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let e = load_transformed_within(&p, &t, &norm, &mut rng, None, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("header.jpg"), "{e}");
    let gone = dir.path().join("gone.JPG");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let e = load_transformed_within(&gone, &t, &norm, &mut rng, None, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gone.JPG"), "{e}");
    // Cut short (as an interrupted download leaves it), here and a few bytes before the
    // end: an error, where the decoder would fill in the rest; bytes after a whole
    // image's EOI are no damage.
    for keep in [bytes.len() / 3, bytes.len() - 5] {
        let p = dir.path().join("short.jpg");
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let e = load_transformed_within(&p, &t, &norm, &mut rng, None, &mut out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("short.jpg") && e.contains("cut short"), "{e}");
        assert!(decode_rgb(&p).is_err());
    }
    let p = dir.path().join("trailing.jpg");
    std::fs::write(&p, [&bytes[..], b"trailing bytes"].concat()).unwrap();
    let mut want = vec![0f32; out.len()];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    load_transformed_within(&p, &t, &norm, &mut rng, None, &mut out).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    whole(
        &fixtures().join("s420.jpg"),
        &t,
        &norm,
        &mut rng,
        None,
        &mut want,
    );
    assert_eq!(out, want);
}
