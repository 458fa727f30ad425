//! Page tables: a sequence's block-table row (dense, vLLM) and batches in FlashInfer's int32
//! CSR form (`indptr`, `indices`, `last_page_len`).

use crate::ensure_arg;
use crate::error::Result;

/// Check a block-table row before any byte moves: at least `needed` blocks, every id in
/// `[0, num_blocks)`, no id twice (two slots of one physical block would alias).
pub fn check_row(row: &[i32], num_blocks: usize, needed: usize) -> Result<()> {
    BlockIds::checked_row(row, num_blocks, needed).map(|_| ())
}

/// The part of `check_row` that needs no access to the ids (shared with the CUDA path, whose
/// rows live on the device and are checked there): the row holds `needed` blocks.
pub fn check_row_len(row_len: usize, needed: usize) -> Result<()> {
    ensure_arg!(
        row_len >= needed,
        "row has {row_len} blocks but cached_len needs {needed}"
    );
    Ok(())
}

/// The block ids seen so far by a check, so one id may not appear in two places (twice in a
/// row, or in a row and in the blocks a compaction writes).
pub struct BlockIds {
    seen: Vec<u64>,
    num_blocks: usize,
}

impl BlockIds {
    /// `check_row`, keeping the row's ids for checks of other lists against it.
    pub fn checked_row(row: &[i32], num_blocks: usize, needed: usize) -> Result<BlockIds> {
        check_row_len(row.len(), needed)?;
        let mut ids = BlockIds {
            seen: vec![0u64; num_blocks.div_ceil(64)],
            num_blocks,
        };
        ids.add("row", row, "appears twice in the row")?;
        Ok(ids)
    }

    /// Add `list` (called `name` in messages): every id in range and not seen before, else an
    /// error saying it `repeat`s.
    pub fn add(&mut self, name: &str, list: &[i32], repeat: &str) -> Result<()> {
        let n = self.num_blocks;
        for (i, &b) in list.iter().enumerate() {
            ensure_arg!(
                b >= 0 && (b as usize) < n,
                "{name}[{i}] = {b} is not a block id of this cache (0 <= id < num_blocks = {n})"
            );
            let (w, bit) = (b as usize / 64, 1u64 << (b as usize % 64));
            ensure_arg!(self.seen[w] & bit == 0, "{name}[{i}] = {b} {repeat}");
            self.seen[w] |= bit;
        }
        Ok(())
    }
}

/// Check a CSR page table of `last_page_len.len()` sequences: indptr starts at 0, never
/// decreases and ends at `nnz`; each non-empty sequence's last page holds 1..=block_size tokens.
pub fn check_csr(
    indptr: &[i32],
    nnz: usize,
    last_page_len: &[i32],
    block_size: Option<usize>,
) -> Result<()> {
    ensure_arg!(
        indptr.len() == last_page_len.len() + 1,
        "indptr has {} entries; it needs num_seqs + 1 = {}",
        indptr.len(),
        last_page_len.len() + 1
    );
    ensure_arg!(indptr[0] == 0, "indptr[0] = {} must be 0", indptr[0]);
    for i in 1..indptr.len() {
        ensure_arg!(
            indptr[i] >= indptr[i - 1],
            "indptr[{i}] = {} is below indptr[{}] = {}; indptr must not decrease",
            indptr[i],
            i - 1,
            indptr[i - 1]
        );
    }
    let last = *indptr.last().unwrap() as usize;
    ensure_arg!(
        last == nnz,
        "indptr[num_seqs] = {last} must equal the number of indices ({nnz})"
    );
    for (i, &l) in last_page_len.iter().enumerate() {
        let pages = indptr[i + 1] - indptr[i];
        let max = block_size.unwrap_or(i32::MAX as usize);
        ensure_arg!(
            pages == 0 || (l >= 1 && l as usize <= max),
            "last_page_len[{i}] = {l} is outside 1..={max}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_with_bad_ids_are_refused_with_the_position() {
        assert!(check_row(&[3, 1, 2], 4, 3).is_ok());
        assert!(check_row(&[3, 1], 4, 3)
            .unwrap_err()
            .message
            .contains("needs 3"));
        assert!(check_row(&[3, 4], 4, 1)
            .unwrap_err()
            .message
            .contains("row[1] = 4"));
        assert!(check_row(&[-1], 4, 1)
            .unwrap_err()
            .message
            .contains("row[0] = -1"));
        assert!(check_row(&[2, 0, 2], 4, 1)
            .unwrap_err()
            .message
            .contains("row[2] = 2 appears twice"));
    }

    #[test]
    fn csr_shape_is_checked() {
        assert!(check_csr(&[0, 2, 5], 5, &[3, 16], Some(16)).is_ok());
        assert!(check_csr(&[1, 2], 1, &[1], None)
            .unwrap_err()
            .message
            .contains("indptr[0]"));
        assert!(check_csr(&[0, 3, 2], 2, &[1, 1], None)
            .unwrap_err()
            .message
            .contains("decrease"));
        assert!(check_csr(&[0, 2], 3, &[1], None)
            .unwrap_err()
            .message
            .contains("number of indices"));
        assert!(check_csr(&[0, 2], 2, &[17], Some(16))
            .unwrap_err()
            .message
            .contains("last_page_len[0]"));
    }
}
