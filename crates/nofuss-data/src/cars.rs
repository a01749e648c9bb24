//! The Cars196 layout (Krause et al. 2013), read from its MATLAB annotation file.
//!
//! ```text
//! root/
//!   cars_annos.mat   struct array `annotations` (relative_im_path, bbox_x1, bbox_y1,
//!                    bbox_x2, bbox_y2, class, test) and cell array `class_names`
//!   car_ims/000001.jpg ... 016185.jpg
//! ```
//! The literature's zero-shot split is by class: 1-98 for training (8,054 images), 99-196
//! for testing (8,131), which `ZeroShotSplit::Halves` reproduces. The file's own `test`
//! flag belongs to the classification benchmark and is not used for that split; it is
//! kept in [`Loaded::classification_test`].

use std::path::{Path, PathBuf};

use crate::mat::{self, MatValue};
pub use crate::BBox;
use crate::{DataError, ImageDataset, ImageRecord, Result};

/// The annotation file's name.
pub const ANNOTATIONS: &str = "cars_annos.mat";
/// Classes of the full dataset.
pub const CLASSES: usize = 196;
/// Images of the full dataset.
pub const IMAGES: usize = 16_185;
/// Training images of the zero-shot split (classes 1-98).
pub const TRAIN_IMAGES: usize = 8_054;
/// Test images of the zero-shot split (classes 99-196).
pub const TEST_IMAGES: usize = 8_131;

/// The box fields of `annotations`, in [`BBox`] order.
const BOX_FIELDS: [&str; 4] = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"];

/// A loaded Cars196 dataset.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// All images, ids 1..=N in file order, classes 0-based.
    pub dataset: ImageDataset,
    /// Bounding box of each record.
    pub boxes: Vec<BBox>,
    /// The file's `test` flag of each record (the classification split).
    pub classification_test: Vec<bool>,
}

impl Loaded {
    /// Differences from the published counts (empty for the complete dataset).
    pub fn count_warnings(&self) -> Vec<String> {
        let ds = &self.dataset;
        let half = ds.num_classes() / 2;
        let train = ds
            .records
            .iter()
            .filter(|r| (r.class as usize) < half)
            .count();
        let mut w = Vec::new();
        for (what, got, want) in [
            ("classes", ds.num_classes(), CLASSES),
            ("images", ds.records.len(), IMAGES),
            ("training images (classes 1-98)", train, TRAIN_IMAGES),
            (
                "test images (classes 99-196)",
                ds.records.len() - train,
                TEST_IMAGES,
            ),
        ] {
            if got != want {
                w.push(format!(
                    "Cars196: {got} {what}, the published dataset has {want}"
                ));
            }
        }
        w
    }
}

