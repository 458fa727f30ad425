"""What kvsieve refuses: vLLM versions, runners and engine options it has not mapped."""

from __future__ import annotations

import os

from .lib import KvsieveError

MAPPED_VERSION_PREFIX = "0.32."


class UnsupportedSetup(KvsieveError):
    """vLLM (version, runner, backend, model or options) is not one kvsieve has mapped."""

    def __init__(self, message: str):
        super().__init__("KVS_STATUS_UNSUPPORTED", "kvsieve cannot run on this vLLM setup: " + message)


def check_version() -> None:
    import vllm

    if not vllm.__version__.startswith(MAPPED_VERSION_PREFIX):
        raise UnsupportedSetup(f"vLLM {vllm.__version__}; kvsieve's hooks are mapped on vLLM 0.32.x")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "", "false", "False"):
        raise UnsupportedSetup("VLLM_USE_V2_MODEL_RUNNER is set; only the V1 model runner is mapped "
                               "(set VLLM_USE_V2_MODEL_RUNNER=0)")


def check_engine(vllm_config) -> None:
    """Options decided at engine start that this version does not support."""
    if vllm_config.speculative_config is not None:
        raise UnsupportedSetup("speculative decoding is enabled; kvsieve does not support it yet")
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        raise UnsupportedSetup("asynchronous scheduling is enabled; the release of blocks is "
                               "mapped for synchronous scheduling only")
    hf = vllm_config.model_config.hf_config
    if getattr(hf, "alibi", False) or "alibi" in str(getattr(hf, "position_embedding_type", "")):
        raise UnsupportedSetup("the model applies ALiBi position biases at attention time")
