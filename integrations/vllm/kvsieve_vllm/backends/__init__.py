"""One module per KV layout of the vLLM attention backends kvsieve maps: `cpu_attn` (CPU_ATTN,
ISA-packed, probed at start-up) and `flash_layout` (FLASH_ATTN, FLASHINFER and TRITON_ATTN share
one strided layout in vLLM 0.32). `adapter_for` names the module for a backend and refuses any
other by name (MLA backends, FlexAttention, ROCm, quantized-KV variants)."""

from __future__ import annotations

import importlib

from ..lib import KvsieveError

MAPPED = {"CPU_ATTN": "cpu_attn", "FLASH_ATTN": "flash_layout", "FLASHINFER": "flash_layout",
          "TRITON_ATTN": "flash_layout"}


def adapter_for(backend: str):
    """The adapter module of a vLLM attention backend (`AttentionBackend.get_name()`)."""
    module = MAPPED.get(backend)
    if module is None:
        raise KvsieveError("KVS_STATUS_UNSUPPORTED",
                           f"attention backend {backend}: kvsieve maps {', '.join(MAPPED)} only (choose one with "
                           "--attention-backend, or unset KVSIEVE_CONFIG)")
    return importlib.import_module(f"{__name__}.{module}")
