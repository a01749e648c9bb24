//! The Stanford Online Products layout (Song et al. 2016).
//!
//! ```text
//! root/
//!   Ebay_train.txt   image_id class_id super_class_id path      (header line, then one image a line)
//!   Ebay_test.txt    same columns; class ids continue after the training classes
//!   bicycle_final/111085122871_0.JPG ...
//! ```
//! The literature's zero-shot split is the files' own: 11,318 training classes (59,551
//! images) and 11,316 test classes (60,502 images). [`load`] returns both files as one
//! dataset whose first [`TRAIN_CLASSES`] classes are the training ones, so
//! `ZeroShotSplit::FirstN(n_train)` (see [`Loaded::split`]) reproduces the split.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::{DataError, ImageDataset, ImageRecord, Result, ZeroShotSplit};

/// Training list file name.
pub const TRAIN_LIST: &str = "Ebay_train.txt";
/// Test list file name.
pub const TEST_LIST: &str = "Ebay_test.txt";
/// Training classes of the full dataset.
pub const TRAIN_CLASSES: usize = 11_318;
/// Test classes of the full dataset.
pub const TEST_CLASSES: usize = 11_316;
/// Training images of the full dataset.
pub const TRAIN_IMAGES: usize = 59_551;
/// Test images of the full dataset.
pub const TEST_IMAGES: usize = 60_502;

/// A loaded SOP dataset with its split.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// All images; classes `0..n_train` are the training classes.
    pub dataset: ImageDataset,
    /// Number of training classes (those of `Ebay_train.txt`).
    pub n_train: usize,
}

impl Loaded {
    /// The files' own zero-shot split.
    pub fn split(&self) -> ZeroShotSplit {
        ZeroShotSplit::FirstN(self.n_train)
    }

    /// Differences from the published counts (empty for the complete dataset), to show
    /// to the user: a partial download or a modified list is then visible.
    pub fn count_warnings(&self) -> Vec<String> {
        let n_test = self.dataset.num_classes() - self.n_train;
        let train_images = self
            .dataset
            .records
            .iter()
            .filter(|r| (r.class as usize) < self.n_train)
            .count();
        let test_images = self.dataset.records.len() - train_images;
        let mut w = Vec::new();
        for (what, got, want) in [
            ("training classes", self.n_train, TRAIN_CLASSES),
            ("training images", train_images, TRAIN_IMAGES),
            ("test classes", n_test, TEST_CLASSES),
            ("test images", test_images, TEST_IMAGES),
        ] {
            if got != want {
                w.push(format!(
                    "Stanford Online Products: {got} {what}, the published dataset has {want}"
                ));
            }
        }
        w
    }
}

struct Row {
    line: usize,
    id: u32,
    class: u32,
    path: PathBuf,
}

fn read_list(path: &Path) -> Result<Vec<Row>> {
    let text = fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| DataError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let cols: Vec<&str> = line.split_whitespace().collect();
        if line_no == 1 && cols.first() == Some(&"image_id") {
            continue;
        }
        if cols.len() != 4 {
            return Err(err(format!(
                "expected 'image_id class_id super_class_id path', got '{line}'"
            )));
        }
        let num = |s: &str, what: &str| -> Result<u32> {
            s.parse::<u32>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| err(format!("{what} '{s}' is not a positive integer")))
        };
        let id = num(cols[0], "image_id")?;
        let class = num(cols[1], "class_id")?;
        num(cols[2], "super_class_id")?;
        let rel = PathBuf::from(cols[3]);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(err(format!(
                "path {} leaves the dataset folder",
                rel.display()
            )));
        }
        rows.push(Row {
            line: line_no,
            id,
            class,
            path: rel,
        });
    }
    if rows.is_empty() {
        return Err(DataError::Inconsistent {
            path: path.to_path_buf(),
            message: "no image listed".into(),
        });
    }
    Ok(rows)
}

