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


@dataclass(frozen=True)
class TextWorkload:
    """A workload of real text for a real model (its tokenizer and chat template): `qa` asks the
    accuracy suite's questions (bench/ruler.py) and keeps their answers for scoring; `long-answer`
    asks the model to continue a prose haystack at length; `mix` alternates them."""

    name: str
    what: str
    prompt: tuple[int, int]
    output: tuple[int, int]
    requests: int
    kind: str  # "qa", "long-answer", or "mix" (the two in turn; qa requests get `qa_output`)
    config: str = "snapkv-25.toml"
    qa_output: tuple[int, int] = (24, 48)

    def make(self, tokenizer, prose_path, seed: int = 0, requests: int | None = None,
             prompt: tuple[int, int] | None = None, output: tuple[int, int] | None = None):
        """([[prompt token ids, max output tokens], ...], [expected answers or None, ...])."""
        import ruler

        rng = random.Random(seed)
        lo, hi = prompt or self.prompt
        olo, ohi = output or self.output
        b = ruler.Builder(tokenizer, open(prose_path, errors="replace").read())
        reqs, answers = [], []
        for i in range(requests or self.requests):
            n, out = rng.randint(lo, hi), rng.randint(olo, ohi)
            qa = self.kind == "qa" or (self.kind == "mix" and i % 2 == 0)
            if self.kind == "mix" and qa:
                out = rng.randint(*self.qa_output)
            if qa:
                task = QA_TASKS[i % len(QA_TASKS)]
                hay = ruler.haystacks(task)[(i // len(QA_TASKS)) % len(ruler.haystacks(task))]
                # The sample's own answer budget is small; the request asks for `out` tokens.
                s = ruler.make_sample(b, task, n + 64, hay, seed * 100_000 + i)
                reqs.append([s.prompt, out])
                answers.append(s.answers)
            else:
                start = rng.random()

                def make(n_chars: int, start=start) -> list[int]:
                    at = int(start * max(1, len(b.prose) - n_chars - 1))
                    text = " ".join(b.prose[at:at + n_chars].split())
                    return b.ids(text, "Continue the text above in the same style, at length.", "")
                reqs.append([b.fit(make, n), out])
                answers.append(None)
        return reqs, answers


QA_TASKS = ("niah_number", "niah_word", "niah_multikey", "vt")

WORKLOADS = {w.name: w for w in [
    Workload("long-prompt-qa", "question answering over a long document: 4k-8k prompt, 128-256 output",
             (4096, 8192), (128, 256), 16),
    Workload("long-generation", "long generation from a short prompt: 128-512 prompt, 2k output",
             (128, 512), (2048, 2048), 8, "long-generation.toml"),
    Workload("mixed", "a mix: 512-7k prompt, 64-1k output", (512, 7168), (64, 1024), 16),
    Workload("demo-generated", "the quick demo on a generated model: long-prompt QA (2k-4k prompt, 128-192 output)",
             (2048, 4096), (128, 192), 12),
    TextWorkload("demo", "the demo: SmolLM2 answering questions over 2k-4k-token prompts (24-48 output) and "
                 "continuing 2k-4k-token passages (256-512 output), in turn", (2048, 4096), (256, 512), 8, "mix"),
    TextWorkload("qa", "questions of the accuracy suite (needles, variable tracking) over 2k-8k prompts, short answers",
                 (2048, 8000), (24, 48), 16, "qa"),
    TextWorkload("long-answer", "continue a 1k-4k-token prose passage for 256-1024 tokens",
                 (1024, 4096), (256, 1024), 12, "long-answer"),
]}
