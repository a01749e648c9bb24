//! The `nofuss` binary: parses the command line and hands it to the library.

use clap::Parser;

/// candle allocates a fresh buffer for every tensor op; with glibc's allocator the large
/// ones are mmap'ed and unmapped each time, and the page faults cost more than the maths
/// on the CPU (a Proxy-NCA step over 11,318 proxies: about 60 ms of which 45 in the
/// kernel). mimalloc keeps them, here for the whole run
/// ([`nofuss::allocator::keep_freed_memory`]).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    nofuss::allocator::keep_freed_memory();
    nofuss::threads::park_idle_candle_workers();
    let cli = nofuss::cli::Cli::parse();
    match nofuss::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let e = anyhow::Error::new(e);
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
