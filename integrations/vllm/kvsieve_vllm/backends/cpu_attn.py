"""vLLM's CPU attention backend (CPU_ATTN): the SnapKV observation-window capture from
`CPUAttentionBackendImpl.forward`."""

from __future__ import annotations

from ..lib import PHASE_PREFILL
from ..settings import settings


# SnapKV's observation window: the queries of each request's last `window` prompt positions,
# captured from the attention forward of whichever steps (prefill chunks) hold them.
# CAPTURE["plan"]: this step's [(request id, first batch token, count, first window slot)];
# CAPTURE["queries"][request id][layer index]: float32 [window, q_heads, head_dim].
CAPTURE: dict = {"plan": [], "queries": {}}


def plan_capture(runner, num_scheduled_tokens) -> None:
    CAPTURE["plan"] = []
    s = settings()
    if s.policy[PHASE_PREFILL] != "snapkv":
        return
    window = s.params[PHASE_PREFILL].window
    num_reqs = runner.input_batch.num_reqs
    starts = runner.query_start_loc.np[: num_reqs + 1]
    for i, rid in enumerate(runner.input_batch.req_ids[:num_reqs]):
        state = runner.requests.get(rid)
        if state is None:
            continue
        first = int(runner.input_batch.num_computed_tokens_cpu[i])
        n = int(num_scheduled_tokens[i])
        prompt = len(state.prompt_token_ids or ())
        lo, hi = max(first, prompt - window), min(first + n, prompt)
        if lo < hi:
            CAPTURE["plan"].append((rid, int(starts[i]) + lo - first, hi - lo, lo - (prompt - window)))


def wrap_forward(orig):
    def forward(self, layer, query, *args, **kwargs):
        if CAPTURE["plan"]:
            import torch
            from vllm.model_executor.models.utils import extract_layer_index

            index = extract_layer_index(layer.layer_name)
            window = settings().params[PHASE_PREFILL].window
            for rid, start, count, slot in CAPTURE["plan"]:
                per_layer = CAPTURE["queries"].setdefault(rid, {})
                buf = per_layer.get(index)
                if buf is None:
                    buf = per_layer[index] = torch.zeros(window, query.shape[1], query.shape[2], dtype=torch.float32)
                buf[slot:slot + count] = query[start:start + count].float()
        return orig(self, layer, query, *args, **kwargs)

    return forward


