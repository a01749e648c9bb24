//! The MAT-file reader on arbitrary bytes: it may refuse them, never panic, hang or
//! allocate without bound. Seeds: tests/reference/fixtures/mat/*.mat.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = nofuss_data::mat::parse(data) {
        // Walk what was read, as a loader would.
        for (_, v) in &file.variables {
            let _ = (v.len(), v.as_str(), v.as_scalar(), v.field(0, "class"), v.cell(0));
        }
    }
});
