//! Workspace-wide integration checks live in `tests/tests/`; this crate has no API.
//!
//! `tests/reference/` holds the scripts that compute reference values with real
//! reference implementations (scikit-learn, PyTorch) and the small fixtures they write.
