"""Named workloads: seeded token prompts and output lengths for what each models."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    prompt: tuple[int, int]  # inclusive range of prompt tokens
    output: tuple[int, int]  # inclusive range of output tokens
    requests: int
    config: str = "snapkv-25.toml"  # kvsieve's config for it, in bench/configs/

    def make(self, vocab: int, seed: int = 0, requests: int | None = None,
             prompt: tuple[int, int] | None = None, output: tuple[int, int] | None = None) -> list:
        """[[prompt token ids, max output tokens], ...]; ids avoid 0 and 1 (BOS/EOS)."""
        rng = random.Random(seed)
        lo, hi = prompt or self.prompt
        olo, ohi = output or self.output
        out = []
        for _ in range(requests or self.requests):
            n = rng.randint(lo, hi)
            out.append([[rng.randrange(2, vocab) for _ in range(n)], rng.randint(olo, ohi)])
        return out


WORKLOADS = {w.name: w for w in [
    Workload("long-prompt-qa", "question answering over a long document: 4k-8k prompt, 128-256 output",
             (4096, 8192), (128, 256), 16),
    Workload("long-generation", "long generation from a short prompt: 128-512 prompt, 2k output",
             (128, 512), (2048, 2048), 8, "long-generation.toml"),
    Workload("mixed", "a mix: 512-7k prompt, 64-1k output", (512, 7168), (64, 1024), 16),
    Workload("demo", "the demo's default: long-prompt QA, fewer requests (2k-4k prompt, 128-192 output)",
             (2048, 4096), (128, 192), 12),
]}
