//! A folder per class, for users' own data:
//!
//! ```text
//! root/<class name>/<image>.{jpg,jpeg,png}
//! ```
//! Classes are the sub-folders in name order; images are taken in name order within
//! each (so ids, and therefore shuffles, are reproducible). Other files are ignored.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{DataError, ImageDataset, ImageRecord, Result};

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| DataError::io(dir, err)))
        .collect::<Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}

/// Loads `root/<class>/<image>`; a class folder without images is an error (it would
/// be a class with no example).
pub fn load(root: impl AsRef<Path>) -> Result<ImageDataset> {
    let root = root.as_ref();
    let mut class_names = Vec::new();
    let mut records = Vec::new();
    for class_dir in sorted_entries(root)? {
        if !class_dir.is_dir() {
            continue;
        }
        let name = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let class = class_names.len() as u32;
        let before = records.len();
        for file in sorted_entries(&class_dir)? {
            if file.is_file() && is_image(&file) {
                let rel = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
                records.push(ImageRecord {
                    id: records.len() as u32 + 1,
                    path: rel,
                    class,
                });
            }
        }
        if records.len() == before {
            return Err(DataError::Inconsistent {
                path: class_dir,
                message: "class folder without .jpg/.jpeg/.png images".into(),
            });
        }
        class_names.push(name);
    }
    if class_names.is_empty() {
        return Err(DataError::Inconsistent {
            path: root.to_path_buf(),
            message: "no class folder (expected root/<class>/<image>)".into(),
        });
    }
    Ok(ImageDataset {
        root: root.to_path_buf(),
        images_dir: root.to_path_buf(),
        records,
        class_names,
    })
}

/// Every image under `root` (`.jpg`, `.jpeg`, `.png`, in sub-folders at any depth), for
/// embedding images that are not a training dataset. Records are in path order; each
/// image's class is its folder (relative to `root`), classes in path order, named by
/// the relative folder (`.` for `root` itself): `root/<class>/<image>` gives the classes
/// of [`load`], a flat folder one class. No image at all is an error.
pub fn load_tree(root: impl AsRef<Path>) -> Result<ImageDataset> {
    let root = root.as_ref();
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in sorted_entries(&dir)? {
            if entry.is_dir() {
                pending.push(entry);
            } else if entry.is_file() && is_image(&entry) {
                files.push(entry.strip_prefix(root).unwrap_or(&entry).to_path_buf());
            }
        }
    }
    if files.is_empty() {
        return Err(DataError::Inconsistent {
            path: root.to_path_buf(),
            message: "no .jpg/.jpeg/.png image in it or its sub-folders".into(),
        });
    }
    files.sort();
    let folder_of = |f: &Path| f.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut folders: Vec<PathBuf> = files.iter().map(|f| folder_of(f)).collect();
    folders.sort();
    folders.dedup();
    let records = files
        .into_iter()
        .enumerate()
        .map(|(i, path)| {
            let class = folders.binary_search(&folder_of(&path)).unwrap_or(0) as u32;
            ImageRecord {
                id: i as u32 + 1,
                path,
                class,
            }
        })
        .collect();
    let class_names = folders
        .iter()
        .map(|f| match f.as_os_str().is_empty() {
            true => ".".to_string(),
            false => f.to_string_lossy().replace('\\', "/"),
        })
        .collect();
    Ok(ImageDataset {
        root: root.to_path_buf(),
        images_dir: root.to_path_buf(),
        records,
        class_names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_of_images_in_path_order_with_a_class_per_folder() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "z.png",
            "b/2.jpg",
            "b/1.JPEG",
            "b/deep/er/x.png",
            "a/notes.txt",
            "a/q.png",
            "c/README",
        ] {
            let p = d.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"").unwrap();
        }
        let ds = load_tree(d.path()).unwrap();
        let paths: Vec<String> = ds
            .records
            .iter()
            .map(|r| r.path.display().to_string())
            .collect();
        assert_eq!(
            paths,
            vec!["a/q.png", "b/1.JPEG", "b/2.jpg", "b/deep/er/x.png", "z.png"]
        );
        assert_eq!(ds.class_names, vec![".", "a", "b", "b/deep/er"]);
        let classes: Vec<u32> = ds.records.iter().map(|r| r.class).collect();
        assert_eq!(classes, vec![1, 2, 2, 3, 0]);
        assert_eq!(
            ds.records.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        // A class-folder layout gets the classes `load` gives it.
        let f = tempfile::tempdir().unwrap();
        for c in ["dog", "cat"] {
            fs::create_dir(f.path().join(c)).unwrap();
            fs::write(f.path().join(c).join("1.png"), b"").unwrap();
        }
        let (tree, classes) = (load_tree(f.path()).unwrap(), load(f.path()).unwrap());
        assert_eq!(tree.class_names, classes.class_names);
        assert_eq!(tree.records, classes.records);

        let empty = tempfile::tempdir().unwrap();
        fs::create_dir(empty.path().join("sub")).unwrap();
        let e = load_tree(empty.path()).unwrap_err().to_string();
        assert!(e.contains("no .jpg/.jpeg/.png image"), "{e}");
        assert!(load_tree(empty.path().join("missing")).is_err());
    }

    #[test]
    fn classes_and_images_in_name_order() {
        let d = tempfile::tempdir().unwrap();
        for (c, files) in [
            ("b_cat", vec!["2.PNG", "1.jpg", "notes.txt"]),
            ("a_dog", vec!["x.jpeg"]),
        ] {
            fs::create_dir(d.path().join(c)).unwrap();
            for f in files {
                fs::write(d.path().join(c).join(f), b"").unwrap();
            }
        }
        fs::write(d.path().join("README"), b"").unwrap();
        let ds = load(d.path()).unwrap();
        assert_eq!(ds.class_names, vec!["a_dog", "b_cat"]);
        let paths: Vec<String> = ds
            .records
            .iter()
            .map(|r| r.path.display().to_string())
            .collect();
        assert_eq!(paths, vec!["a_dog/x.jpeg", "b_cat/1.jpg", "b_cat/2.PNG"]);
        assert_eq!(
            ds.records.iter().map(|r| r.class).collect::<Vec<_>>(),
            vec![0, 1, 1]
        );
        fs::create_dir(d.path().join("c_empty")).unwrap();
        let e = load(d.path()).unwrap_err().to_string();
        assert!(e.contains("c_empty") && e.contains("without"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(load(empty.path())
            .unwrap_err()
            .to_string()
            .contains("no class folder"));
        assert!(load(empty.path().join("missing")).is_err());
    }
}
