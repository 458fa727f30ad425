//! Arbitrary rows, keep lists and lengths through `kvs_compact` on a small cache: the call
//! either succeeds or is refused with INVALID_ARGUMENT / BUFFER_TOO_SMALL, and a refused call
//! leaves every byte of the cache as it was. Never a panic, never an out-of-bounds write
//! (libFuzzer's AddressSanitizer build would catch one).
#![no_main]

use arbitrary::Arbitrary;
use kvsieve::ffi::{kvs_compact, kvs_kernels_free, kvs_kernels_new_cpu, SequenceDesc};
use kvsieve::kernels::KvCacheDesc;
use kvsieve::Status;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Args {
    layout: u8,
    block_size_log2: u8,
    row: Vec<i16>,
    cached_len: u16,
    protected_len: u16,
    keep: Vec<u16>,
    selected: u8,
    released_cap: u8,
}

const BLOCKS: usize = 6;
const HEADS: usize = 2;
const DIM: usize = 16;

fuzz_target!(|a: Args| {
    let bs = 16usize << (a.block_size_log2 % 2);
    let elems = BLOCKS * bs * HEADS * DIM * 2;
    let mut buf: Vec<u16> = (0..elems).map(|i| i as u16).collect();
    let before = buf.clone();
    let layout = (a.layout % 4) as u32;
    let packed = layout >= 2;
    let k = buf.as_mut_ptr();
    let desc = KvCacheDesc {
        k: k.cast(),
        v: if packed { std::ptr::null_mut() } else { unsafe { k.add(elems / 2) }.cast() },
        dtype: if layout == 2 { 0 } else { 2 },
        layout,
        device: 0,
        num_blocks: if layout == 2 { (BLOCKS / 2) as u32 } else { BLOCKS as u32 },
        block_size: bs as u32,
        num_kv_heads: HEADS as u32,
        head_dim: DIM as u32,
        block_stride: 0,
        token_stride: 0,
        head_stride: 0,
    };
    let row: Vec<i32> = a.row.iter().map(|&b| b as i32).collect();
    let keep: Vec<u32> = a.keep.iter().map(|&t| t as u32).collect();
    let seq = SequenceDesc {
        row: row.as_ptr(),
        row_len: row.len() as u32,
        cached_len: a.cached_len as u32,
        protected_len: a.protected_len as u32,
    };
    let mut kernels = std::ptr::null_mut();
    assert_eq!(unsafe { kvs_kernels_new_cpu(&mut kernels) }, Status::Ok);
    let mut released = vec![0i32; a.released_cap as usize + 1];
    let mut n = 0u32;
    let s = unsafe {
        kvs_compact(kernels, &desc, &seq, keep.as_ptr(), keep.len(), a.selected as u32, released.as_mut_ptr(), a.released_cap as usize, &mut n)
    };
    unsafe { kvs_kernels_free(kernels) };
    match s {
        Status::Ok => assert!(n as usize <= a.released_cap as usize),
        Status::InvalidArgument | Status::BufferTooSmall => assert!(buf == before, "refused call moved bytes"),
        other => panic!("unexpected status {other:?}"),
    }
});