/// Reads `root/cars_annos.mat`. Images are not opened here; a missing one is reported
/// when it is decoded.
pub fn load(root: impl AsRef<Path>) -> Result<Loaded> {
    let root = root.as_ref();
    crate::dataset::check_layout(root, ANNOTATIONS, "Cars196", "cars_annos.mat, car_ims/")?;
    let path = root.join(ANNOTATIONS);
    let file = mat::read(&path)?;
    let bad = |message: String| DataError::Inconsistent {
        path: path.clone(),
        message,
    };
    let ann = file
        .get("annotations")
        .ok_or_else(|| bad("no variable `annotations`".into()))?;
    let MatValue::Struct { fields, items, .. } = ann else {
        return Err(bad(format!(
            "`annotations` is a {}, not a struct array",
            ann.kind()
        )));
    };
    let col = |name: &str| {
        fields
            .iter()
            .position(|f| f == name)
            .ok_or_else(|| bad(format!("`annotations` has no field `{name}`")))
    };
    let (f_path, f_class, f_test) = (col("relative_im_path")?, col("class")?, col("test")?);
    let f_box = BOX_FIELDS
        .iter()
        .map(|n| col(n))
        .collect::<Result<Vec<usize>>>()?;

    let names = file
        .get("class_names")
        .ok_or_else(|| bad("no variable `class_names`".into()))?;
    let MatValue::Cell {
        items: name_cells, ..
    } = names
    else {
        return Err(bad(format!(
            "`class_names` is a {}, not a cell array",
            names.kind()
        )));
    };
    let class_names = name_cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.as_str()
                .ok_or_else(|| bad(format!("class_names{{{}}} is not a string", i + 1)))
        })
        .collect::<Result<Vec<String>>>()?;
    if class_names.is_empty() {
        return Err(bad("`class_names` is empty".into()));
    }

    let mut records = Vec::with_capacity(items.len());
    let mut boxes = Vec::with_capacity(items.len());
    let mut flags = Vec::with_capacity(items.len());
    for (e, row) in items.iter().enumerate() {
        let at = |f: &str| format!("annotations({}).{f}", e + 1);
        let whole = |f: usize, name: &str| -> Result<u32> {
            let v = row[f]
                .as_scalar()
                .ok_or_else(|| bad(format!("{} is not a number", at(name))))?;
            if v.fract() != 0.0 || !(0.0..=u32::MAX as f64).contains(&v) {
                return Err(bad(format!("{} = {v} is not a whole number", at(name))));
            }
            Ok(v as u32)
        };
        let rel = row[f_path]
            .as_str()
            .ok_or_else(|| bad(format!("{} is not a string", at("relative_im_path"))))?;
        let rel = PathBuf::from(rel);
        if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
            return Err(bad(format!(
                "{} = {} leaves the dataset folder",
                at("relative_im_path"),
                rel.display()
            )));
        }
        let class = whole(f_class, "class")?;
        if class == 0 || class as usize > class_names.len() {
            return Err(bad(format!(
                "{} = {class} outside 1..={}",
                at("class"),
                class_names.len()
            )));
        }
        let mut b = [0u32; 4];
        for (slot, (&f, name)) in b.iter_mut().zip(f_box.iter().zip(BOX_FIELDS)) {
            *slot = whole(f, name)?;
        }
        if b[2] < b[0] || b[3] < b[1] {
            return Err(bad(format!("{}: empty bounding box {b:?}", at("bbox_x1"))));
        }
        boxes.push(BBox {
            x1: b[0],
            y1: b[1],
            x2: b[2],
            y2: b[3],
        });
        flags.push(whole(f_test, "test")? != 0);
        records.push(ImageRecord {
            id: e as u32 + 1,
            path: rel,
            class: class - 1,
        });
    }
    if records.is_empty() {
        return Err(bad("`annotations` is empty".into()));
    }
    Ok(Loaded {
        dataset: ImageDataset {
            root: root.to_path_buf(),
            images_dir: root.to_path_buf(),
            records,
            class_names,
        },
        boxes,
        classification_test: flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ZeroShotSplit;

    fn fixture_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let src = nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR"))
            .join("mat")
            .join("cars_annos_small.mat");
        std::fs::copy(src, dir.path().join(ANNOTATIONS)).unwrap();
        dir
    }

    #[test]
    fn loads_the_scipy_written_annotations() {
        let dir = fixture_root();
        let l = load(dir.path()).unwrap();
        let ds = &l.dataset;
        assert_eq!(ds.records.len(), 7);
        assert_eq!(ds.num_classes(), 6);
        assert_eq!(ds.class_names[0], "AM General Hummer SUV 2000");
        assert_eq!(ds.records[0].path, PathBuf::from("car_ims/000001.jpg"));
        // The script gives image i (0-based) the class i % 6 + 1 and test flag i % 2.
        for (i, r) in ds.records.iter().enumerate() {
            assert_eq!(r.class, (i % 6) as u32);
            assert_eq!(r.id, i as u32 + 1);
            assert_eq!(l.classification_test[i], i % 2 == 1);
            let b = l.boxes[i];
            assert!(b.x2 > b.x1 && b.y2 > b.y1);
        }
        let (train, test) = ZeroShotSplit::Halves.apply(ds).unwrap();
        assert_eq!(train.num_classes(), 3);
        assert_eq!(train.len() + test.len(), 7);
        let w = l.count_warnings();
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].contains("6 classes"));
    }

    #[test]
    fn wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains(ANNOTATIONS), "{e}");
        // A MAT-file without the expected variables.
        std::fs::copy(
            nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR"))
                .join("mat")
                .join("kitchen_sink.mat"),
            dir.path().join(ANNOTATIONS),
        )
        .unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no variable `annotations`"), "{e}");
        // A malformed entry: its place in the file is named.
        std::fs::copy(
            nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR"))
                .join("mat")
                .join("cars_annos_bad_class.mat"),
            dir.path().join(ANNOTATIONS),
        )
        .unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("annotations(3).class = 0 outside 1..=6"), "{e}");
    }
}
