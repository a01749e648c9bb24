//! Matrix-product tiles shared by the neighbour search and k-means.

/// `out[i][j] = q_i · x_j` for the row-major blocks `q` (`[nq, dim]`) and `x` (`[nt, dim]`).
pub(crate) fn dot_tile(q: &[f32], x: &[f32], dim: usize, out: &mut [f32]) {
    let (nq, nt) = (q.len() / dim, x.len() / dim);
    debug_assert_eq!(out.len(), nq * nt);
    // SAFETY: the pointers cover `nq*nt`, `nq*dim` and `nt*dim` elements, exactly the
    // extents described by the sizes and strides below; `out` does not alias the inputs.
    unsafe {
        gemm::gemm(
            nq,
            nt,
            dim,
            out.as_mut_ptr(),
            1,
            nt as isize,
            false,
            q.as_ptr(),
            1,
            dim as isize,
            x.as_ptr(),
            dim as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Squared L2 norm of every row of `data` (`[N, dim]`).
pub(crate) fn sq_norms(data: &[f32], dim: usize) -> Vec<f32> {
    data.chunks_exact(dim).map(|r| dot(r, r)).collect()
}

/// `a · b` with eight independent accumulators, so the compiler can vectorise it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `|a - b|²` with eight independent accumulators.
#[inline]
pub(crate) fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| (x - y) * (x - y)).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_and_dots_agree_with_the_definition() {
        let q: Vec<f32> = (0..3 * 11).map(|i| (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..5 * 11).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![0f32; 15];
        dot_tile(&q, &x, 11, &mut out);
        for i in 0..3 {
            for j in 0..5 {
                let (a, b) = (&q[i * 11..(i + 1) * 11], &x[j * 11..(j + 1) * 11]);
                let want: f32 = a.iter().zip(b).map(|(u, v)| u * v).sum();
                assert!((out[i * 5 + j] - want).abs() < 1e-5);
                assert!((dot(a, b) - want).abs() < 1e-5);
                let d: f32 = a.iter().zip(b).map(|(u, v)| (u - v) * (u - v)).sum();
                assert!((sq_dist(a, b) - d).abs() < 1e-5);
            }
        }
        assert_eq!(sq_norms(&x, 11).len(), 5);
    }
}