/// Loads `Ebay_train.txt` and `Ebay_test.txt` from `root`. Checks that image ids are
/// unique, that the two files share no class, and that paths stay inside `root`; class
/// ids need not be contiguous (they are renumbered in increasing order, training file
/// first). Image files are opened when decoded.
pub fn load(root: impl AsRef<Path>) -> Result<Loaded> {
    let root = root.as_ref();
    crate::dataset::check_layout(
        root,
        TRAIN_LIST,
        "Stanford Online Products",
        "Ebay_train.txt, Ebay_test.txt and the image folders they list",
    )?;
    let train_path = root.join(TRAIN_LIST);
    let test_path = root.join(TEST_LIST);
    let train = read_list(&train_path)?;
    let test = read_list(&test_path)?;
    let mut class_ids: Vec<u32> = train.iter().map(|r| r.class).collect();
    class_ids.sort_unstable();
    class_ids.dedup();
    let n_train = class_ids.len();
    let mut test_ids: Vec<u32> = test.iter().map(|r| r.class).collect();
    test_ids.sort_unstable();
    test_ids.dedup();
    if let Some(r) = test
        .iter()
        .find(|r| class_ids.binary_search(&r.class).is_ok())
    {
        return Err(DataError::Parse {
            path: test_path,
            line: r.line,
            message: format!(
                "class {} is also a training class: the zero-shot split needs disjoint classes",
                r.class
            ),
        });
    }
    class_ids.extend(test_ids);
    let index: HashMap<u32, u32> = class_ids
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, i as u32))
        .collect();
    let mut names = vec![String::new(); class_ids.len()];
    let mut seen = std::collections::HashSet::new();
    let mut records = Vec::with_capacity(train.len() + test.len());
    for (file, rows) in [(&train_path, &train), (&test_path, &test)] {
        for r in rows.iter() {
            if !seen.insert(r.id) {
                return Err(DataError::Parse {
                    path: file.clone(),
                    line: r.line,
                    message: format!("image id {} is listed twice", r.id),
                });
            }
            let class = index[&r.class];
            if names[class as usize].is_empty() {
                let dir = r
                    .path
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                names[class as usize] = format!("{dir}/{}", r.class);
            }
            records.push(ImageRecord {
                id: r.id,
                path: r.path.clone(),
                class,
            });
        }
    }
    records.sort_by_key(|r| r.id);
    Ok(Loaded {
        dataset: ImageDataset {
            root: root.to_path_buf(),
            images_dir: root.to_path_buf(),
            records,
            class_names: names,
        },
        n_train,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) {
        fs::write(dir.join(name), body).unwrap();
    }

    const HEADER: &str = "image_id class_id super_class_id path\n";

    #[test]
    fn loads_both_lists_with_the_files_split() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            TRAIN_LIST,
            &format!("{HEADER}1 1 1 bicycle_final/a_0.JPG\n2 1 1 bicycle_final/a_1.JPG\n3 2 2 chair_final/b_0.JPG\n"),
        );
        write(
            d.path(),
            TEST_LIST,
            &format!("{HEADER}4 5 1 bicycle_final/c_0.JPG\n5 3 2 chair_final/d_0.JPG\n"),
        );
        let l = load(d.path()).unwrap();
        assert_eq!(l.n_train, 2);
        assert_eq!(l.dataset.num_classes(), 4);
        assert_eq!(l.dataset.class_names[0], "bicycle_final/1");
        // Test classes renumbered in increasing id order: 3 -> 2, 5 -> 3.
        let classes: Vec<u32> = l.dataset.records.iter().map(|r| r.class).collect();
        assert_eq!(classes, vec![0, 0, 1, 3, 2]);
        let (train, test) = l.split().apply(&l.dataset).unwrap();
        assert_eq!((train.len(), test.len()), (3, 2));
        let w = l.count_warnings();
        assert_eq!(w.len(), 4);
        assert!(w[0].contains("2 training classes, the published dataset has 11318"));
    }

    #[test]
    fn malformed_lists_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            TRAIN_LIST,
            &format!("{HEADER}1 1 1 a/x.JPG\n2 one 1 a/y.JPG\n"),
        );
        write(d.path(), TEST_LIST, &format!("{HEADER}3 2 1 b/z.JPG\n"));
        let e = load(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("Ebay_train.txt:3") && e.contains("class_id 'one'"),
            "{e}"
        );
        write(d.path(), TRAIN_LIST, &format!("{HEADER}1 1 1 a/x.JPG\n"));
        write(d.path(), TEST_LIST, &format!("{HEADER}3 1 1 b/z.JPG\n"));
        let e = load(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("Ebay_test.txt:2") && e.contains("also a training class"),
            "{e}"
        );
        write(d.path(), TEST_LIST, &format!("{HEADER}1 2 1 b/z.JPG\n"));
        let e = load(d.path()).unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
        write(d.path(), TEST_LIST, &format!("{HEADER}3 2 1 ../z.JPG\n"));
        assert!(load(d.path()).unwrap_err().to_string().contains("leaves"));
        fs::remove_file(d.path().join(TEST_LIST)).unwrap();
        assert!(load(d.path())
            .unwrap_err()
            .to_string()
            .contains("Ebay_test.txt"));
    }
}
