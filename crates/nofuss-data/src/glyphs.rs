//! The embedded default dataset: rendered glyphs, one class per character.
//!
//! A zero-shot task in the spirit of Omniglot that needs nothing downloaded: every
//! character of a fixed candidate list (Latin, Greek, Cyrillic, digits, symbols) that
//! all embedded fonts cover becomes a class; characters that look alike (Latin `A`,
//! Greek `Α`, Cyrillic `А`; `l` and `I` in sans fonts, ...) are detected by comparing
//! their renders and only the first is kept. Each class gets `renders_per_font` images
//! per font, each under a random affine distortion (rotation, shear, scale,
//! translation), contrast and noise. The fonts (DejaVu: Bitstream Vera licence;
//! Liberation: SIL OFL 1.1) are compiled into the crate from `data/fonts/`, whose
//! licence files travel with them.
//!
//! [`prepare`] writes the dataset in the CUB-200-2011 layout (see [`crate::cub`]), into
//! a temporary sibling folder renamed into place at the end, with a marker file
//! [`MARKER`] recording how it was made; a later call with the same settings reuses it.

use std::fs;
use std::path::{Path, PathBuf};

use ab_glyph::{Font, FontRef, OutlineCurve};
use ab_glyph_rasterizer::{point, Rasterizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{cub, DataError, ImageDataset, ImageRecord, Result};

/// Bumped whenever the generator's output changes, so stale copies are regenerated.
pub const GENERATOR_VERSION: u32 = 1;

/// The marker file written at the dataset root.
pub const MARKER: &str = "nofuss-glyphs.toml";

macro_rules! font {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../data/fonts/",
                $name
            )) as &[u8],
        )
    };
}

/// The embedded fonts: file name and bytes.
pub const FONTS: [(&str, &[u8]); 8] = [
    font!("DejaVuSans.ttf"),
    font!("DejaVuSerif.ttf"),
    font!("DejaVuSansMono.ttf"),
    font!("DejaVuSerif-Italic.ttf"),
    font!("LiberationSans-Regular.ttf"),
    font!("LiberationSerif-Regular.ttf"),
    font!("LiberationMono-Regular.ttf"),
    font!("LiberationSans-Bold.ttf"),
];

/// Candidate characters, in order of preference when two look alike.
const CANDIDATES: &str = concat!(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "abcdefghijklmnopqrstuvwxyz",
    "0123456789",
    "!?#$%&*+<>=@§¶©®±×÷µßæøœðþ€£¥¢{}[]()/\\|~^",
    "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθικλμνξπρσςτυφχψω",
    "БГДЖЗИЙЛПФЦЧШЩЪЫЬЭЮЯбвгдежзийклмнптфцчшщъыьэюяђљњћџѣ",
    "ŁłŊŋŦŧĦħĐđƒǅǲȘȚ",
    "←↑→↓↔∂∆∏∑√∞∫≈≠≤≥",
    "¡¿«»¬°¹²³¼½¾†‡•‰™◊♠♣♥♦■□▲►▼◄○●☺☼♀♂♪♫⌂⌐⌠⌡",
    "ЂЉЊЋЏЄЇҐґєїѓќўЎ",
    "ÆØŒÐÞĲĳŉ",
);

/// Two characters whose mean render correlation over the fonts exceeds this are one class.
const LOOKALIKE_CORRELATION: f32 = 0.9;

/// Fixed seed of the class order, independent of the image seed, so the class split
/// is the same for every generated copy.
const CLASS_ORDER_SEED: u64 = 170_307_464;

/// Settings of the generated dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GlyphConfig {
    /// Side of the square grayscale images, in pixels.
    pub image_size: usize,
    /// Distorted renders of each character in each font.
    pub renders_per_font: usize,
    /// Keep only the first `max_classes` classes (all when `None`), for quick tests.
    pub max_classes: Option<usize>,
    /// Seed of the distortions.
    pub seed: u64,
}

impl Default for GlyphConfig {
    fn default() -> Self {
        Self {
            image_size: 32,
            renders_per_font: 4,
            max_classes: None,
            seed: 0,
        }
    }
}

