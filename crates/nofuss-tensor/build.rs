//! With the `cuda` feature, compiles `kernels/*.cu` to PTX with nvcc (the same toolkit
//! candle's kernels are built with). Without it, nothing happens: CPU builds need no CUDA.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &[
    "pool",
    "batch_norm",
    "optim",
    "nca",
    "normalize",
    "select",
    "distance",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // Same convention as candle-kernels: CUDA_COMPUTE_CAP=90 means sm_90 (H100/H200).
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    for k in KERNELS {
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "--std=c++17", "-Ikernels"])
            .arg(format!("--gpu-architecture=compute_{cap}"))
            .arg(format!("kernels/{k}.cu"))
            .arg("-o")
            .arg(&ptx)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed on kernels/{k}.cu ({s})"),
            Err(e) => panic!(
                "the `cuda` feature needs nvcc to compile kernels/{k}.cu ({nvcc}: {e}); \
                 set NVCC or put the CUDA toolkit's bin/ on PATH"
            ),
        }
    }
}
