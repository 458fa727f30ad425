"""Builds libkvsieve (the crate at the repository root, `cargo build --release --lib`) into the
wheel next to the package, so `pip install` brings the library (lib.py finds it there; the
environment variable KVSIEVE_LIB still overrides). The wheel is platform-specific; scripts/wheel.sh
runs auditwheel to give it its manylinux tag. Editable installs (development) build nothing and
keep reading KVSIEVE_LIB or target/release.

The library carries the CUDA kernels (feature `cuda`, NVRTC and the driver loaded at run time);
    KVSIEVE_CARGO_FEATURES=""     builds it without them (CPU kernels only)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parents[2]
LIB = "libkvsieve.so"


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not (ROOT / "Cargo.toml").is_file():
            raise SystemExit(f"kvsieve-vllm: no Cargo.toml at {ROOT}; build the wheel from a kvsieve checkout "
                             "(scripts/wheel.sh), not from an sdist")
        cmd = ["cargo", "build", "--release", "--lib", "--manifest-path", str(ROOT / "Cargo.toml")]
        # With the CUDA kernels by default: cudarc loads the driver and NVRTC at run time, so the
        # same library runs on machines without CUDA (one wheel for CPU and GPU machines).
        # KVSIEVE_CARGO_FEATURES="" builds the CPU-only library.
        features = os.environ.get("KVSIEVE_CARGO_FEATURES", "cuda")
        if features:
            cmd += ["--features", features]
        subprocess.run(cmd, check=True)
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        dest = Path(self.build_lib) / "kvsieve_vllm" / LIB
        shutil.copy2(target / "release" / LIB, dest)


class BinaryDistribution(Distribution):
    """Holds a native library: installed to platlib, and the wheel is not pure."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """Any CPython 3 (the library is loaded with ctypes; no Python ABI used), one platform."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildWithLibrary, "bdist_wheel": PlatformWheel})
