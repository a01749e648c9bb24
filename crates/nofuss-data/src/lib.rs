//! nofuss-data