/// What [`MARKER`] records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Marker {
    generator_version: u32,
    config: GlyphConfig,
    num_classes: usize,
    num_images: usize,
    fonts: Vec<String>,
    /// The character of each class, in class order.
    characters: Vec<String>,
}

/// What [`prepare`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The dataset root.
    pub root: PathBuf,
    /// Whether it was generated now (false: an existing copy was reused).
    pub generated: bool,
    /// Number of classes.
    pub num_classes: usize,
    /// Number of images.
    pub num_images: usize,
}

fn parse_fonts() -> Result<Vec<FontRef<'static>>> {
    FONTS
        .iter()
        .map(|(name, bytes)| {
            FontRef::try_from_slice(bytes)
                .map_err(|e| DataError::Config(format!("embedded font {name} is unreadable: {e}")))
        })
        .collect()
}

/// A 2x2 matrix and a translation, applied about the image centre.
#[derive(Debug, Clone, Copy)]
struct Affine {
    m: [[f32; 2]; 2],
    t: [f32; 2],
}

impl Affine {
    const IDENTITY: Self = Self {
        m: [[1.0, 0.0], [0.0, 1.0]],
        t: [0.0, 0.0],
    };

    fn random(rng: &mut ChaCha8Rng) -> Self {
        let theta = rng.gen_range(-10.0f32..10.0).to_radians();
        let shear = rng.gen_range(-0.15f32..0.15);
        let s = rng.gen_range(0.85f32..1.1);
        let (sx, sy) = (
            s * rng.gen_range(0.94f32..1.06),
            s * rng.gen_range(0.94f32..1.06),
        );
        let (c, si) = (theta.cos(), theta.sin());
        // R * Shear * Scale
        let a = [[sx, shear * sy], [0.0, sy]];
        let m = [
            [c * a[0][0] - si * a[1][0], c * a[0][1] - si * a[1][1]],
            [si * a[0][0] + c * a[1][0], si * a[0][1] + c * a[1][1]],
        ];
        Self {
            m,
            t: [rng.gen_range(-2.0f32..2.0), rng.gen_range(-2.0f32..2.0)],
        }
    }
}

/// Coverage in [0,1] of `ch` in `font` on a `size`x`size` canvas, or `None` when the
/// font has no outline for it.
fn coverage(font: &FontRef, ch: char, size: usize, aff: &Affine) -> Option<Vec<f32>> {
    let id = font.glyph_id(ch);
    if id.0 == 0 {
        return None;
    }
    let outline = font.outline(id)?;
    let upem = font.units_per_em().unwrap_or(1000.0);
    let k = size as f32 * 0.72 / upem;
    let half = size as f32 / 2.0;
    let baseline = size as f32 * 0.74;
    let cx = (outline.bounds.min.x + outline.bounds.max.x) / 2.0 * k;
    // Render on a canvas twice the size so distorted glyphs are never clipped, then crop.
    let margin = half;
    let canvas = 2 * size;
    let map = |p: ab_glyph::Point| {
        let (x, y) = (p.x * k - cx + half, baseline - p.y * k);
        let (dx, dy) = (x - half, y - half);
        point(
            aff.m[0][0] * dx + aff.m[0][1] * dy + half + aff.t[0] + margin,
            aff.m[1][0] * dx + aff.m[1][1] * dy + half + aff.t[1] + margin,
        )
    };
    let mut r = Rasterizer::new(canvas, canvas);
    for c in &outline.curves {
        match *c {
            OutlineCurve::Line(a, b) => r.draw_line(map(a), map(b)),
            OutlineCurve::Quad(a, b, c) => r.draw_quad(map(a), map(b), map(c)),
            OutlineCurve::Cubic(a, b, c, d) => r.draw_cubic(map(a), map(b), map(c), map(d)),
        }
    }
    let mut out = vec![0f32; size * size];
    let m = margin as u32;
    r.for_each_pixel_2d(|x, y, a| {
        if (m..m + size as u32).contains(&x) && (m..m + size as u32).contains(&y) {
            out[(y - m) as usize * size + (x - m) as usize] = a.clamp(0.0, 1.0);
        }
    });
    Some(out)
}

