//! Every CUDA kernel compiles with NVRTC for sm_80 and sm_90 — no GPU needed, so CI catches a
//! kernel that does not compile. Needs libnvrtc (scripts/test.sh installs the
//! `nvidia-cuda-nvrtc-cu12` wheel and puts it on LD_LIBRARY_PATH). Without it the test fails,
//! unless KVSIEVE_SKIP_NVRTC=1 says a developer chose to skip it.
#![cfg(feature = "cuda")]

use kvsieve::cuda::source::{compile, nvrtc_present, KERNEL_NAMES};

#[test]
fn kernels_compile_to_ptx_for_sm80_and_sm90() {
    if !nvrtc_present() {
        if std::env::var_os("KVSIEVE_SKIP_NVRTC").is_some() {
            eprintln!("skipped: libnvrtc not found and KVSIEVE_SKIP_NVRTC is set");
            return;
        }
        panic!("libnvrtc not found: run through scripts/test.sh (it installs nvidia-cuda-nvrtc-cu12) or set LD_LIBRARY_PATH");
    }
    for arch in ["compute_80", "compute_90"] {
        let ptx = compile(arch).unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        for name in KERNEL_NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "{arch}: {name} missing from the PTX"
            );
        }
        let target = format!(".target sm_{}", &arch["compute_".len()..]);
        assert!(text.contains(&target), "{arch}: PTX targets something else");
    }
}
