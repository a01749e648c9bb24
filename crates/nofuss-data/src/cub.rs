//! The CUB-200-2011 on-disk layout.
//!
//! ```text
//! root/
//!   images.txt              <image_id> <relative/path.jpg>     (ids 1-based)
//!   image_class_labels.txt  <image_id> <class_id>              (class ids 1-based)
//!   classes.txt             <class_id> <class_name>
//!   images/<class_dir>/<file>
//! ```
//! `bounding_boxes.txt` (`<image_id> <x> <y> <width> <height>`) is read on request by
//! [`load_boxes`]; the other files of the real dataset (parts, the train/test list of the
//! classification task) are not needed for the zero-shot protocol and are ignored.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{BBox, DataError, ImageDataset, ImageRecord, Result};

/// Images list file name.
pub const IMAGES: &str = "images.txt";
/// Image-to-class file name.
pub const LABELS: &str = "image_class_labels.txt";
/// Class names file name.
pub const CLASSES: &str = "classes.txt";
/// Image folder name.
pub const IMAGES_DIR: &str = "images";
/// Bounding boxes file name.
pub const BOXES: &str = "bounding_boxes.txt";

/// Reads `<id> <rest>` lines; blank lines are skipped; `rest` must not be empty.
fn read_pairs(path: &Path) -> Result<Vec<(usize, u32, String)>> {
    let text = fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parse_err = |message: String| DataError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let (id, rest) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| parse_err(format!("expected '<id> <value>', got '{line}'")))?;
        let id: u32 = id
            .parse()
            .map_err(|_| parse_err(format!("'{id}' is not a positive integer id")))?;
        if id == 0 {
            return Err(parse_err("ids are 1-based; found 0".into()));
        }
        let rest = rest.trim();
        if rest.is_empty() {
            return Err(parse_err("missing value after the id".into()));
        }
        out.push((line_no, id, rest.to_string()));
    }
    Ok(out)
}

/// The bounding box of every record of `ds` (loaded by [`load`] from `root`), from
/// `root/bounding_boxes.txt`: pixel rectangles `x y width height` from the top-left
/// corner, turned into 1-based inclusive [`BBox`]es covering every touched pixel. Every
/// image needs exactly one box; a malformed line is an error naming it.
pub fn load_boxes(root: impl AsRef<Path>, ds: &ImageDataset) -> Result<Vec<BBox>> {
    let path = root.as_ref().join(BOXES);
    let mut by_id: HashMap<u32, BBox> = HashMap::new();
    for (line, id, rest) in read_pairs(&path)? {
        let bad = |message: String| DataError::Parse {
            path: path.clone(),
            line,
            message,
        };
        let v: Vec<f64> = rest
            .split_whitespace()
            .map(|t| {
                t.parse::<f64>()
                    .map_err(|_| bad(format!("'{t}' is not a number")))
            })
            .collect::<Result<_>>()?;
        let [x, y, w, h] = v[..] else {
            return Err(bad(format!(
                "expected '<id> <x> <y> <width> <height>', got {} values",
                v.len()
            )));
        };
        let ok = x >= 0.0 && y >= 0.0 && w > 0.0 && h > 0.0;
        if !(ok && [x, y, w, h].iter().all(|v| v.is_finite())) {
            return Err(bad(format!(
                "not a box: x {x}, y {y}, width {w}, height {h}"
            )));
        }
        let b = BBox {
            x1: x.floor() as u32 + 1,
            y1: y.floor() as u32 + 1,
            x2: (x + w).ceil() as u32,
            y2: (y + h).ceil() as u32,
        };
        if by_id.insert(id, b).is_some() {
            return Err(bad(format!("a second box for image {id}")));
        }
    }
    ds.records
        .iter()
        .map(|r| {
            by_id
                .get(&r.id)
                .copied()
                .ok_or_else(|| DataError::Inconsistent {
                    path: path.clone(),
                    message: format!("no box for image {} ({})", r.id, r.path.display()),
                })
        })
        .collect()
}