fn correlation(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len() as f32;
    let (ma, mb) = (a.iter().sum::<f32>() / n, b.iter().sum::<f32>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x - ma, y - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    if saa == 0.0 || sbb == 0.0 {
        return 1.0; // a blank render is indistinguishable from anything blank
    }
    sab / (saa * sbb).sqrt()
}

/// The class characters: candidates covered by every font, look-alikes removed, in a
/// fixed shuffled order (so both halves of the split mix scripts).
pub fn characters() -> Result<Vec<char>> {
    static CHARS: std::sync::OnceLock<std::result::Result<Vec<char>, String>> =
        std::sync::OnceLock::new();
    CHARS
        .get_or_init(|| compute_characters().map_err(|e| e.to_string()))
        .clone()
        .map_err(DataError::Config)
}

fn compute_characters() -> Result<Vec<char>> {
    let fonts = parse_fonts()?;
    let size = 32;
    let mut kept: Vec<(char, Vec<Vec<f32>>)> = Vec::new();
    'cand: for ch in CANDIDATES.chars() {
        let renders: Option<Vec<Vec<f32>>> = fonts
            .iter()
            .map(|f| coverage(f, ch, size, &Affine::IDENTITY))
            .collect();
        let Some(renders) = renders else { continue };
        if renders.iter().any(|r| r.iter().sum::<f32>() < 4.0) {
            continue; // (nearly) empty in some font
        }
        for (_, other) in &kept {
            let mean = renders
                .iter()
                .zip(other)
                .map(|(a, b)| correlation(a, b))
                .sum::<f32>()
                / fonts.len() as f32;
            if mean > LOOKALIKE_CORRELATION {
                continue 'cand;
            }
        }
        kept.push((ch, renders));
    }
    let mut chars: Vec<char> = kept.into_iter().map(|(c, _)| c).collect();
    use rand::seq::SliceRandom;
    chars.shuffle(&mut ChaCha8Rng::seed_from_u64(CLASS_ORDER_SEED));
    Ok(chars)
}

/// Renders one distorted 8-bit image of `ch` in `font` (bright glyph on a dark ground).
fn render(font: &FontRef, ch: char, size: usize, rng: &mut ChaCha8Rng) -> Option<Vec<u8>> {
    let aff = Affine::random(rng);
    let cov = coverage(font, ch, size, &aff)?;
    let bg = rng.gen_range(0.0f32..40.0);
    let fg = rng.gen_range(170.0f32..255.0);
    Some(
        cov.iter()
            .map(|&a| {
                // Approximately normal noise: sum of uniforms.
                let noise: f32 = (0..3).map(|_| rng.gen_range(-4.0f32..4.0)).sum();
                (bg + (fg - bg) * a + noise).round().clamp(0.0, 255.0) as u8
            })
            .collect(),
    )
}

fn marker_of(root: &Path) -> Option<Marker> {
    let text = fs::read_to_string(root.join(MARKER)).ok()?;
    toml::from_str(&text).ok()
}

