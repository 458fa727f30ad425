"""kvsieve for vLLM: a plugin that compresses each request's KV cache in a stock vLLM.

- `kvsieve_vllm.plugin.register` is vLLM's entry point (`vllm.general_plugins`); it is inert
  unless KVSIEVE_CONFIG names a kvsieve TOML file.
- `kvsieve_vllm.lib` binds libkvsieve with ctypes (KVSIEVE_LIB, or next to this package).
- `kvsieve_vllm.layout` probes vLLM's CPU KV-cache packing with vLLM's own write op.
- `kvsieve_vllm.stats()` returns this process's counters.
"""

from .lib import KvsieveError, Library, load
from .plugin import register
from .stats import stats

__all__ = ["KvsieveError", "Library", "load", "register", "stats"]
__version__ = "0.1.0"
