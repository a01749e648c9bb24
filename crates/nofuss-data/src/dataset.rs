use std::path::{Path, PathBuf};

use crate::{DataError, Result};

/// One image of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// The dataset's own image id (1-based in CUB).
    pub id: u32,
    /// Path relative to [`ImageDataset::images_dir`].
    pub path: PathBuf,
    /// 0-based class index into [`ImageDataset::class_names`].
    pub class: u32,
}

/// An object's bounding box in pixels, 1-based and inclusive (the convention of the
/// Cars196 and CUB-200-2011 annotation files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BBox {
    /// Left column.
    pub x1: u32,
    /// Top row.
    pub y1: u32,
    /// Right column.
    pub x2: u32,
    /// Bottom row.
    pub y2: u32,
}

impl BBox {
    /// `(left, top, width, height)` in 0-based pixels, clipped to a `width` x `height`
    /// image; the whole image if nothing of the box is inside.
    pub fn clip(&self, width: u32, height: u32) -> (u32, u32, u32, u32) {
        let x0 = self.x1.saturating_sub(1);
        let y0 = self.y1.saturating_sub(1);
        let x1 = self.x2.min(width);
        let y1 = self.y2.min(height);
        if x1 <= x0 || y1 <= y0 {
            return (0, 0, width, height);
        }
        (x0, y0, x1 - x0, y1 - y0)
    }
}

/// A labelled image dataset: records sorted by id and the class names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDataset {
    /// The dataset's root directory.
    pub root: PathBuf,
    /// Where record paths are relative to.
    pub images_dir: PathBuf,
    /// All images, sorted by id.
    pub records: Vec<ImageRecord>,
    /// Class names, indexed by class.
    pub class_names: Vec<String>,
}

impl ImageDataset {
    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
}

/// A subset of a dataset's images with labels renumbered `0..num_classes()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    /// Indices into [`ImageDataset::records`].
    pub indices: Vec<usize>,
    /// Label of each selected image, `0..num_classes()`, in the order of `indices`.
    pub labels: Vec<u32>,
    /// The original class index of each new label.
    pub classes: Vec<u32>,
}

impl Subset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the subset holds no image.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Every image of `ds`, labels its classes.
    pub fn all(ds: &ImageDataset) -> Self {
        let classes: Vec<u32> = (0..ds.num_classes() as u32).collect();
        Self::of_classes(ds, &classes)
    }

    /// The images of the given original classes (in the given order), relabelled.
    pub fn of_classes(ds: &ImageDataset, classes: &[u32]) -> Self {
        let mut new_label = vec![u32::MAX; ds.num_classes()];
        for (i, &c) in classes.iter().enumerate() {
            new_label[c as usize] = i as u32;
        }
        let (indices, labels) = ds
            .records
            .iter()
            .enumerate()
            .filter(|(_, r)| new_label[r.class as usize] != u32::MAX)
            .map(|(i, r)| (i, new_label[r.class as usize]))
            .unzip();
        Self {
            indices,
            labels,
            classes: classes.to_vec(),
        }
    }
}

/// How classes are divided between training and the zero-shot test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroShotSplit {
    /// The literature's split: the first half of the classes (in class order) for
    /// training, the second half for testing (CUB-200-2011: 1-100 / 101-200; Cars196:
    /// 1-98 / 99-196). With an odd count the test half gets the extra class.
    #[default]
    Halves,
    /// The first `n` classes for training, the rest for testing.
    FirstN(usize),
}

impl ZeroShotSplit {
    /// Splits `ds` into (train, test) subsets with disjoint classes.
    pub fn apply(self, ds: &ImageDataset) -> Result<(Subset, Subset)> {
        let n = ds.num_classes();
        let cut = match self {
            Self::Halves => n / 2,
            Self::FirstN(k) => k,
        };
        if n < 2 || cut == 0 || cut >= n {
            return Err(DataError::Config(format!(
                "a zero-shot split needs classes on both sides: {n} classes, {cut} for training"
            )));
        }
        let train: Vec<u32> = (0..cut as u32).collect();
        let test: Vec<u32> = (cut as u32..n as u32).collect();
        let (a, b) = (
            Subset::of_classes(ds, &train),
            Subset::of_classes(ds, &test),
        );
        for (s, name) in [(&a, "training"), (&b, "test")] {
            if s.is_empty() {
                return Err(DataError::Config(format!(
                    "the {name} split holds no image"
                )));
            }
        }
        Ok((a, b))
    }
}