/// Makes sure the glyph dataset with settings `cfg` exists at `root`, generating it if
/// absent or made by another generator version or settings. A folder at `root` that
/// is not a generated glyph dataset is never touched: that is an error.
pub fn prepare(root: impl AsRef<Path>, cfg: &GlyphConfig) -> Result<Prepared> {
    let root = root.as_ref();
    if cfg.image_size < 16 || cfg.renders_per_font == 0 {
        return Err(DataError::Config(format!(
            "glyph images need image_size >= 16 and renders_per_font >= 1, got {cfg:?}"
        )));
    }
    if root.exists() {
        match marker_of(root) {
            Some(m) if m.generator_version == GENERATOR_VERSION && m.config == *cfg => {
                return Ok(Prepared {
                    root: root.to_path_buf(),
                    generated: false,
                    num_classes: m.num_classes,
                    num_images: m.num_images,
                });
            }
            Some(_) => {} // ours, but stale: regenerate below
            None => {
                return Err(DataError::Config(format!(
                    "{} exists but is not a generated glyph dataset (no valid {MARKER}); \
                     choose another folder or remove it",
                    root.display()
                )))
            }
        }
    }
    let parent = root
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    let tmp_prefix = format!(
        ".{}.tmp-",
        root.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("glyphs")
    );
    // Leftovers of interrupted generations: ours by name, never complete.
    for e in fs::read_dir(parent)
        .map_err(|e| DataError::io(parent, e))?
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(&tmp_prefix) {
            fs::remove_dir_all(e.path()).map_err(|err| DataError::io(e.path(), err))?;
        }
    }
    let tmp = parent.join(format!("{tmp_prefix}{}", std::process::id()));
    let result = generate_into(&tmp, cfg);
    let marker = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if root.exists() {
        fs::remove_dir_all(root).map_err(|e| DataError::io(root, e))?;
    }
    fs::rename(&tmp, root).map_err(|e| DataError::io(root, e))?;
    Ok(Prepared {
        root: root.to_path_buf(),
        generated: true,
        num_classes: marker.num_classes,
        num_images: marker.num_images,
    })
}

