"""Pipeline parallelism: how the acknowledgements of every stage reach the scheduler.

With `--pipeline-parallel-size N` each stage holds its own layers' KV cache and runs every event
of a step on those layers, after its part of the step's forward. Only the last stage's first
tensor-parallel worker returns a ModelRunnerOutput to the scheduler (vLLM's executors drop the
other ranks' returns), so an earlier stage's acknowledgements travel down the pipeline with the
step's hidden states: the stage puts them, as one uint8 tensor under `KEY`, on the
IntermediateTensors it returns; the next stage takes them off before vLLM copies the received
tensors into its buffers (`take`), and runs each event only where every earlier stage finished
it (`Upstream.ack_for`):
- an earlier stage DONE: this stage runs the event; if it then fails here, the earlier layers
  are compacted and these are not: TORN (the request recomputes);
- FAILED: nothing moved anywhere, this stage does not move either: FAILED, KV intact;
- TORN, or no acknowledgement (lost on the way): this stage does not run it and passes on
  the same (TORN), or nothing (the scheduler then tears the request: it recomputes).
So the scheduler frees blocks only for events every stage compacted, exactly as it does for
tensor-parallel workers, and counts each event once. A stage's tensor-parallel workers agree
on every outcome first (`worker._agree`), so each of them, receiving its peer's payload, makes
the same decisions.

The payload is a tensor (vLLM's CPU shared-memory transport sends tensors only), on the cache's
device so that a CUDA pipeline sends it like the hidden states. Each stage processes the steps in
order, so the payload a stage receives is always for the step it is running.
"""

from __future__ import annotations

import json
from .protocol import PROTOCOL_VERSION, Ack, Outcome, StepAcks

KEY = "kvsieve_acks"


class Upstream:
    """What the earlier stages did with a step's events: the received payload, taken off before
    the forward and decoded after it (reading it on the host waits for the device)."""

    def __init__(self, raw=None) -> None:
        self._raw = raw
        self._decoded: tuple[dict[str, Ack] | None, float] | None = None

    def _decode(self) -> tuple[dict[str, Ack] | None, float]:
        if self._decoded is None:
            self._decoded = (None, 0.0)
            if self._raw is not None:
                try:
                    body = json.loads(bytes(self._raw.cpu().numpy().tobytes()).decode())
                    if body.get("version") == PROTOCOL_VERSION:
                        self._decoded = ({rid: Ack(rid, Outcome(o), why) for rid, o, why in body["acks"]},
                                         float(body["seconds"]))
                except (ValueError, UnicodeDecodeError, KeyError, TypeError):
                    pass
            self._raw = None
        return self._decoded

    @property
    def acks(self) -> dict[str, Ack] | None:
        """The earlier stages' acks by request (None: no payload came, or not one this reads)."""
        return self._decode()[0]

    @property
    def seconds(self) -> float:
        return self._decode()[1]

    def ack_for(self, req_id: str) -> Ack | None:
        """The earlier stages' ack for an event; None when they never acknowledged it."""
        acks = self.acks
        return None if acks is None else acks.get(req_id)


def after_earlier_stages(own: Ack) -> Ack:
    """The event's outcome over the stages so far, once the earlier ones were DONE: this
    stage's, except that failing here after they compacted their layers tears the request."""
    if own.outcome != Outcome.FAILED:
        return own
    return Ack(own.req_id, Outcome.TORN, "an earlier pipeline stage compacted its layers, this stage could not: "
               + own.reason)


def attach(out, acks: StepAcks, device, tp_size: int):
    """A copy of the IntermediateTensors `out` that also carries `acks` to the next stage (a
    copy: the runner may return the same object again); `tp_size`: the stage's tensor-parallel
    workers."""
    import torch
    from vllm.sequence import IntermediateTensors

    body = json.dumps({"version": PROTOCOL_VERSION, "seconds": acks.seconds,
                       "acks": [[a.req_id, int(a.outcome), a.reason] for a in acks.acks.values()]}).encode()
    # vLLM's torch.distributed transport splits a tensor whose size the tensor-parallel group
    # divides among the group's ranks and all-gathers it on the receiving side, which is right
    # only for tensors equal on every rank. A stage's workers agree on every outcome but not on
    # reasons or timings: padded (JSON whitespace) to a size the group never divides, each
    # worker's payload goes whole to its peer in the next stage.
    if tp_size > 1:
        body += b" " * ((1 - len(body)) % tp_size)
    payload = torch.frombuffer(bytearray(body), dtype=torch.uint8).to(device)
    return IntermediateTensors({**out.tensors, KEY: payload})


def take(intermediate_tensors) -> Upstream:
    """Take the earlier stages' payload off the received IntermediateTensors (vLLM copies every
    received key into buffers that only have the model's), undecoded."""
    tensors = getattr(intermediate_tensors, "tensors", None)
    if not isinstance(tensors, dict):
        return Upstream()
    return Upstream(tensors.pop(KEY, None))
