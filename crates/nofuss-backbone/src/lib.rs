//! nofuss-backbone
