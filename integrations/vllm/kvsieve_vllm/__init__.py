"""kvsieve for vLLM.

This version ships the pieces the vLLM plugin stands on: `kvsieve_vllm.lib`, a ctypes binding
of libkvsieve (found through KVSIEVE_LIB or next to this package), and `kvsieve_vllm.layout`,
which probes vLLM's CPU KV-cache packing with vLLM's own write op and maps it to a kvsieve
layout. The engine hooks (scheduler, worker, attention capture) are not in this version.
"""

from .lib import KvsieveError, Library, load

__all__ = ["KvsieveError", "Library", "load"]
__version__ = "0.1.0"
