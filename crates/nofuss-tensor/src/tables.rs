//! Launch tables of the kernels that take many tensors per launch
//! (`kernels/optim.cu`'s `optim_step` and `sumsq_partial`): the tensors' addresses and
//! lengths travel as the launch's parameter, up to [`TABLE_TENSORS`] a launch, and every
//! block handles one chunk of [`TABLE_CHUNK`] elements of one tensor (it finds which by a
//! binary search over the tensors' first blocks). [`plan`] splits a list of tensors into
//! such launches.

// The plans serve the CUDA path only.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use crate::Result;

/// Tensors per launch (`TABLE_TENSORS` in `kernels/optim.cu`).
pub(crate) const TABLE_TENSORS: usize = 64;
/// Elements each block handles (`TABLE_CHUNK` in `kernels/optim.cu`).
pub(crate) const TABLE_CHUNK: usize = 4096;

/// One launch of a [`plan`]: which tensors (indices into the lengths planned, none
/// empty), the first block of each, the grid, and the number of the launch's first block
/// counted over all the plan's launches (where `sumsq_partial` writes its first sum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Launch {
    pub tensors: Vec<usize>,
    pub first_block: Vec<u32>,
    pub blocks: u32,
    pub base: u32,
}

/// The largest grid of one launch (CUDA's limit on `gridDim.x`).
const MAX_GRID: u64 = (1 << 31) - 1;

/// The launches over tensors of lengths `lens`, their blocks numbered on from `base`, and
/// the number after the last block: tensors of no elements are left out, at most
/// [`TABLE_TENSORS`] go into a launch, each takes `ceil(len / TABLE_CHUNK)` blocks.
pub(crate) fn plan(lens: &[usize], base: u32) -> Result<(Vec<Launch>, u32)> {
    let too_many = || {
        crate::Error::Optim(format!(
            "{} elements in one table of tensors: more than one launch's grid",
            lens.iter().sum::<usize>()
        ))
    };
    let mut launches: Vec<Launch> = vec![];
    let mut next = base as u64;
    for (i, &len) in lens.iter().enumerate() {
        if len == 0 {
            continue;
        }
        let blocks = len.div_ceil(TABLE_CHUNK) as u64;
        let open = launches
            .last()
            .filter(|l| l.tensors.len() < TABLE_TENSORS && l.blocks as u64 + blocks <= MAX_GRID);
        if open.is_none() {
            launches.push(Launch {
                tensors: vec![],
                first_block: vec![],
                blocks: 0,
                base: u32::try_from(next).map_err(|_| too_many())?,
            });
        }
        let l = launches.last_mut().expect("a launch was just opened");
        if l.blocks as u64 + blocks > MAX_GRID {
            return Err(too_many());
        }
        l.tensors.push(i);
        l.first_block.push(l.blocks);
        l.blocks += blocks as u32;
        next += blocks;
    }
    let end = u32::try_from(next).map_err(|_| too_many())?;
    Ok((launches, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_chunk_tensors_skip_empty_ones_and_fill_launches_in_turn() {
        let (l, end) = plan(&[0, 1, TABLE_CHUNK, TABLE_CHUNK + 1, 0, 3 * TABLE_CHUNK], 5).unwrap();
        assert_eq!(
            l,
            vec![Launch {
                tensors: vec![1, 2, 3, 5],
                first_block: vec![0, 1, 2, 4],
                blocks: 7,
                base: 5
            }]
        );
        assert_eq!(end, 12);
        let (l, end) = plan(&[], 3).unwrap();
        assert!(l.is_empty());
        assert_eq!(end, 3);
        assert!(plan(&[0, 0], 0).unwrap().0.is_empty());
    }

    #[test]
    fn a_launch_takes_at_most_its_table_of_tensors() {
        let lens: Vec<usize> = (1..=150).map(|i| i * 1000).collect();
        let (l, end) = plan(&lens, 0).unwrap();
        assert_eq!(
            l.iter().map(|l| l.tensors.len()).collect::<Vec<_>>(),
            [64, 64, 22]
        );
        // Every tensor once, in order; blocks numbered on from launch to launch.
        let all: Vec<usize> = l.iter().flat_map(|l| l.tensors.clone()).collect();
        assert_eq!(all, (0..150).collect::<Vec<_>>());
        let mut base = 0;
        for launch in &l {
            assert_eq!(launch.base, base);
            let mut b = 0;
            for (&t, &f) in launch.tensors.iter().zip(&launch.first_block) {
                assert_eq!(f, b);
                b += lens[t].div_ceil(TABLE_CHUNK) as u32;
            }
            assert_eq!(launch.blocks, b);
            base += b;
        }
        assert_eq!(end, base);
    }
}