impl Subset {
    /// Splits this subset's classes into (fit, validation) for model selection that
    /// never looks at the test classes: the first classes (in label order) are kept for
    /// fitting, the last `val_classes` become the validation set (CUB: 1-50 / 51-100
    /// with `val_classes = 50`). Both keep `classes` in terms of the dataset.
    pub fn hold_out_classes(&self, val_classes: usize) -> Result<(Subset, Subset)> {
        let n = self.num_classes();
        if val_classes == 0 || val_classes >= n {
            return Err(DataError::Config(format!(
                "a validation split needs classes on both sides: {n} training classes, {val_classes} held out"
            )));
        }
        let cut = (n - val_classes) as u32;
        let part = |keep: &dyn Fn(u32) -> bool, first: u32| {
            let (indices, labels) = self
                .indices
                .iter()
                .zip(&self.labels)
                .filter(|&(_, &l)| keep(l))
                .map(|(&i, &l)| (i, l - first))
                .unzip();
            Subset {
                indices,
                labels,
                classes: self
                    .classes
                    .iter()
                    .enumerate()
                    .filter(|&(l, _)| keep(l as u32))
                    .map(|(_, &c)| c)
                    .collect(),
            }
        };
        Ok((part(&|l| l < cut, 0), part(&|l| l >= cut, cut)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(classes: &[u32]) -> ImageDataset {
        ImageDataset {
            root: "r".into(),
            images_dir: "r/images".into(),
            records: classes
                .iter()
                .enumerate()
                .map(|(i, &c)| ImageRecord {
                    id: i as u32 + 1,
                    path: format!("{i}.png").into(),
                    class: c,
                })
                .collect(),
            class_names: (0..=*classes.iter().max().unwrap())
                .map(|c| format!("c{c}"))
                .collect(),
        }
    }

    #[test]
    fn halves_are_disjoint_and_relabelled() {
        let d = ds(&[0, 1, 2, 3, 3, 2, 1, 0, 4]);
        let (tr, te) = ZeroShotSplit::Halves.apply(&d).unwrap();
        assert_eq!(tr.classes, vec![0, 1]);
        assert_eq!(te.classes, vec![2, 3, 4]);
        assert_eq!(tr.indices, vec![0, 1, 6, 7]);
        assert_eq!(tr.labels, vec![0, 1, 1, 0]);
        assert_eq!(te.labels, vec![0, 1, 1, 0, 2]);
    }

    #[test]
    fn validation_classes_come_from_the_training_side() {
        let d = ds(&[0, 1, 2, 3, 3, 2, 1, 0, 4, 5]);
        let (tr, te) = ZeroShotSplit::Halves.apply(&d).unwrap();
        let (fit, val) = tr.hold_out_classes(1).unwrap();
        assert_eq!(fit.classes, vec![0, 1]);
        assert_eq!(val.classes, vec![2]);
        assert_eq!(val.labels, vec![0, 0]);
        assert_eq!(val.indices, vec![2, 5]);
        assert!(val.classes.iter().all(|c| !te.classes.contains(c)));
        assert!(tr.hold_out_classes(3).is_err());
        assert!(tr.hold_out_classes(0).is_err());
    }

    #[test]
    fn impossible_splits_are_errors() {
        assert!(ZeroShotSplit::Halves.apply(&ds(&[0, 0])).is_err());
        assert!(ZeroShotSplit::FirstN(3).apply(&ds(&[0, 1, 2])).is_err());
        assert_eq!(
            ZeroShotSplit::FirstN(1)
                .apply(&ds(&[0, 1, 2]))
                .unwrap()
                .1
                .classes,
            vec![1, 2]
        );
    }
}

/// Checks that `root` is a dataset directory of the layout `layout` (described as
/// `expects`), recognised by its file `key`: a missing directory is an I/O error, and a
/// directory without `key` is named with what it lacks, and with the sub-folder that has
/// it where one does (the archives unpack into one, e.g. `CUB_200_2011/`).
pub(crate) fn check_layout(root: &Path, key: &str, layout: &str, expects: &str) -> Result<()> {
    if !root.is_dir() {
        return Err(DataError::io(
            root,
            std::io::Error::new(std::io::ErrorKind::NotFound, "dataset directory not found"),
        ));
    }
    if root.join(key).is_file() {
        return Ok(());
    }
    let mut subs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| DataError::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(key).is_file())
        .collect();
    subs.sort();
    let message = match subs.first() {
        Some(sub) => format!(
            "no {key} here, but {} has one: pass that folder as the dataset root (--data-dir)",
            sub.display()
        ),
        None => format!("no {key}: not the {layout} layout ({expects})"),
    };
    Err(DataError::Inconsistent {
        path: root.to_path_buf(),
        message,
    })
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn a_missing_key_file_is_named_with_the_folder_that_has_it() {
        let d = tempfile::tempdir().unwrap();
        let ok = |p: &Path| check_layout(p, "k.txt", "test", "k.txt, images/");
        let e = ok(&d.path().join("missing")).unwrap_err().to_string();
        assert!(e.ends_with("missing: dataset directory not found"), "{e}");
        let e = ok(d.path()).unwrap_err().to_string();
        assert!(
            e.ends_with("no k.txt: not the test layout (k.txt, images/)"),
            "{e}"
        );
        let sub = d.path().join("Unpacked");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("k.txt"), "").unwrap();
        let e = ok(d.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("no k.txt here, but {} has one", sub.display())),
            "{e}"
        );
        assert!(ok(&sub).is_ok());
    }
}
