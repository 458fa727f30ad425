//! Every CUDA kernel compiles with NVRTC, to SASS for sm_80 and sm_90 (what the backend loads on
//! those devices: no PTX JIT, so no driver older than the NVRTC is asked to read its PTX) and to
//! PTX (the fallback for a device newer than the NVRTC) — no GPU needed, so CI catches a kernel
//! that does not compile. Needs libnvrtc (scripts/test.sh installs the `nvidia-cuda-nvrtc-cu12`
//! wheel and puts it on LD_LIBRARY_PATH). Without it the test fails, unless KVSIEVE_SKIP_NVRTC=1
//! says a developer chose to skip it.
#![cfg(feature = "cuda")]

use kvsieve::cuda::nvrtc::Nvrtc;
use kvsieve::cuda::source::{compile, target_for, Target, KERNEL_NAMES};

fn nvrtc() -> Option<Nvrtc> {
    match Nvrtc::open(None) {
        Ok(n) => Some(n),
        Err(e) if std::env::var_os("KVSIEVE_SKIP_NVRTC").is_some() => {
            eprintln!("skipped: {} (KVSIEVE_SKIP_NVRTC is set)", e.message);
            None
        }
        Err(e) => panic!(
            "{}: run through scripts/test.sh (it installs nvidia-cuda-nvrtc-cu12) or set LD_LIBRARY_PATH",
            e.message
        ),
    }
}

#[test]
fn kernels_compile_to_sass_and_ptx_for_sm80_and_sm90() {
    let Some(nv) = nvrtc() else { return };
    let archs = nv.supported_archs().unwrap();
    for (major, cc) in [(8, 80), (9, 90)] {
        let target = target_for(major, 0, &archs).unwrap();
        assert_eq!(
            target,
            Target::Sass(cc),
            "NVRTC {:?} supports {archs:?}",
            nv.version
        );
        let cubin = compile(&nv, target).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "sm_{cc}: a cubin is an ELF image");
        for name in KERNEL_NAMES {
            assert!(
                cubin.windows(name.len()).any(|w| w == name.as_bytes()),
                "sm_{cc}: {name} missing from the cubin"
            );
        }
        let ptx = compile(&nv, Target::Ptx(cc)).unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&ptx);
        for name in KERNEL_NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "compute_{cc}: {name} missing from the PTX"
            );
        }
        assert!(
            text.contains(&format!(".target sm_{cc}")),
            "compute_{cc}: PTX targets something else"
        );
    }
}

#[test]
fn targets_follow_the_device_and_what_nvrtc_knows() {
    let known = [75, 80, 86, 89, 90];
    assert_eq!(target_for(8, 6, &known).unwrap(), Target::Sass(86));
    // A device newer than the NVRTC: the newest older PTX, JIT-compiled by its (newer) driver.
    assert_eq!(target_for(12, 0, &known).unwrap(), Target::Ptx(90));
    assert_eq!(target_for(10, 0, &known).unwrap(), Target::Ptx(90));
    let e = target_for(7, 5, &known).unwrap_err();
    assert!(e.message.contains("below 8.0"), "{}", e.message);
    let e = target_for(9, 0, &[75]).unwrap_err();
    assert!(e.message.contains("install a newer NVRTC"), "{}", e.message);
}

#[test]
fn an_nvrtc_newer_than_the_driver_or_missing_is_refused_naming_versions() {
    let Some(nv) = nvrtc() else { return };
    // The NVRTC found is newer than a (pretend) driver one major older: passed over, and the
    // error names both versions.
    let older = nv.version.0 - 1;
    match Nvrtc::open(Some(older)) {
        Ok(found) => assert!(found.version.0 <= older, "{:?}", found.version),
        Err(e) => {
            let want = format!("is newer than the driver's CUDA {older}");
            assert!(e.message.contains(&want), "{}", e.message);
            assert!(
                e.message
                    .contains(&format!("NVRTC {}.{}", nv.version.0, nv.version.1)),
                "{}",
                e.message
            );
        }
    }
}

/// The NVRTC wheels of the project's venv (scripts/setup.sh; torch brings the CUDA 13 one).
fn venv_nvrtcs() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let mut out = Vec::new();
    for py in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for rel in [
            "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
            "nvidia/cu13/lib/libnvrtc.so.13",
        ] {
            let p = py.path().join("site-packages").join(rel);
            if p.exists() {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn kernels_compile_with_nvrtc_12_and_13() {
    let found = venv_nvrtcs();
    if found.is_empty() {
        eprintln!(
            "skipped: no NVRTC wheel in .venv (scripts/setup.sh installs nvidia-cuda-nvrtc-cu12)"
        );
        return;
    }
    for path in found {
        let nv =
            Nvrtc::open_among(std::slice::from_ref(&path), None).unwrap_or_else(|e| panic!("{e}"));
        let target = target_for(9, 0, &nv.supported_archs().unwrap()).unwrap();
        let cubin = compile(&nv, target).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{path}");
        eprintln!(
            "NVRTC {}.{} ({path}): {} bytes of sm_90 SASS",
            nv.version.0,
            nv.version.1,
            cubin.len()
        );
    }
}
