"""kvsieve for vLLM: a plugin that compresses each request's KV cache in a stock vLLM.

- `plugin.register` is vLLM's entry point (`vllm.general_plugins`); it is inert unless
  KVSIEVE_CONFIG names a kvsieve TOML file.
- `scheduler` (vLLM's Scheduler side) and `worker` (the model runner side) talk through
  `protocol` (one StepPlan per step, one StepAcks back); `state` is each request's state
  machine; `checks` refuses what kvsieve cannot serve while the engine starts;
  `backends.cpu_attn` maps vLLM's CPU attention; `capture` keeps SnapKV windows.
- `lib` binds libkvsieve with ctypes (KVSIEVE_LIB, or next to this package); `layout` probes
  vLLM's CPU KV-cache packing with vLLM's own write op.
- `stats()` returns this process's counters; `faults` injects failures for tests.
"""

from .lib import KvsieveError, Library, load
from .plugin import register
from .stats import stats

__all__ = ["KvsieveError", "Library", "load", "register", "stats"]
__version__ = "0.1.0"
