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

#[cfg(test)]
mod tests {
    use super::*;

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