/// Loads a dataset in the CUB-200-2011 layout from `root`.
///
/// Checks that ids are unique, that every image has exactly one label, that labels
/// name listed classes, that class ids run `1..=C`, and that image paths stay inside
/// the image folder. Image files themselves are opened when decoded.
pub fn load(root: impl AsRef<Path>) -> Result<ImageDataset> {
    let root = root.as_ref();
    crate::dataset::check_layout(
        root,
        CLASSES,
        "CUB-200-2011",
        "classes.txt, images.txt, image_class_labels.txt, images/<class>/<image>",
    )?;
    let classes_path = root.join(CLASSES);
    let mut class_names = Vec::new();
    for (line, id, name) in read_pairs(&classes_path)? {
        if id as usize != class_names.len() + 1 {
            return Err(DataError::Parse {
                path: classes_path,
                line,
                message: format!(
                    "class ids must run 1, 2, 3, ...; expected {}, found {id}",
                    class_names.len() + 1
                ),
            });
        }
        class_names.push(name);
    }
    if class_names.is_empty() {
        return Err(DataError::Inconsistent {
            path: classes_path,
            message: "no class listed".into(),
        });
    }

    let labels_path = root.join(LABELS);
    let mut label_of: HashMap<u32, u32> = HashMap::new();
    for (line, id, class) in read_pairs(&labels_path)? {
        let err = |message: String| DataError::Parse {
            path: labels_path.clone(),
            line,
            message,
        };
        let class: u32 = class
            .parse()
            .map_err(|_| err(format!("class '{class}' is not an integer")))?;
        if class == 0 || class as usize > class_names.len() {
            return Err(err(format!(
                "class {class} is not in {CLASSES} (1..={})",
                class_names.len()
            )));
        }
        if label_of.insert(id, class - 1).is_some() {
            return Err(err(format!("image {id} is labelled twice")));
        }
    }

    let images_path = root.join(IMAGES);
    let mut records = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (line, id, rel) in read_pairs(&images_path)? {
        let err = |message: String| DataError::Parse {
            path: images_path.clone(),
            line,
            message,
        };
        let rel = PathBuf::from(rel);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(err(format!(
                "path {} leaves the image folder",
                rel.display()
            )));
        }
        if !seen.insert(id) {
            return Err(err(format!("image id {id} is listed twice")));
        }
        let class = *label_of
            .get(&id)
            .ok_or_else(|| err(format!("image {id} has no line in {LABELS}")))?;
        records.push(ImageRecord {
            id,
            path: rel,
            class,
        });
    }
    if records.is_empty() {
        return Err(DataError::Inconsistent {
            path: images_path,
            message: "no image listed".into(),
        });
    }
    if let Some(extra) = label_of.keys().find(|id| !seen.contains(id)) {
        return Err(DataError::Inconsistent {
            path: labels_path,
            message: format!("image {extra} is labelled but not listed in {IMAGES}"),
        });
    }
    records.sort_by_key(|r| r.id);
    Ok(ImageDataset {
        root: root.to_path_buf(),
        images_dir: root.join(IMAGES_DIR),
        records,
        class_names,
    })
}

/// Differences from CUB-200-2011's published counts when `ds` has its 200 classes
/// (5,864 images in classes 1-100, 5,924 in 101-200); empty when they match or when
/// `ds` is another dataset in this layout.
pub fn count_warnings(ds: &ImageDataset) -> Vec<String> {
    if ds.num_classes() != 200 {
        return vec![];
    }
    let train = ds.records.iter().filter(|r| r.class < 100).count();
    let test = ds.records.len() - train;
    let mut w = Vec::new();
    for (what, got, want) in [("1-100", train, 5_864), ("101-200", test, 5_924)] {
        if got != want {
            w.push(format!(
                "CUB-200-2011: {got} images in classes {what}, the published dataset has {want}"
            ));
        }
    }
    w
}

