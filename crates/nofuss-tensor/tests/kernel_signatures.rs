//! The Rust side of every CUDA launch against the `.cu` side, without a GPU or nvcc.
//!
//! cudarc pushes kernel arguments as untyped pointers: an argument in the wrong place, an
//! `i64` where the kernel takes an `int`, or a struct whose fields differ from the C one
//! would compile and run wrong on the GPU. `src/cuda.rs` therefore declares each kernel's
//! parameters once (`kernels!`, typed launchers that rustc checks every call against), and
//! this test reads those declarations and `kernels/*.cu` as text and checks that they
//! agree: every kernel declared on both sides, the same parameters in the same order with
//! the same types, the shared structs with the same fields, the PTX each launcher loads
//! built from its file, and the block sizes and limits the kernels' shared arrays assume.

use std::collections::BTreeMap;
use std::path::Path;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Removes `//` comments and macro line continuations.
fn strip_c(src: &str) -> String {
    src.lines()
        .map(|l| l.split("//").next().unwrap_or("").trim_end_matches('\\'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text between the bracket at `open` and its match.
fn bracketed(s: &str, open: usize, o: char, c: char) -> &str {
    let mut depth = 0;
    for (i, ch) in s[open..].char_indices() {
        if ch == o {
            depth += 1;
        } else if ch == c {
            depth -= 1;
            if depth == 0 {
                return &s[open + 1..open + i];
            }
        }
    }
    panic!("unbalanced {o}{c}");
}

fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A C scalar or element type in the Rust spelling used for comparison.
fn c_scalar(t: &str) -> String {
    match t {
        "int" | "int32_t" => "i32".into(),
        "int64_t" | "long long" => "i64".into(),
        "uint32_t" | "unsigned" | "unsigned int" => "u32".into(),
        "uint64_t" => "u64".into(),
        "float" => "f32".into(),
        "double" => "f64".into(),
        "ACC(T)" => "A".into(),
        other => other.into(),
    }
}

/// A C parameter (`const T* x`, `ACC(T) * partial`, `int64_t n`, `PoolGeom g`) as
/// `in T`, `out A`, `i64`, `PoolGeom`.
fn c_param(p: &str) -> String {
    let p = words(p);
    let (ty, _name) = p
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("parameter {p:?}"));
    let ty = ty.trim();
    if let Some(elem) = ty.strip_suffix('*') {
        let elem = elem.trim();
        match elem.strip_prefix("const ") {
            Some(e) => format!("in {}", c_scalar(e.trim())),
            None => format!("out {}", c_scalar(elem)),
        }
    } else {
        c_scalar(ty)
    }
}

/// A declared Rust parameter type (`&CudaView<T>`, `&mut CudaViewMut<u32>`, `&i64`,
/// `&PoolGeom`) in the same spelling.
fn rust_param(ty: &str) -> String {
    let ty = words(ty);
    if let Some(e) = ty.strip_prefix("&mut CudaViewMut<") {
        return format!("out {}", e.trim_end_matches('>'));
    }
    if let Some(e) = ty.strip_prefix("&CudaView<") {
        return format!("in {}", e.trim_end_matches('>'));
    }
    match ty.strip_prefix('&') {
        Some(t) => t.trim().to_string(),
        None => panic!("launcher parameter {ty:?}: pass scalars and structs by reference"),
    }
}

/// The `extern "C"` kernels of a `.cu` file: name (with `##SUF` as `{}`) -> parameters.
fn cu_kernels(src: &str) -> BTreeMap<String, Vec<String>> {
    let src = strip_c(src);
    let mut out = BTreeMap::new();
    let mut rest = src.as_str();
    while let Some(at) = rest.find("extern \"C\" __global__ void ") {
        let after = &rest[at + "extern \"C\" __global__ void ".len()..];
        let open = after.find('(').unwrap();
        let name = after[..open].trim().replace("##SUF", "{}");
        let params = bracketed(after, open, '(', ')');
        let params = params
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(c_param)
            .collect();
        out.insert(name, params);
        rest = &after[open..];
    }
    out
}

struct Launcher {
    file: String,
    module: String,
    ptx: String,
    name: String,
    generics: Vec<String>,
    params: Vec<String>,
}

/// The `kernels! { "file.cu", "module", PTX; fn name<T, ..>(params); ... }` blocks.
fn launchers(src: &str) -> Vec<Launcher> {
    let mut out = vec![];
    let mut rest = src;
    while let Some(at) = rest.find("kernels! {") {
        let body = bracketed(rest, at + "kernels! ".len(), '{', '}');
        let (head, fns) = body.split_once(';').unwrap();
        let head: Vec<&str> = head.split(',').map(str::trim).collect();
        let (file, module, ptx) = (
            head[0].trim_matches('"'),
            head[1].trim_matches('"'),
            head[2],
        );
        for decl in fns.split("fn ").skip(1) {
            let lt = decl.find('<').unwrap();
            let generics = bracketed(decl, lt, '<', '>')
                .split(',')
                .map(|g| g.trim().to_string())
                .collect();
            let open = decl.find('(').unwrap();
            let params = bracketed(decl, open, '(', ')')
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| rust_param(p.split_once(':').unwrap().1))
                .collect();
            out.push(Launcher {
                file: file.into(),
                module: module.into(),
                ptx: ptx.into(),
                name: decl[..lt].trim().into(),
                generics,
                params,
            });
        }
        rest = &rest[at + "kernels! {".len() + body.len()..];
    }
    out
}

/// Fields of `struct name { ... }` in C, or of the Rust struct `name`, as
/// `field: type` (leading underscores dropped).
fn c_struct(src: &str, name: &str) -> Vec<String> {
    let src = strip_c(src);
    let at = src
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name}"));
    let body = bracketed(&src, src[at..].find('{').unwrap() + at, '{', '}');
    let mut fields = vec![];
    for decl in body.split(';').map(words).filter(|d| !d.is_empty()) {
        let (ty, names) = decl.split_once(' ').unwrap();
        for n in names.split(',') {
            // An array `name[N]` is Rust's `name: [T; N]`.
            let field = match n.trim().split_once('[') {
                Some((n, len)) => format!("{n}: [{}; {}]", c_scalar(ty), len.trim_end_matches(']')),
                None => format!("{}: {}", n.trim(), c_scalar(ty)),
            };
            fields.push(field);
        }
    }
    fields
}

