//! Library half of `cargo xtask`: dataset and weight downloads that are verified,
//! resumable and safe. The binary (`src/main.rs`) only parses arguments.

pub mod catalog;
pub mod fetch;
