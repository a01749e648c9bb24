#!/usr/bin/env python3
"""MAT-file fixtures for nofuss-data's reader (`crates/nofuss-data/tests/mat_files.rs`).

    .venv/bin/python tests/reference/mat_files.py

Writes small Level 5 MAT-files with scipy.io.savemat (a real MATLAB-format writer) into
tests/reference/fixtures/mat/, and `expected.json`: every variable as scipy.io.loadmat
reads it back, in a neutral form (kind, dims, column-major values), for the Rust test to
compare with.

- cars_annos_small.mat (compressed, as Cars196's file) and cars_annos_plain.mat
  (uncompressed): a 1x7 struct array `annotations` with Cars196's fields
  (relative_im_path, bbox_x1..bbox_y2, class, test) stored as uint8, uint16 and double,
  and a 1x6 cell array `class_names`.
- cars_annos_bad_class.mat: the same with class 0 in annotations(3), which must be refused.
- kitchen_sink.mat: every numeric class, logical, complex, a 2x3 char matrix, empty
  arrays and strings, non-ASCII text, a 3-D array, a 2x2 struct array, cells in structs
  in cells.
"""
import json
import pathlib

import numpy as np
import scipy
import scipy.io

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "mat"
OUT.mkdir(parents=True, exist_ok=True)

CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
           "Acura TL Type-S 2008", "Acura TSX Sedan 2012", "Acura Integra Type R 2001"]


def cars():
    rng = np.random.default_rng(196)
    rows = []
    for i in range(7):
        x1, y1 = rng.integers(1, 200, 2)
        x2, y2 = x1 + rng.integers(30, 400), y1 + rng.integers(20, 300)
        # Mixed storage classes, as the real file has.
        num = [np.uint8, np.uint16, np.float64][i % 3]
        rows.append((f"car_ims/{i + 1:06d}.jpg", num(x1), num(y1), np.uint16(x2), np.uint16(y2),
                     np.uint8(i % 6 + 1), np.uint8(i % 2)))
    dt = [("relative_im_path", object), ("bbox_x1", object), ("bbox_y1", object),
          ("bbox_x2", object), ("bbox_y2", object), ("class", object), ("test", object)]
    ann = np.empty((1, len(rows)), dtype=dt)
    for i, r in enumerate(rows):
        ann[0, i] = r
    names = np.empty((1, len(CLASSES)), dtype=object)
    for i, c in enumerate(CLASSES):
        names[0, i] = c
    return {"annotations": ann, "class_names": names}


def kitchen_sink():
    v = {}
    for name, t in [("i8", np.int8), ("u8", np.uint8), ("i16", np.int16), ("u16", np.uint16),
                    ("i32", np.int32), ("u32", np.uint32), ("i64", np.int64), ("u64", np.uint64),
                    ("f32", np.float32), ("f64", np.float64)]:
        info = np.iinfo(t) if np.issubdtype(t, np.integer) else None
        vals = [0, 1, 2, 3, 4, 5] if info is None else [info.min, info.max, 0, 1, 2, 3]
        if t in (np.int64, np.uint64):
            vals = [vals[0] if t is np.uint64 else -(2 ** 40), 2 ** 40, 0, 1, 2, 3]
        if t in (np.float32, np.float64):
            vals = [-1.5, 0.25, 3.0, 1e-3, 2.0 ** 20, -7.0]
        v[name] = np.array(vals, dtype=t).reshape(2, 3)
    v["flag"] = np.array([[True, False, True]])
    v["z"] = np.array([[1 + 2j, -3.5 - 1j]])
    v["chars"] = np.array(["abc", "xyz"])
    v["empty"] = np.zeros((0, 0))
    v["empty_text"] = ""
    v["unicode"] = "Citroën C6 — 2008 ✓"
    v["cube"] = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    grid = np.empty((2, 2), dtype=[("name", object), ("score", object)])
    for i in range(2):
        for j in range(2):
            grid[i, j] = (f"cell {i}{j}", np.array([[i * 10.0 + j]]))
    v["grid"] = grid
    inner = np.empty((1, 2), dtype=object)
    inner[0, 0] = "deep"
    inner[0, 1] = np.array([[1.0, 2.0]])
    s = np.empty((1, 1), dtype=[("label", object), ("inner", object)])
    s[0, 0] = ("struct in a cell", inner)
    outer = np.empty((1, 3), dtype=object)
    outer[0, 0] = s
    outer[0, 1] = np.zeros((0, 0))
    outer[0, 2] = np.array([[7]], dtype=np.int16)
    v["nested"] = outer
    return v


CLASS = {np.dtype(t).name: c for t, c in [
    (np.float64, "double"), (np.float32, "single"), (np.int8, "int8"), (np.uint8, "uint8"),
    (np.int16, "int16"), (np.uint16, "uint16"), (np.int32, "int32"), (np.uint32, "uint32"),
    (np.int64, "int64"), (np.uint64, "uint64")]}


def neutral(a):
    """scipy's reading of one variable as plain JSON, column-major."""
    a = np.asarray(a)
    dims = list(a.shape)
    if a.dtype.names:
        items = [[neutral(e[f]) for f in a.dtype.names] for e in a.flatten(order="F")]
        return {"kind": "struct", "dims": dims, "fields": list(a.dtype.names), "items": items}
    if a.dtype == object:
        return {"kind": "cell", "dims": dims, "items": [neutral(e) for e in a.flatten(order="F")]}
    if a.dtype.kind == "U":
        return {"kind": "char", "dims": dims, "text": "".join(a.flatten(order="F"))}
    if a.dtype == bool:
        return {"kind": "logical", "dims": dims, "data": [float(x) for x in a.flatten(order="F")]}
    if a.dtype.kind == "c":
        return {"kind": "numeric", "class": CLASS[np.real(a).dtype.name], "complex": True,
                "dims": dims, "data": [float(x) for x in np.real(a).flatten(order="F")]}
    return {"kind": "numeric", "class": CLASS[a.dtype.name], "complex": False, "dims": dims,
            "data": [float(x) for x in a.flatten(order="F")]}


expected = {"scipy": scipy.__version__, "files": {}}
bad = cars()
bad["annotations"][0, 2]["class"] = np.uint8(0)  # classes are 1-based: a malformed entry
for fname, data, compress in [("cars_annos_bad_class.mat", bad, True),
                              ("cars_annos_small.mat", cars(), True),
                              ("cars_annos_plain.mat", cars(), False),
                              ("kitchen_sink.mat", kitchen_sink(), True)]:
    path = OUT / fname
    scipy.io.savemat(path, data, do_compression=compress, oned_as="row")
    back = scipy.io.loadmat(path, squeeze_me=False, chars_as_strings=False, mat_dtype=False,
                            struct_as_record=True)
    expected["files"][fname] = {k: neutral(v) for k, v in back.items() if not k.startswith("__")}
    if "flag" in expected["files"][fname]:
        # savemat writes bool arrays as uint8 with MATLAB's logical flag; loadmat gives
        # them back as plain uint8, so the flag is recorded here from what was saved.
        expected["files"][fname]["flag"]["kind"] = "logical"
    print(f"{path}: {path.stat().st_size} bytes")
(OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
