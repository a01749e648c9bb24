//! Division by a divisor fixed for a kernel launch as a multiply-high, an add and a
//! shift (Granlund & Montgomery's method, as PyTorch's `IntDivider`): the CUDA kernels
//! find an element's channel or row this way instead of by integer division, which a
//! GPU runs as a sequence of conversions and a reciprocal on its slow special-function
//! units (two per element in the batch-norm and pooling passes). `div_by` in
//! `kernels/common.cuh` uses the two numbers computed here.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// The dividends `fast_div_params` serves: `[0, 2^31)`, where `umulhi(a, mul) + a`
/// cannot overflow 32 bits.
pub(crate) const LIMIT: u64 = 1 << 31;

/// `(mul, shift)` with `a / d == (umulhi(a, mul) + a) >> shift` for every `a` below
/// `max_dividend` (exclusive), or `(0, 0)`, which tells the kernel to divide, when `d`
/// is 0 or the dividends do not all lie below 2^31.
pub(crate) fn fast_div_params(d: u64, max_dividend: u64) -> (u32, u32) {
    if d == 0 || d >= LIMIT || max_dividend > LIMIT {
        return (0, 0);
    }
    // The smallest shift with 2^shift >= d.
    let shift = 64 - (d - 1).leading_zeros();
    let shift = if d == 1 { 0 } else { shift };
    let mul = ((1u128 << 32) * ((1u128 << shift) - d as u128)) / d as u128 + 1;
    debug_assert!(mul <= u32::MAX as u128);
    (mul as u32, shift)
}

/// `div_by`'s arithmetic on the host (tests).
#[cfg(test)]
fn quotient(a: u32, (mul, shift): (u32, u32)) -> u32 {
    let hi = ((a as u64 * mul as u64) >> 32) as u32;
    (hi + a) >> shift
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quotients_are_exact_below_the_limit() {
        let mut divisors: Vec<u64> = (1..=4099).collect();
        for s in 1..31 {
            let p = 1u64 << s;
            divisors.extend([p - 1, p, p + 1]);
        }
        divisors.extend([12_544, 3_136, 784, 196, 49, 1_000_003, LIMIT - 1]);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for &d in &divisors {
            let p = fast_div_params(d, LIMIT);
            assert_ne!(p.0, 0, "d {d}");
            let check = |a: u64| {
                let a = a.min(LIMIT - 1) as u32;
                assert_eq!(quotient(a, p) as u64, a as u64 / d, "{a} / {d}");
            };
            // Around multiples of d (where a wrong quotient shows first) and at random.
            for k in [0, 1, 2, 3, 1000, (LIMIT - 1) / d - 1, (LIMIT - 1) / d] {
                let m = k * d;
                for a in [m.saturating_sub(1), m, m + 1, m + d - 1] {
                    check(a);
                }
            }
            for _ in 0..200 {
                check(next() % LIMIT);
            }
            check(LIMIT - 1);
        }
    }

    #[test]
    fn out_of_range_launches_divide() {
        assert_eq!(fast_div_params(0, 10), (0, 0));
        assert_eq!(fast_div_params(7, LIMIT + 1), (0, 0));
        assert_eq!(fast_div_params(LIMIT, 10), (0, 0));
        assert_ne!(fast_div_params(7, LIMIT).0, 0);
    }
}
