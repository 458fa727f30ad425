"""Where a worker sits in vLLM's parallel groups: its tensor-parallel rank and group, its
pipeline stage and the number of stages.

Read once, when the worker's KV cache is made (`WorkerState.place`), and handed on from there:
the one place kvsieve asks vLLM's `parallel_state`. A worker state built outside vLLM's workers
sits alone, rank 0 of 1 and stage 0 of 1: with no groups initialized (vLLM's getters assert) or
without vLLM at all (scripts/torch_adapter_check.py on a GPU machine); only those two are taken
to mean so, any other failure is vLLM's and propagates.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    tp_rank: int = 0
    tp_size: int = 1
    stage: int = 0
    stages: int = 1
    # torch's host process group of the tensor-parallel workers (their collectives on outcomes);
    # None alone.
    tp_cpu_group: object | None = None


def _group(getter):
    try:
        return getter()
    except AssertionError:  # "... group is not initialized"
        return None


def read() -> Place:
    """This process's place, from vLLM's tensor- and pipeline-parallel groups."""
    try:
        from vllm.distributed import parallel_state as ps
    except ImportError:
        return Place()
    tp, pp = _group(ps.get_tp_group), _group(ps.get_pp_group)
    return Place(tp_rank=tp.rank_in_group if tp else 0, tp_size=tp.world_size if tp else 1,
                 stage=pp.rank_in_group if pp else 0, stages=pp.world_size if pp else 1,
                 tp_cpu_group=tp.cpu_group if tp and tp.world_size > 1 else None)