fn rust_struct(src: &str, name: &str) -> Vec<String> {
    let at = src
        .find(&format!("pub(crate) struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name}"));
    let before = &src[..at];
    let attrs = &before[before.rfind("\n\n").unwrap_or(0)..];
    assert!(attrs.contains("#[repr(C)]"), "{name} must be #[repr(C)]");
    let body = bracketed(src, src[at..].find('{').unwrap() + at, '{', '}');
    body.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("pub "))
        .map(|l| {
            let (n, t) = l["pub ".len()..]
                .trim_end_matches(',')
                .split_once(':')
                .unwrap();
            format!("{}: {}", n.trim().trim_start_matches('_'), t.trim())
        })
        .collect()
}

fn define(src: &str, name: &str) -> Option<u64> {
    src.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("#define ")?.strip_prefix(name)?;
        rest.trim().parse().ok()
    })
}

fn rust_const(src: &str, name: &str) -> u64 {
    let at = src
        .find(&format!("const {name}: "))
        .unwrap_or_else(|| panic!("const {name}"));
    let line = src[at..].lines().next().unwrap();
    line.split('=')
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches(';')
        .parse()
        .unwrap()
}

#[test]
fn launchers_match_the_kernels() {
    let cuda_rs = read("src/cuda.rs");
    let build_rs = read("build.rs");
    let decls = launchers(&cuda_rs);
    assert!(decls.len() >= 16, "found only {} launchers", decls.len());
    let mut files: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut declared = std::collections::BTreeSet::new();
    let mut modules = BTreeMap::new();
    for d in &decls {
        let stem = d.file.trim_end_matches(".cu");
        // The PTX the launcher loads is built from its file, under one module name.
        assert!(
            cuda_rs.contains(&format!(
                "const {}: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\"));",
                d.ptx
            )),
            "{}: {} is not {stem}.ptx",
            d.name,
            d.ptx
        );
        assert!(
            build_rs.contains(&format!("\"{stem}\"")),
            "build.rs does not compile {}",
            d.file
        );
        assert_eq!(
            modules
                .entry(d.module.clone())
                .or_insert_with(|| d.file.clone()),
            &d.file,
            "module {} used for two files",
            d.module
        );
        let kernels = files
            .entry(d.file.clone())
            .or_insert_with(|| cu_kernels(&read(&format!("kernels/{}", d.file))));
        // A template kernel `name_##SUF` whose C type names are the launcher's generics,
        // or one instantiation with a fixed suffix (`smallest_k_f32`).
        let (c_params, subst) = if let Some(p) = kernels.get(&format!("{}_{{}}", d.name)) {
            (p, None)
        } else if let Some(p) = kernels.get(&format!("{}_f32", d.name)) {
            (p, Some("f32"))
        } else {
            panic!("{}: no kernel {}_... in kernels/{}", d.name, d.name, d.file);
        };
        let want: Vec<String> = d
            .params
            .iter()
            .map(|p| match subst {
                Some(t) => p.replace(&format!(" {}", d.generics[0]), &format!(" {t}")),
                None => p.clone(),
            })
            .collect();
        assert_eq!(
            &want, c_params,
            "{} (kernels/{}): Rust launcher vs kernel",
            d.name, d.file
        );
        declared.insert((d.file.clone(), d.name.clone()));
    }
    // No kernel without a launcher.
    for (file, kernels) in &files {
        for name in kernels.keys() {
            let base = name.trim_end_matches("_{}").trim_end_matches("_f32");
            assert!(
                declared.contains(&(file.clone(), base.to_string())),
                "kernels/{file}: {name} has no launcher in src/cuda.rs"
            );
        }
    }
    // The structs passed by value.
    let fused = read("src/fused_step.rs");
    let sumsq = read("src/sumsq.rs");
    for (name, cu, rs) in [
        ("PoolGeom", "kernels/pool.cu", &cuda_rs),
        ("BnGeom", "kernels/batch_norm.cu", &cuda_rs),
        ("StepArgs", "kernels/optim.cu", &fused),
        ("SumsqTable", "kernels/optim.cu", &sumsq),
        ("OptimTable", "kernels/optim.cu", &fused),
    ] {
        assert_eq!(
            rust_struct(rs, name),
            c_struct(&read(cu), name),
            "struct {name}"
        );
    }
    // Block sizes and limits the kernels' shared arrays are sized for.
    let threads = rust_const(&cuda_rs, "THREADS");
    for cu in [
        "kernels/batch_norm.cu",
        "kernels/nca.cu",
        "kernels/normalize.cu",
        "kernels/optim.cu",
    ] {
        assert_eq!(define(&read(cu), "THREADS"), Some(threads), "{cu}: THREADS");
    }
    // The table's arrays and chunks.
    let optim = read("kernels/optim.cu");
    let tables = read("src/tables.rs");
    for name in ["TABLE_TENSORS", "TABLE_CHUNK"] {
        assert_eq!(
            define(&optim, name),
            Some(rust_const(&tables, name)),
            "{name}"
        );
    }
    let select = read("kernels/select.cu");
    assert_eq!(
        define(&select, "SELECT_THREADS"),
        Some(rust_const(&cuda_rs, "SELECT_THREADS"))
    );
    assert_eq!(
        define(&select, "SELECT_MAX_K"),
        Some(rust_const(&read("src/select.rs"), "MAX_K"))
    );
}

