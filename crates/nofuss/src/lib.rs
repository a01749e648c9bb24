//! nofuss