/// Writes the three annotation files of `ds` into `root` (images are the caller's).
pub fn write_annotations(root: &Path, ds: &ImageDataset) -> Result<()> {
    let write = |name: &str, body: String| -> Result<()> {
        let path = root.join(name);
        let mut f = fs::File::create(&path).map_err(|e| DataError::io(&path, e))?;
        f.write_all(body.as_bytes())
            .map_err(|e| DataError::io(&path, e))
    };
    let classes: String = ds
        .class_names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{} {n}\n", i + 1))
        .collect();
    let images: String = ds
        .records
        .iter()
        .map(|r| format!("{} {}\n", r.id, r.path.display()))
        .collect();
    let labels: String = ds
        .records
        .iter()
        .map(|r| format!("{} {}\n", r.id, r.class + 1))
        .collect();
    write(CLASSES, classes)?;
    write(IMAGES, images)?;
    write(LABELS, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(classes: &str, images: &str, labels: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(CLASSES), classes).unwrap();
        fs::write(d.path().join(IMAGES), images).unwrap();
        fs::write(d.path().join(LABELS), labels).unwrap();
        d
    }

    #[test]
    fn counts_are_checked_for_the_200_class_dataset_only() {
        let mk = |classes: u32, per: u32| ImageDataset {
            root: "r".into(),
            images_dir: "r/images".into(),
            records: (0..classes * per)
                .map(|i| ImageRecord {
                    id: i + 1,
                    path: format!("{i}.jpg").into(),
                    class: i / per,
                })
                .collect(),
            class_names: (0..classes).map(|c| c.to_string()).collect(),
        };
        assert!(count_warnings(&mk(10, 3)).is_empty());
        let w = count_warnings(&mk(200, 2));
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("200 images in classes 1-100, the published dataset has 5864"));
    }

    #[test]
    fn loads_a_valid_layout() {
        let d = fixture(
            "1 001.A\n2 002.B\n",
            "2 002.B/x.png\n1 001.A/y.png\n\n",
            "1 1\n2 2\n",
        );
        let ds = load(d.path()).unwrap();
        assert_eq!(ds.class_names, vec!["001.A", "002.B"]);
        assert_eq!(
            ds.records[0],
            ImageRecord {
                id: 1,
                path: "001.A/y.png".into(),
                class: 0
            }
        );
        assert_eq!(ds.records[1].class, 1);
        assert_eq!(ds.images_dir, d.path().join("images"));
    }

    #[test]
    fn bounding_boxes_cover_the_touched_pixels_and_bad_lines_are_named() {
        let d = fixture("1 a\n2 b\n", "1 a/1.png\n2 b/2.png\n", "1 1\n2 2\n");
        let ds = load(d.path()).unwrap();
        fs::write(
            d.path().join(BOXES),
            "2 0.0 5.0 10.0 20.5\n1 60.0 27.0 325.0 304.0\n",
        )
        .unwrap();
        let b = load_boxes(d.path(), &ds).unwrap();
        assert_eq!(
            b[0],
            BBox {
                x1: 61,
                y1: 28,
                x2: 385,
                y2: 331
            }
        );
        assert_eq!(
            b[1],
            BBox {
                x1: 1,
                y1: 6,
                x2: 10,
                y2: 26
            }
        );
        for (text, want) in [
            ("1 1 2 3\n2 1 1 1 1\n", "bounding_boxes.txt:1: expected"),
            ("1 1 2 3 x\n", "'x' is not a number"),
            ("1 1 2 0 4\n2 1 1 1 1\n", "not a box"),
            ("1 1 1 1 1\n", "no box for image 2"),
            ("1 1 1 1 1\n1 1 1 1 1\n", "a second box for image 1"),
        ] {
            fs::write(d.path().join(BOXES), text).unwrap();
            let e = load_boxes(d.path(), &ds).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn round_trips_through_write() {
        let d = fixture("1 a\n2 b\n", "1 a/1.png\n2 b/2.png\n", "1 1\n2 2\n");
        let ds = load(d.path()).unwrap();
        let e = tempfile::tempdir().unwrap();
        write_annotations(e.path(), &ds).unwrap();
        let again = load(e.path()).unwrap();
        assert_eq!(again.records, ds.records);
        assert_eq!(again.class_names, ds.class_names);
    }

    fn err_of(classes: &str, images: &str, labels: &str) -> String {
        let d = fixture(classes, images, labels);
        load(d.path()).unwrap_err().to_string()
    }

    #[test]
    fn malformed_files_name_file_and_line() {
        let e = err_of("1 a\n2 b\n", "1 a/1.png\nx b/2.png\n", "1 1\n2 2\n");
        assert!(e.contains("images.txt:2") && e.contains("'x'"), "{e}");
        let e = err_of("1 a\n2 b\n", "1 a/1.png\n", "1 1\n1 2\n");
        assert!(
            e.contains("image_class_labels.txt:2") && e.contains("labelled twice"),
            "{e}"
        );
        let e = err_of("1 a\n3 b\n", "1 a/1.png\n", "1 1\n");
        assert!(e.contains("classes.txt:2"), "{e}");
        let e = err_of("1 a\n", "1 a/1.png\n", "1 7\n");
        assert!(e.contains("class 7 is not in classes.txt"), "{e}");
        let e = err_of("1 a\n", "1 a/1.png\n2 a/2.png\n", "1 1\n");
        assert!(
            e.contains("images.txt:2") && e.contains("no line in image_class_labels.txt"),
            "{e}"
        );
        let e = err_of("1 a\n", "1 ../../etc/passwd\n", "1 1\n");
        assert!(e.contains("leaves the image folder"), "{e}");
        let e = err_of("1 a\n", "1\n", "1 1\n");
        assert!(e.contains("images.txt:1"), "{e}");
        let e = err_of("1 a\n", "1 a/1.png\n", "1 1\n2 1\n");
        assert!(e.contains("not listed"), "{e}");
        let e = err_of("1 a\n", "0 a/1.png\n", "1 1\n");
        assert!(e.contains("1-based"), "{e}");
    }

    #[test]
    fn missing_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let e = load(d.path()).unwrap_err().to_string();
        assert!(e.contains("classes.txt"), "{e}");
        let e = load(d.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("not found"), "{e}");
    }
}
