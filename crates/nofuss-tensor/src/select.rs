//! Row-wise selection of the smallest entries of a matrix: the selection half of an exact
//! kNN search, on the device where the distances are.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use nofuss_tensor::select::smallest_k;
//!
//! let d = Tensor::new(&[[0f32, 3.0, 1.0, 2.0], [5.0, 0.0, 4.0, 4.0]], &Device::Cpu)?;
//! // Two nearest of each row, leaving out column r + 0 of row r (the point itself).
//! let (vals, idx) = smallest_k(&d, 2, Some(0))?;
//! assert_eq!(idx.to_vec2::<u32>()?, [[2, 3], [2, 3]]);
//! assert_eq!(vals.to_vec2::<f32>()?, [[1.0, 2.0], [4.0, 4.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu::slice;

/// The most entries [`smallest_k`] selects per row: the CUDA kernel sorts a row's
/// selection in shared memory (4,096 key-column pairs, 32 KiB).
pub const MAX_K: usize = 4096;

/// The `k` smallest entries of every row of `x` (`[rows, cols]`, f32) and their columns,
/// each `[rows, k]` (f32 and u32), in ascending order; equal values are ordered by column,
/// so the result is the same on every device. NaN counts as larger than `+inf` and `-0.0`
/// equals `+0.0`: the order of PyTorch's stable `sort`.
///
/// With `skip_diagonal: Some(offset)`, row `r` leaves out column `r + offset`: a block of
/// queries starting at point `offset` searched against all points, each query without
/// itself.
///
/// On CUDA one kernel does it (a block per row: radix selection of the k-th key, the
/// selection gathered in column order, a bitonic sort in shared memory), without
/// materialising anything but the outputs; on the CPU, a partial selection per row on all
/// cores. Not differentiable. Needs `1 <= k <= MAX_K` and `k <= cols` (`cols - 1` when a
/// column is skipped).
pub fn smallest_k(
    x: &Tensor,
    k: usize,
    skip_diagonal: Option<usize>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, cols) = x.dims2()?;
    if x.dtype() != DType::F32 {
        candle_core::bail!("smallest_k: f32 values expected, got {:?}", x.dtype());
    }
    let available = cols.saturating_sub(skip_diagonal.is_some() as usize);
    if k == 0 || k > MAX_K || k > available {
        candle_core::bail!(
            "smallest_k: k = {k} must be between 1 and {} for rows of {cols}{}",
            MAX_K.min(available),
            if skip_diagonal.is_some() {
                " with one column skipped"
            } else {
                ""
            }
        );
    }
    if cols > u32::MAX as usize {
        candle_core::bail!("smallest_k: {cols} columns do not fit u32 indices");
    }
    if rows == 0 {
        return Ok((
            Tensor::zeros((0, k), DType::F32, x.device())?,
            Tensor::zeros((0, k), DType::U32, x.device())?,
        ));
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => {
            let (vals, idx) = cpu_smallest_k(slice::<f32>(s, layout)?, cols, k, skip_diagonal);
            Ok((
                Tensor::from_vec(vals, (rows, k), &Device::Cpu)?,
                Tensor::from_vec(idx, (rows, k), &Device::Cpu)?,
            ))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => {
            let (vals, idx) = crate::cuda::smallest_k(s, layout, rows, cols, k, skip_diagonal)?;
            let wrap = |st| {
                Tensor::from_storage(
                    Storage::Cuda(st),
                    (rows, k),
                    candle_core::op::BackpropOp::none(),
                    false,
                )
            };
            Ok((wrap(vals), wrap(idx)))
        }
        _ => candle_core::bail!("smallest_k: runs on the CPU and on CUDA"),
    }
}

/// The order `smallest_k` sorts by, as an unsigned key: order-preserving for numbers,
/// every NaN the largest, `-0.0` the same as `+0.0` (the CUDA kernel's `float_key`).
fn key(v: f32) -> u32 {
    if v.is_nan() {
        return u32::MAX;
    }
    let u = if v == 0.0 { 0 } else { v.to_bits() };
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

fn cpu_smallest_k(x: &[f32], cols: usize, k: usize, skip: Option<usize>) -> (Vec<f32>, Vec<u32>) {
    let rows = x.len() / cols.max(1);
    let mut vals = vec![0f32; rows * k];
    let mut idx = vec![0u32; rows * k];
    vals.par_chunks_mut(k)
        .zip(idx.par_chunks_mut(k))
        .enumerate()
        .for_each(|(r, (v, i))| {
            let own = skip.map(|o| r + o);
            let row = &x[r * cols..(r + 1) * cols];
            let mut pairs: Vec<(u32, u32)> = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| Some(j) != own)
                .map(|(j, &d)| (key(d), j as u32))
                .collect();
            if k < pairs.len() {
                pairs.select_nth_unstable(k - 1);
                pairs.truncate(k);
            }
            pairs.sort_unstable();
            for ((v, i), (_, j)) in v.iter_mut().zip(i.iter_mut()).zip(pairs) {
                *v = row[j as usize];
                *i = j;
            }
        });
    (vals, idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_the_order_of_floats() {
        let v = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            0.0,
            1e-30,
            2.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for w in v.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{} {}", w[0], w[1]);
        }
        assert_eq!(key(f32::NAN), u32::MAX);
        assert_eq!(key(-f32::NAN), u32::MAX);
        assert_eq!(key(-0.0), key(0.0));
    }

    #[test]
    fn rows_match_a_full_sort() {
        let (rows, cols) = (7usize, 301usize);
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 50.0).round() - 10.0)
            .collect();
        x[4] = f32::NAN;
        x[cols + 2] = f32::NEG_INFINITY;
        let t = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu).unwrap();
        for (k, skip) in [
            (1, None),
            (10, Some(0)),
            (300, Some(0)),
            (301, None),
            (5, Some(3)),
        ] {
            let (v, i) = smallest_k(&t, k, skip).unwrap();
            let (v, i) = (v.to_vec2::<f32>().unwrap(), i.to_vec2::<u32>().unwrap());
            for r in 0..rows {
                let mut all: Vec<(u32, u32)> = (0..cols)
                    .filter(|&j| skip.map(|o| r + o) != Some(j))
                    .map(|j| (key(x[r * cols + j]), j as u32))
                    .collect();
                all.sort();
                let want: Vec<u32> = all[..k].iter().map(|p| p.1).collect();
                assert_eq!(i[r], want, "k {k} skip {skip:?} row {r}");
                for (a, &j) in v[r].iter().zip(&want) {
                    assert_eq!(a.to_bits(), x[r * cols + j as usize].to_bits());
                }
            }
        }
    }

    #[test]
    fn bad_requests_are_errors() {
        let t = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        let none = Tensor::zeros((0, 5), DType::F32, &Device::Cpu).unwrap();
        let (v, i) = smallest_k(&none, 2, Some(0)).unwrap();
        assert_eq!((v.dims(), i.dims()), ([0, 2].as_slice(), [0, 2].as_slice()));
        assert!(smallest_k(&t, 0, None).is_err());
        assert!(smallest_k(&t, 6, None).is_err());
        assert!(smallest_k(&t, 5, Some(0)).is_err());
        assert!(smallest_k(&t.to_dtype(DType::F64).unwrap(), 2, None).is_err());
        assert!(smallest_k(
            &Tensor::zeros((2, 5000), DType::F32, &Device::Cpu).unwrap(),
            4097,
            None
        )
        .is_err());
    }
}
