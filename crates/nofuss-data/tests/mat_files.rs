//! The MAT-file reader against files written by scipy.io.savemat and read back by
//! scipy.io.loadmat (`tests/reference/mat_files.py`), and against damaged copies of them.

use std::path::PathBuf;

use nofuss_data::mat::{self, MatClass, MatValue};
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn fixtures() -> PathBuf {
    nofuss_tensor::fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("mat")
}

fn class_name(c: MatClass) -> &'static str {
    match c {
        MatClass::Double => "double",
        MatClass::Single => "single",
        MatClass::Int8 => "int8",
        MatClass::Uint8 => "uint8",
        MatClass::Int16 => "int16",
        MatClass::Uint16 => "uint16",
        MatClass::Int32 => "int32",
        MatClass::Uint32 => "uint32",
        MatClass::Int64 => "int64",
        MatClass::Uint64 => "uint64",
    }
}

/// Asserts that `v` is what scipy read, `want` in the script's neutral form.
fn check(v: &MatValue, want: &Value, at: &str) {
    let dims: Vec<usize> = want["dims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(v.dims(), dims.as_slice(), "{at}: dims");
    match (want["kind"].as_str().unwrap(), v) {
        ("char", MatValue::Char { text, .. }) => {
            assert_eq!(
                text.iter().collect::<String>(),
                want["text"].as_str().unwrap(),
                "{at}"
            );
        }
        (
            kind @ ("numeric" | "logical"),
            MatValue::Numeric {
                class,
                logical,
                complex,
                data,
                ..
            },
        ) => {
            assert_eq!(*logical, kind == "logical", "{at}: logical flag");
            assert_eq!(class_name(*class), want["class"].as_str().unwrap(), "{at}");
            assert_eq!(*complex, want["complex"].as_bool().unwrap(), "{at}");
            let w: Vec<f64> = want["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(data, &w, "{at}");
        }
        ("cell", MatValue::Cell { items, .. }) => {
            let w = want["items"].as_array().unwrap();
            assert_eq!(items.len(), w.len(), "{at}");
            for (i, (a, b)) in items.iter().zip(w).enumerate() {
                check(a, b, &format!("{at}{{{}}}", i + 1));
            }
        }
        ("struct", MatValue::Struct { fields, items, .. }) => {
            let wf: Vec<&str> = want["fields"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap())
                .collect();
            assert_eq!(fields, &wf, "{at}: fields");
            let w = want["items"].as_array().unwrap();
            assert_eq!(items.len(), w.len(), "{at}");
            for (e, (row, wrow)) in items.iter().zip(w).enumerate() {
                for ((f, a), b) in fields.iter().zip(row).zip(wrow.as_array().unwrap()) {
                    check(a, b, &format!("{at}({}).{f}", e + 1));
                }
            }
        }
        (kind, other) => panic!("{at}: scipy read a {kind}, we read {}", other.kind()),
    }
}

#[test]
fn reads_what_scipy_wrote() {
    let dir = fixtures();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let files = expected["files"].as_object().unwrap();
    assert_eq!(files.len(), 4);
    for (name, vars) in files {
        let file = mat::read(dir.join(name)).unwrap();
        let vars = vars.as_object().unwrap();
        assert_eq!(file.variables.len(), vars.len(), "{name}");
        for (var, want) in vars {
            let v = file.get(var).unwrap_or_else(|| panic!("{name}: no {var}"));
            check(v, want, &format!("{name}:{var}"));
        }
    }
}

#[test]
fn compressed_and_plain_files_hold_the_same_values() {
    let dir = fixtures();
    let a = mat::read(dir.join("cars_annos_small.mat")).unwrap();
    let b = mat::read(dir.join("cars_annos_plain.mat")).unwrap();
    assert_eq!(a.variables, b.variables);
    let ann = a.get("annotations").unwrap();
    assert_eq!(ann.len(), 7);
    assert_eq!(
        ann.field(0, "relative_im_path").unwrap().as_str().unwrap(),
        "car_ims/000001.jpg"
    );
    assert_eq!(ann.field(2, "class").unwrap().as_scalar(), Some(3.0));
    assert_eq!(
        a.get("class_names")
            .unwrap()
            .cell(5)
            .unwrap()
            .as_str()
            .unwrap(),
        "Acura Integra Type R 2001"
    );
}

/// Damaged copies (bytes flipped, runs overwritten, cut short, bytes inserted) of every
/// fixture: the reader returns, with a value or an error, and never panics. A cheap,
/// deterministic stand-in for the cargo-fuzz target in `fuzz/`, run on every test.
#[test]
fn damaged_files_never_panic() {
    let dir = fixtures();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
    let mut errors = 0;
    let mut tries = 0;
    for name in [
        "cars_annos_plain.mat",
        "cars_annos_small.mat",
        "kitchen_sink.mat",
    ] {
        let clean = std::fs::read(dir.join(name)).unwrap();
        for _ in 0..3000 {
            let mut b = clean.clone();
            match rng.gen_range(0..4) {
                0 => {
                    for _ in 0..rng.gen_range(1..4) {
                        let i = rng.gen_range(128..b.len());
                        b[i] ^= 1 << rng.gen_range(0..8);
                    }
                }
                1 => {
                    let i = rng.gen_range(128..b.len());
                    let v: u8 = rng.gen();
                    for x in b.iter_mut().skip(i).take(rng.gen_range(1..8)) {
                        *x = v;
                    }
                }
                2 => b.truncate(rng.gen_range(0..b.len())),
                _ => {
                    let i = rng.gen_range(128..b.len());
                    b.insert(i, rng.gen());
                }
            }
            tries += 1;
            if mat::parse(&b).is_err() {
                errors += 1;
            }
        }
    }
    // Most damage is detected; some flips land in data and still parse.
    assert!(
        errors > tries / 4,
        "{errors} errors in {tries} damaged files"
    );
}

#[test]
fn errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("cars_annos.mat");
    std::fs::write(&p, b"not a mat file").unwrap();
    let e = mat::read(&p).unwrap_err().to_string();
    assert!(e.contains("cars_annos.mat") && e.contains("header"), "{e}");
    let e = mat::read(tmp.path().join("missing.mat"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.mat"), "{e}");
}
