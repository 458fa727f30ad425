//! Only on the emulated CUDA device of `tests/cuda_emu` (EMULATED; `scripts/cuda-emulated.sh`
//! runs it, `#[ignore]`d elsewhere): the start-up self-check of `kvs_kernels_new_cuda` refuses a
//! deliberately broken kernel (the emulated driver skips the launches of the kernel named by
//! `KVSIEVE_EMU_BREAK`), naming the call, dtype, layout, device and driver.
#![cfg(feature = "cuda")]

use kvsieve::ffi::*;
use kvsieve::Status;
use std::ffi::CStr;
use std::ptr::null_mut;

fn last_error() -> String {
    unsafe { CStr::from_ptr(kvs_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
#[ignore = "needs the emulated CUDA driver of tests/cuda_emu (scripts/cuda-emulated.sh runs it)"]
fn the_self_check_refuses_a_broken_kernel() {
    let mut k = null_mut();
    let s = unsafe { kvs_kernels_new_cuda(0, null_mut(), &mut k) };
    assert_eq!(s, Status::Ok, "the emulated device: {}", last_error());
    unsafe { kvs_kernels_free(k) };
    // (CUDA kernel broken, the call the self-check names)
    for (kernel, call) in [
        ("kvs_knorm", "kvs_score_knorm"),
        ("kvs_select_tokens", "kvs_select_tokens"),
        ("kvs_compact_scatter", "kvs_compact"),
        ("kvs_snapkv_pool", "kvs_score_snapkv"),
    ] {
        // This binary holds this one test: no other thread reads the environment meanwhile.
        std::env::set_var("KVSIEVE_EMU_BREAK", kernel);
        let mut k = null_mut();
        let s = unsafe { kvs_kernels_new_cuda(0, null_mut(), &mut k) };
        let m = last_error();
        assert_eq!(s, Status::CudaError, "{kernel} broken: {m}");
        assert!(
            k.is_null(),
            "no handle for a device that failed its self-check"
        );
        assert!(
            m.contains("self-check failed")
                && m.contains(&format!("{call} on a Nhd f32 cache"))
                && m.contains("kvsieve emulated CUDA device (host), compute capability 9.0")
                && m.contains("driver CUDA 12.9"),
            "{kernel} broken: {m}"
        );
    }
    std::env::remove_var("KVSIEVE_EMU_BREAK");
}
