//! Launch-grid arithmetic of the CUDA launcher, kept apart from it so that the CPU tests
//! check it: how many rows a kernel that gives every row (a batch-norm channel) its own
//! grid.y index needs in grid.y and grid.z.

// The grids serve the CUDA path only.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// The most rows (grid.y) and planes (grid.z) a CUDA grid can have.
pub(crate) const GRID_YZ: u64 = 65_535;

/// `n` rows as (rows per plane, planes) of a grid: one plane of up to [`GRID_YZ`] rows,
/// then as many planes of [`GRID_YZ`] rows as needed (the last plane's rows past `n` have
/// nothing to do; `channel` in `kernels/batch_norm.cu` numbers them); `None` past
/// [`GRID_YZ`] planes. Zero rows give one.
pub(crate) fn fold_rows(n: u64) -> Option<(u32, u32)> {
    let rows = n.clamp(1, GRID_YZ);
    let planes = n.div_ceil(rows).max(1);
    (planes <= GRID_YZ).then_some((rows as u32, planes as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row a block gets: `channel` in `kernels/batch_norm.cu`.
    fn row(rows: u32, y: u32, z: u32) -> u64 {
        z as u64 * rows as u64 + y as u64
    }

    #[test]
    fn every_row_gets_one_block_and_the_grid_stays_within_bounds() {
        assert_eq!(fold_rows(0), Some((1, 1)));
        assert_eq!(fold_rows(1), Some((1, 1)));
        assert_eq!(fold_rows(1024), Some((1024, 1)));
        assert_eq!(fold_rows(GRID_YZ), Some((65_535, 1)));
        assert_eq!(fold_rows(GRID_YZ + 1), Some((65_535, 2)));
        assert_eq!(fold_rows(GRID_YZ * GRID_YZ), Some((65_535, 65_535)));
        assert_eq!(fold_rows(GRID_YZ * GRID_YZ + 1), None);
        for n in [1u64, 7, 65_534, 65_535, 65_536, 200_000, 3 * GRID_YZ + 2] {
            let (rows, planes) = fold_rows(n).unwrap();
            assert!(rows as u64 <= GRID_YZ && planes as u64 <= GRID_YZ, "n {n}");
            // The last block's row is at least the last row, and one plane fewer would
            // not reach it: no row is left without a block, no plane is idle.
            assert!(row(rows, rows - 1, planes - 1) >= n - 1, "n {n}");
            assert!(
                planes == 1 || row(rows, rows - 1, planes - 2) < n - 1,
                "n {n}"
            );
        }
    }
}
