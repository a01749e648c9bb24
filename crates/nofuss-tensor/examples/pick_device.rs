//! Picks a device from a spec string and shows the dtype policy.
//!
//! `cargo run -p nofuss-tensor --example pick_device -- auto` (or cpu, cuda, cuda:1)

use nofuss_tensor::{DeviceSpec, Precision};

fn main() -> Result<(), nofuss_tensor::Error> {
    let spec: DeviceSpec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "auto".into())
        .parse()?;
    let picked = spec.select()?;
    println!("{spec} -> {}", picked.description);
    for p in [Precision::F32, Precision::Bf16] {
        println!(
            "{p}: parameters {:?}, backbone compute {:?}, loss {:?}",
            p.param_dtype(),
            p.compute_dtype(),
            p.loss_dtype()
        );
    }
    Ok(())
}
