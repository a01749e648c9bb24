//! Generates the embedded default dataset and writes a montage of some classes.
//!
//! `cargo run -p nofuss-data --example glyph_montage -- [DATA_DIR] [OUT.png]`

use nofuss_data::glyphs::{self, GlyphConfig};
use nofuss_data::{cub, ImageBank, ImageSpec, Subset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "data/glyphs".into());
    let out = args.next().unwrap_or_else(|| "glyph_montage.png".into());
    let p = glyphs::prepare(&dir, &GlyphConfig::default())?;
    println!(
        "{}: {} classes, {} images ({})",
        p.root.display(),
        p.num_classes,
        p.num_images,
        if p.generated { "generated" } else { "reused" }
    );
    let ds = cub::load(&dir)?;
    let (rows, cols) = (12usize, 16usize);
    let classes: Vec<u32> = (0..rows as u32).collect();
    let sub = Subset::of_classes(&ds, &classes);
    let bank = ImageBank::load(
        &ds,
        &sub,
        ImageSpec {
            channels: 1,
            height: 32,
            width: 32,
        },
    )?;
    let mut img = image::GrayImage::new(cols as u32 * 33, rows as u32 * 33);
    for r in 0..rows {
        let members: Vec<usize> = (0..sub.len())
            .filter(|&i| sub.labels[i] == r as u32)
            .collect();
        for (c, &i) in members
            .iter()
            .step_by((members.len() / cols).max(1))
            .take(cols)
            .enumerate()
        {
            for (p, &v) in bank.image(i).iter().enumerate() {
                img.put_pixel(
                    (c * 33 + p % 32) as u32,
                    (r * 33 + p / 32) as u32,
                    image::Luma([v]),
                );
            }
        }
    }
    img.save(&out)?;
    println!("montage of {rows} classes written to {out}");
    Ok(())
}
