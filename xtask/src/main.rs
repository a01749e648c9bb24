//! `cargo xtask <task>`: project automation written in Rust (matklad's xtask pattern).
//!
//! - `cargo xtask ci`: the checks CI runs (`cargo fmt --check`, clippy with warnings as
//!   errors, the test suite), in that order, stopping at the first failure.
//! - `cargo xtask glyphs [--dir DIR]`: generates the embedded default dataset (the
//!   trainer also does this on first use).
//!
//! Dataset and weight downloads (`fetch-data`, `fetch-weights`) arrive with their own issue.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nofuss project automation")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the CI checks: fmt, clippy (-D warnings), tests.
    Ci,
    /// Generate the embedded glyph dataset.
    Glyphs {
        /// Where to write it.
        #[arg(long, default_value = "data/glyphs")]
        dir: PathBuf,
    },
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("cannot start {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Ci => {
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            cargo(&["test", "--workspace"])?;
        }
        Task::Glyphs { dir } => {
            let p = nofuss_data::glyphs::prepare(&dir, &Default::default())?;
            println!(
                "{}: {} classes, {} images ({})",
                p.root.display(),
                p.num_classes,
                p.num_images,
                if p.generated {
                    "generated"
                } else {
                    "already up to date"
                }
            );
        }
    }
    Ok(())
}
