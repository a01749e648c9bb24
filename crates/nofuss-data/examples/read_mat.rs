//! Prints the variables of a MATLAB Level 5 MAT-file: name, kind, dimensions, and for
//! struct arrays their fields (a quick look at `cars_annos.mat` or any annotation file).
//!
//! ```sh
//! cargo run -p nofuss-data --example read_mat -- tests/reference/fixtures/mat/cars_annos_small.mat
//! ```

use nofuss_data::mat::{self, MatValue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: read_mat FILE.mat")?;
    let file = mat::read(&path)?;
    println!("{}", file.header);
    for (name, value) in &file.variables {
        print!("{name}: {} {:?}", value.kind(), value.dims());
        match value {
            MatValue::Struct { fields, .. } => print!(" fields {}", fields.join(", ")),
            MatValue::Char { .. } => print!(" {:?}", value.as_str().unwrap_or_default()),
            MatValue::Cell { items, .. } => {
                if let Some(first) = items.first().and_then(MatValue::as_str) {
                    print!(" first {first:?}");
                }
            }
            MatValue::Numeric { data, .. } => {
                print!(" first values {:?}", &data[..data.len().min(4)])
            }
        }
        println!();
    }
    Ok(())
}
