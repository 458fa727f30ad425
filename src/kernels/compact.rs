//! Compaction of one sequence's K and V, for one layer, in place or into other blocks.
//!
//! For every KV head, the kept cached positions `keep[h][0..k]` (ascending, all at or after the
//! protected prefix `P`) move to positions `P..P+k`.
//!
//! In place (`dest` None), the row itself holds them: because `keep[h][j] >= P + j` and the copy
//! runs in ascending `j`, each source is read before anything overwrites it, so the forward
//! gather equals a gather from a snapshot, bit for bit. Blocks of the row past the new end are
//! released; nothing is written outside the row's blocks from `P` on.
//!
//! Out of place (`dest` Some), position `P + j` lives at `dest[j / bs]`, slot `j % bs`: the
//! source row is only read, so blocks other sequences share (a prefix cache) stay exactly as
//! they were. `dest` holds `ceil(k / bs)` blocks, none of them in the row; every source block
//! from `P` on is released (the caller drops them from the sequence).
//!
//! Either way everything is validated before the first byte moves.

use super::layout::KvCache;
use super::page_table::BlockIds;
use crate::ensure_arg;
use crate::error::{Error, Result};
use crate::status::Status;
use std::ops::Range;

/// One sequence's compaction request.
#[derive(Debug, Clone, Copy)]
pub struct Compaction<'a> {
    /// The sequence's physical block ids, in order.
    pub row: &'a [i32],
    pub cached_len: usize,
    pub protected_len: usize,
    /// `[num_kv_heads][selected]` cached positions, each row strictly ascending, in `[P, C)`.
    pub keep: &'a [u32],
    pub selected: usize,
    /// Out of place: the `ceil(selected / block_size)` blocks that receive positions `P..P+k`.
    pub dest: Option<&'a [i32]>,
}

/// The destination blocks an out-of-place compaction of `selected` tokens needs.
pub fn dest_blocks(cache: &KvCache, selected: usize) -> usize {
    selected.div_ceil(cache.block_size)
}

/// The shape checks of a compaction, which need no access to the row's or keep lists'
/// contents (so the CUDA path, whose arrays live on the device, shares them). Returns the row
/// positions of the blocks the compaction releases.
pub fn check_shape(
    cache: &KvCache,
    row_len: usize,
    cached_len: usize,
    protected_len: usize,
    keep_len: usize,
    selected: usize,
    dest_len: Option<usize>,
) -> Result<Range<usize>> {
    let (bs, c, p, k, h) = (
        cache.block_size,
        cached_len,
        protected_len,
        selected,
        cache.num_kv_heads,
    );
    ensure_arg!(p <= c, "protected_len = {p} exceeds cached_len = {c}");
    ensure_arg!(
        p % bs == 0,
        "protected_len = {p} is not a multiple of block_size = {bs}"
    );
    ensure_arg!(
        k <= c - p,
        "selected = {k} exceeds the {} tokens after the protected prefix",
        c - p
    );
    ensure_arg!(
        keep_len == h * k,
        "keep has {keep_len} entries; expected num_kv_heads * selected = {h} * {k}"
    );
    let old_blocks = c.div_ceil(bs);
    ensure_arg!(
        row_len >= old_blocks,
        "row has {row_len} blocks but cached_len needs {old_blocks}"
    );
    match dest_len {
        None => Ok((p + k).div_ceil(bs)..old_blocks),
        Some(n) => {
            let need = dest_blocks(cache, k);
            ensure_arg!(
                n == need,
                "dest has {n} blocks; selected = {k} tokens need ceil(selected / block_size) = {need}"
            );
            Ok(p / bs..old_blocks)
        }
    }
}

/// An in-place compaction's `released` buffer holds the ids of the blocks it releases.
pub fn check_released(released_cap: usize, release: &Range<usize>) -> Result<()> {
    if released_cap < release.len() {
        return Err(Error::new(
            Status::BufferTooSmall,
            format!(
                "released holds {released_cap} ids; this compaction releases {}",
                release.len()
            ),
        ));
    }
    Ok(())
}