fn generate_into(dir: &Path, cfg: &GlyphConfig) -> Result<Marker> {
    let fonts = parse_fonts()?;
    let mut chars = characters()?;
    if let Some(k) = cfg.max_classes {
        if k < 2 {
            return Err(DataError::Config("max_classes must be at least 2".into()));
        }
        chars.truncate(k);
    }
    let class_names: Vec<String> = chars
        .iter()
        .enumerate()
        .map(|(i, &c)| format!("{:03}.U{:04X}", i + 1, c as u32))
        .collect();
    let per_class = fonts.len() * cfg.renders_per_font;
    let jobs: Vec<(usize, usize, usize)> = (0..chars.len())
        .flat_map(|c| {
            (0..fonts.len()).flat_map(move |f| (0..cfg.renders_per_font).map(move |r| (c, f, r)))
        })
        .collect();
    for name in &class_names {
        let d = dir.join(cub::IMAGES_DIR).join(name);
        fs::create_dir_all(&d).map_err(|e| DataError::io(&d, e))?;
    }
    let size = cfg.image_size;
    let records: Vec<ImageRecord> = jobs
        .par_iter()
        .enumerate()
        .map(|(i, &(c, f, r))| {
            let mut rng = ChaCha8Rng::seed_from_u64(
                cfg.seed
                    ^ ((c as u64) << 40 | (f as u64) << 20 | r as u64)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let pixels = render(&fonts[f], chars[c], size, &mut rng).ok_or_else(|| {
                DataError::Config(format!("font {} cannot render {:?}", FONTS[f].0, chars[c]))
            })?;
            let rel = PathBuf::from(&class_names[c]).join(format!("f{f}_{r:02}.png"));
            let path = dir.join(cub::IMAGES_DIR).join(&rel);
            image::GrayImage::from_raw(size as u32, size as u32, pixels)
                .ok_or_else(|| DataError::Config("render of the wrong size".into()))?
                .save(&path)
                .map_err(|e| DataError::Image {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            Ok(ImageRecord {
                id: i as u32 + 1,
                path: rel,
                class: c as u32,
            })
        })
        .collect::<Result<_>>()?;
    let ds = ImageDataset {
        root: dir.to_path_buf(),
        images_dir: dir.join(cub::IMAGES_DIR),
        records,
        class_names,
    };
    cub::write_annotations(dir, &ds)?;
    let marker = Marker {
        generator_version: GENERATOR_VERSION,
        config: cfg.clone(),
        num_classes: chars.len(),
        num_images: chars.len() * per_class,
        fonts: FONTS.iter().map(|(n, _)| n.to_string()).collect(),
        characters: chars.iter().map(|c| c.to_string()).collect(),
    };
    let text = toml::to_string(&marker).map_err(|e| DataError::Config(e.to_string()))?;
    let path = dir.join(MARKER);
    fs::write(&path, text).map_err(|e| DataError::io(&path, e))?;
    Ok(marker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_least_200_distinct_classes() {
        let chars = characters().unwrap();
        assert!(chars.len() >= 200, "only {} classes", chars.len());
        let mut sorted = chars.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), chars.len());
        // Cross-script look-alikes collapse to one class.
        let has = |c| chars.contains(&c);
        assert!(
            has('A') && !has('\u{0391}') && !has('\u{0410}'),
            "Latin/Greek/Cyrillic A"
        );
        assert!(has('o') as u8 + has('\u{03BF}') as u8 + has('\u{043E}') as u8 <= 1);
        // Both halves of the split mix scripts.
        let half = chars.len() / 2;
        for part in [&chars[..half], &chars[half..]] {
            assert!(part.iter().any(|c| c.is_ascii_alphabetic()));
            assert!(part.iter().any(|c| ('\u{0400}'..'\u{0500}').contains(c)));
        }
    }

    #[test]
    fn renders_are_distorted_but_recognisable() {
        let fonts = parse_fonts().unwrap();
        let clean = coverage(&fonts[0], 'R', 32, &Affine::IDENTITY).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = render(&fonts[0], 'R', 32, &mut rng).unwrap();
        let b = render(&fonts[0], 'R', 32, &mut rng).unwrap();
        assert_ne!(a, b);
        let af: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        let other = coverage(&fonts[0], 'W', 32, &Affine::IDENTITY).unwrap();
        assert!(correlation(&af, &clean) > correlation(&af, &other));
        assert!(a.iter().any(|&v| v > 150) && a.iter().any(|&v| v < 50));
    }

    #[test]
    fn prepare_writes_a_loadable_cub_layout_and_reuses_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("glyphs");
        let cfg = GlyphConfig {
            renders_per_font: 1,
            max_classes: Some(6),
            ..Default::default()
        };
        // An interrupted earlier generation left its temporary folder behind.
        fs::create_dir_all(d.path().join(".glyphs.tmp-99999/images")).unwrap();
        let p = prepare(&root, &cfg).unwrap();
        assert!(p.generated);
        assert_eq!((p.num_classes, p.num_images), (6, 6 * FONTS.len()));
        let ds = cub::load(&root).unwrap();
        assert_eq!(ds.records.len(), p.num_images);
        assert_eq!(ds.num_classes(), 6);
        let img = image::open(ds.images_dir.join(&ds.records[0].path)).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
        // Same settings: reused, untouched.
        assert!(!prepare(&root, &cfg).unwrap().generated);
        // Other settings: regenerated.
        let cfg2 = GlyphConfig {
            renders_per_font: 2,
            ..cfg.clone()
        };
        let p2 = prepare(&root, &cfg2).unwrap();
        assert!(p2.generated);
        assert_eq!(cub::load(&root).unwrap().records.len(), 12 * FONTS.len());
        // No temporary folder is left behind.
        let leftovers: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn deterministic_for_a_seed() {
        let d = tempfile::tempdir().unwrap();
        let cfg = GlyphConfig {
            renders_per_font: 1,
            max_classes: Some(2),
            ..Default::default()
        };
        prepare(d.path().join("a"), &cfg).unwrap();
        prepare(d.path().join("b"), &cfg).unwrap();
        let ds = cub::load(d.path().join("a")).unwrap();
        for r in &ds.records {
            let a = fs::read(d.path().join("a/images").join(&r.path)).unwrap();
            let b = fs::read(d.path().join("b/images").join(&r.path)).unwrap();
            assert_eq!(a, b, "{}", r.path.display());
        }
    }

    #[test]
    fn refuses_foreign_folders() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("precious.txt"), "keep me").unwrap();
        let e = prepare(d.path(), &GlyphConfig::default()).unwrap_err();
        assert!(
            e.to_string().contains("not a generated glyph dataset"),
            "{e}"
        );
        assert!(d.path().join("precious.txt").exists());
    }
}
