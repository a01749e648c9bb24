//! Normalised mutual information between two labelings.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// How mutual information is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NmiNormalization {
    /// `MI / ((H(U) + H(V)) / 2)`: scikit-learn's default (`average_method='arithmetic'`).
    #[default]
    Arithmetic,
    /// `MI / sqrt(H(U) H(V))`, as in older metric-learning code (Song et al. 2016).
    Geometric,
}

/// NMI of labelings `a` and `b` (natural logarithms; the ratio does not depend on the base).
///
/// Conventions follow scikit-learn's `normalized_mutual_info_score`: when both labelings
/// are a single cluster the score is 1; when the mutual information is 0 it is 0.
pub fn nmi(a: &[u32], b: &[u32], norm: NmiNormalization) -> Result<f64> {
    if a.len() != b.len() {
        return Err(EvalError::Shape(format!(
            "labelings of {} and {} points",
            a.len(),
            b.len()
        )));
    }
    if a.is_empty() {
        return Err(EvalError::Shape("empty labelings".into()));
    }
    let n = a.len() as f64;
    let mut ca: HashMap<u32, f64> = HashMap::new();
    let mut cb: HashMap<u32, f64> = HashMap::new();
    let mut joint: HashMap<(u32, u32), f64> = HashMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *ca.entry(x).or_default() += 1.0;
        *cb.entry(y).or_default() += 1.0;
        *joint.entry((x, y)).or_default() += 1.0;
    }
    if ca.len() == 1 && cb.len() == 1 {
        return Ok(1.0);
    }
    let entropy = |c: &HashMap<u32, f64>| -> f64 {
        let mut v: Vec<f64> = c.values().copied().collect();
        v.sort_by(f64::total_cmp); // fixed summation order
        -v.iter().map(|&k| (k / n) * (k / n).ln()).sum::<f64>()
    };
    let mut terms: Vec<f64> = joint
        .iter()
        .map(|(&(x, y), &nxy)| (nxy / n) * ((n * nxy) / (ca[&x] * cb[&y])).ln())
        .collect();
    terms.sort_by(f64::total_cmp);
    let mi = terms.iter().sum::<f64>().max(0.0);
    if mi <= 0.0 {
        return Ok(0.0);
    }
    let (ha, hb) = (entropy(&ca), entropy(&cb));
    let denom = match norm {
        NmiNormalization::Arithmetic => 0.5 * (ha + hb),
        NmiNormalization::Geometric => (ha * hb).sqrt(),
    };
    Ok((mi / denom.max(f64::EPSILON)).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_permuted() {
        let a = [0, 0, 1, 1, 2, 2];
        assert!((nmi(&a, &a, NmiNormalization::Arithmetic).unwrap() - 1.0).abs() < 1e-12);
        let b = [5, 5, 3, 3, 9, 9];
        assert!((nmi(&a, &b, NmiNormalization::Geometric).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn independent_is_zero() {
        let a = [0, 0, 1, 1];
        let b = [0, 1, 0, 1];
        assert_eq!(nmi(&a, &b, NmiNormalization::Arithmetic).unwrap(), 0.0);
    }

    #[test]
    fn hand_computed_case() {
        // a = [0,0,0,1,1,1], b = [0,0,1,1,2,2]
        // H(a) = ln 2; H(b) = ln 3; joint cells (0,0)=2,(0,1)=1,(1,1)=1,(1,2)=2 each /6
        // MI = 2/6 ln(6*2/(3*2)) + 1/6 ln(6/(3*2)) + 1/6 ln(6/(3*2)) + 2/6 ln(6*2/(3*2))
        //    = 2/3 ln 2
        let a = [0, 0, 0, 1, 1, 1];
        let b = [0, 0, 1, 1, 2, 2];
        let mi = 2.0 / 3.0 * 2f64.ln();
        let ar = mi / (0.5 * (2f64.ln() + 3f64.ln()));
        let ge = mi / (2f64.ln() * 3f64.ln()).sqrt();
        assert!((nmi(&a, &b, NmiNormalization::Arithmetic).unwrap() - ar).abs() < 1e-12);
        assert!((nmi(&a, &b, NmiNormalization::Geometric).unwrap() - ge).abs() < 1e-12);
        // scikit-learn 1.9.1 prints 0.5158037429793889 for normalized_mutual_info_score(a, b).
        assert!((ar - 0.5158037429793889).abs() < 1e-12);
    }

    #[test]
    fn degenerate_cases() {
        assert_eq!(
            nmi(&[1, 1, 1], &[2, 2, 2], NmiNormalization::Arithmetic).unwrap(),
            1.0
        );
        assert_eq!(
            nmi(&[1, 1, 1], &[0, 1, 2], NmiNormalization::Arithmetic).unwrap(),
            0.0
        );
        assert!(nmi(&[1], &[1, 2], NmiNormalization::Arithmetic).is_err());
        assert!(nmi(&[], &[], NmiNormalization::Arithmetic).is_err());
    }
}