impl Compaction<'_> {
    /// Validate against `cache`; returns the row positions of the blocks to release.
    pub fn check(&self, cache: &KvCache) -> Result<Range<usize>> {
        let released = check_shape(
            cache,
            self.row.len(),
            self.cached_len,
            self.protected_len,
            self.keep.len(),
            self.selected,
            self.dest.map(<[i32]>::len),
        )?;
        let (c, p, k, h) = (
            self.cached_len,
            self.protected_len,
            self.selected,
            cache.num_kv_heads,
        );
        let mut ids = BlockIds::checked_row(self.row, cache.num_blocks, released.end)?;
        if let Some(dest) = self.dest {
            // The row is read while dest is written: a shared block must never be written.
            ids.add(
                "dest",
                dest,
                "is in the source row or twice in dest; pass fresh blocks, disjoint from the row",
            )?;
        }
        for head in 0..h {
            let ks = &self.keep[head * k..(head + 1) * k];
            for (j, &t) in ks.iter().enumerate() {
                let t = t as usize;
                ensure_arg!(
                    t >= p && t < c,
                    "keep[{head}][{j}] = {t} is outside the selectable range [{p}, {c})"
                );
                ensure_arg!(
                    j == 0 || t > ks[j - 1] as usize,
                    "keep[{head}] is not strictly ascending at {j} ({} then {t}); pass sorted, unique positions",
                    ks[j - 1]
                );
            }
        }
        Ok(released)
    }
}

/// Compact `req` in `cache` (host memory). Returns the row positions of the released blocks.
///
/// KV heads touch disjoint memory, so large compactions split them over threads; within a head
/// the copies run in ascending order (the in-place safety argument above).
///
/// # Safety
/// `cache` must describe live host tensors of `num_blocks * block_stride` elements that nothing
/// else reads or writes during the call.
pub unsafe fn compact(cache: &KvCache, req: &Compaction) -> Result<Range<usize>> {
    let released = req.check(cache)?;
    let heads = cache.num_kv_heads;
    let bytes = 2 * heads * req.selected * cache.head_dim * cache.dtype.size();
    let threads = if bytes < PARALLEL_BYTES {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(heads)
    };
    if threads <= 1 {
        // SAFETY: validated above; the caller owns the tensors for the call.
        unsafe { move_heads(cache, req, 0..heads) };
    } else {
        let per = heads.div_ceil(threads);
        std::thread::scope(|s| {
            for first in (0..heads).step_by(per) {
                let range = first..(first + per).min(heads);
                // SAFETY: as above; each thread moves only its own heads' elements.
                s.spawn(move || unsafe { move_heads(cache, req, range) });
            }
        });
    }
    Ok(released)
}

/// Below this many bytes moved, a thread costs more than it saves.
const PARALLEL_BYTES: usize = 1 << 20;

/// Move the kept tokens of `heads`. When a token's heads are adjacent in memory (NHD), walk
/// tokens outer and heads inner so writes stream; otherwise (HND) walk each head's tokens.
unsafe fn move_heads(cache: &KvCache, req: &Compaction, heads: Range<usize>) {
    let k = req.selected;
    let tokens_outer = cache.rows_contiguous() && cache.token_stride > cache.head_stride;
    if tokens_outer {
        for j in 0..k {
            for head in heads.clone() {
                // SAFETY: forwarded from `compact`.
                unsafe { move_token(cache, req, head, j) };
            }
        }
    } else {
        for head in heads {
            for j in 0..k {
                // SAFETY: forwarded from `compact`.
                unsafe { move_token(cache, req, head, j) };
            }
        }
    }
}

/// Copy K and V of `keep[head][j]` to position `protected_len + j` (in the row, or in `dest`).
#[inline(always)]
unsafe fn move_token(cache: &KvCache, req: &Compaction, head: usize, j: usize) {
    let (bs, d, esz) = (cache.block_size, cache.head_dim, cache.dtype.size());
    let src = req.keep[head * req.selected + j] as usize;
    let (sb, ss) = (req.row[src / bs] as usize, src % bs);
    let (db, ds) = match req.dest {
        Some(dest) => (dest[j / bs] as usize, j % bs),
        None => {
            let dst = req.protected_len + j;
            if src == dst {
                return; // already in place (the common case for sinks)
            }
            (req.row[dst / bs] as usize, dst % bs)
        }
    };
    if cache.rows_contiguous() {
        // SAFETY: validated coordinates; distinct (block, slot, head) never alias (layout check).
        unsafe {
            std::ptr::copy_nonoverlapping(
                cache.k.add(cache.k_offset(sb, head, ss, 0) * esz),
                cache.k.add(cache.k_offset(db, head, ds, 0) * esz),
                d * esz,
            );
            std::ptr::copy_nonoverlapping(
                cache.v.add(cache.v_offset(sb, head, ss, 0) * esz),
                cache.v.add(cache.v_offset(db, head, ds, 0) * esz),
                d * esz,
            );
        }
    } else {
        for e in 0..d {
            // SAFETY: as above, element by element for the packed layouts.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    cache.k.add(cache.k_offset(sb, head, ss, e) * esz),
                    cache.k.add(cache.k_offset(db, head, ds, e) * esz),
                    esz,
                );
                std::ptr::copy_nonoverlapping(
                    cache.v.add(cache.v_offset(sb, head, ss, e) * esz),
                    cache.v.add(cache.v_offset(db, head, ds, e) * esz),
                    esz,
                );
            }
        }
    }
}
