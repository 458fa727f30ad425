//! The caller's buffers of one call must not overlap where the call writes: a slice that the
//! call writes may share no byte with any other buffer of the call (read or written), the KV
//! tensors included. Checked before any slice is formed, so no aliasing `&`/`&mut` pair ever
//! exists and nothing is read or written when the check fails.

use crate::error::{Error, Result};
use crate::kernels::KvCache;

/// One buffer of a call: its C argument name, byte range and whether the call writes it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Region {
    name: &'static str,
    start: usize,
    len: usize,
    written: bool,
}

impl Region {
    /// `count` elements of `T` at `ptr` that the call only reads.
    pub(super) fn read<T>(name: &'static str, ptr: *const T, count: usize) -> Region {
        Region::new(
            name,
            ptr as usize,
            count.saturating_mul(size_of::<T>()),
            false,
        )
    }

    /// `count` elements of `T` at `ptr` that the call writes.
    pub(super) fn write<T>(name: &'static str, ptr: *const T, count: usize) -> Region {
        Region::new(
            name,
            ptr as usize,
            count.saturating_mul(size_of::<T>()),
            true,
        )
    }

    fn new(name: &'static str, start: usize, len: usize, written: bool) -> Region {
        Region {
            name,
            start,
            len,
            written,
        }
    }

    /// The K and V tensors of a validated cache (one region when K and V share a tensor).
    pub(super) fn kv(cache: &KvCache, written: bool) -> [Option<Region>; 2] {
        let bytes = cache.extent_elems().saturating_mul(cache.dtype.size());
        let k = Region::new("cache.k", cache.k as usize, bytes, written);
        let v =
            (cache.v != cache.k).then(|| Region::new("cache.v", cache.v as usize, bytes, written));
        [Some(k), v]
    }

    fn overlaps(&self, other: &Region) -> bool {
        self.len > 0
            && other.len > 0
            && self.start < other.start.saturating_add(other.len)
            && other.start < self.start.saturating_add(self.len)
    }
}

/// Refuse the call when a written buffer overlaps any other buffer. K against V is not
/// checked here: interleaved K/V pages overlap as ranges without sharing an element, which
/// `KvCache::new` proves element by element.
pub(super) fn check_disjoint(regions: &[Option<Region>]) -> Result<()> {
    let all: Vec<&Region> = regions.iter().flatten().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            let kv_pair = a.name.starts_with("cache.") && b.name.starts_with("cache.");
            if (a.written || b.written) && !kv_pair && a.overlaps(b) {
                return Err(Error::invalid_arg(format!(
                    "{} [{:#x}, +{} bytes) overlaps {} [{:#x}, +{} bytes) and the call writes {}; \
                     pass separate buffers",
                    a.name,
                    a.start,
                    a.len,
                    b.name,
                    b.start,
                    b.len,
                    if a.written { a.name } else { b.name }
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_buffers_may_not_overlap_anything() {
        let buf = [0u32; 16];
        let p = buf.as_ptr();
        let row = Region::read("row", p, 8);
        let out = Region::write("out_row", p.wrapping_add(7), 4);
        let e = check_disjoint(&[Some(row), Some(out)]).unwrap_err();
        assert!(
            e.message.contains("row") && e.message.contains("out_row"),
            "{}",
            e.message
        );
        // Adjacent is fine; two readers may share memory.
        let after = Region::write("out_row", p.wrapping_add(8), 4);
        assert!(check_disjoint(&[Some(row), Some(after)]).is_ok());
        let again = Region::read("scores", p, 8);
        assert!(check_disjoint(&[Some(row), Some(again)]).is_ok());
        // Empty buffers never overlap.
        let empty = Region::write("released", p, 0);
        assert!(check_disjoint(&[Some(row), Some(empty)]).is_ok());
    }
}