#[test]
fn the_parsers_see_mismatches() {
    // A swapped pair, an int for an int64_t, a missing const: each differs.
    let cu = "extern \"C\" __global__ void f_##SUF(const T* x, T* y, int64_t n) {}";
    let k = cu_kernels(cu);
    assert_eq!(k["f_{}"], ["in T", "out T", "i64"]);
    for (rust, same) in [
        ("&CudaView<T>, &mut CudaViewMut<T>, &i64", true),
        ("&mut CudaViewMut<T>, &CudaView<T>, &i64", false),
        ("&CudaView<T>, &mut CudaViewMut<T>, &i32", false),
        ("&mut CudaViewMut<T>, &mut CudaViewMut<T>, &i64", false),
    ] {
        let src = format!(
            "kernels! {{ \"f.cu\", \"m\", P;\n fn f<T>({}); }}",
            rust.split(", ")
                .enumerate()
                .map(|(i, t)| format!("a{i}: {t}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let l = launchers(&src);
        assert_eq!(l[0].params == k["f_{}"], same, "{rust}");
    }
    let c = "struct S {\n  int a, b; // two\n  double c;\n};";
    let r = "#[repr(C)]\npub(crate) struct S {\n    pub a: i32,\n    pub _b: i32,\n    /// doc\n    pub c: f64,\n}";
    assert_eq!(c_struct(c, "S"), rust_struct(r, "S"));
    let r2 = r.replace("pub c: f64", "pub c: f32");
    assert_ne!(c_struct(c, "S"), rust_struct(&r2, "S"));
}
