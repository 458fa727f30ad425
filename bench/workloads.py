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
    kind: str  # "qa", "long-answer", "mix" (the two in turn; qa requests get `qa_output`),
    # "multi-turn" or "shared-doc" (below)
    config: str = "snapkv-25.toml"
    qa_output: tuple[int, int] = (24, 48)
    turns: int = 1  # multi-turn: turns per conversation (`requests` conversations)
    prefix_caching: bool = False  # what the workload is about needs vLLM's prefix caching on

    def make(self, tokenizer, prose_path, seed: int = 0, requests: int | None = None,
             prompt: tuple[int, int] | None = None, output: tuple[int, int] | None = None):
        """([[prompt token ids, max output tokens], ...], [expected answers or None, ...])."""
        import ruler

        rng = random.Random(seed)
        lo, hi = prompt or self.prompt
        olo, ohi = output or self.output
        b = ruler.Builder(tokenizer, open(prose_path, errors="replace").read())
        if self.kind == "multi-turn":
            return _multi_turn(b, rng, requests or self.requests, self.turns, (lo, hi), (olo, ohi)), \
                [None] * ((requests or self.requests) * self.turns)
        if self.kind == "shared-doc":
            return _shared_doc(b, rng, requests or self.requests, (lo, hi), (olo, ohi))
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

FOLLOW_UPS = ("What happens next? Continue the story at length.",
              "Describe the people and places in the text in detail.",
              "Retell the text from its beginning in your own words.",
              "Write a letter from one of the characters about these events.")


def _passage(b, rng: random.Random, n: int, question: str) -> list[int]:
    start = rng.random()

    def make(n_chars: int) -> list[int]:
        at = int(start * max(1, len(b.prose) - n_chars - 1))
        return b.ids(" ".join(b.prose[at:at + n_chars].split()), question, "")

    return b.fit(make, n)


def _multi_turn(b, rng: random.Random, conversations: int, turns: int, prompt, output) -> list:
    """Chats: turn 1 asks about a prose passage of `prompt` tokens; each later turn arrives when
    the previous one finished, and its prompt is the previous prompt, the answer, and a new user
    message (so each turn's prompt extends the last turn's prompt and answer)."""
    reqs = []
    for _ in range(conversations):
        first = len(reqs)
        reqs.append([_passage(b, rng, rng.randint(*prompt), "Summarise the text above."), rng.randint(*output)])
        for t in range(1, turns):
            msg = f"<|im_end|>\n<|im_start|>user\n{FOLLOW_UPS[(t - 1) % len(FOLLOW_UPS)]}<|im_end|>\n" \
                  "<|im_start|>assistant\n"
            reqs.append([b.tok(msg, add_special_tokens=False)["input_ids"], rng.randint(*output),
                         {"after": first + t - 1, "extend": True}])
    return reqs


def _shared_doc(b, rng: random.Random, questions: int, prompt, output):
    """Many questions on one document: a prose document of `prompt` tokens holding one magic
    number per key; each request asks for one key's number (the document, then the question).
    The first question arrives alone, the rest when it finished, as when a document is uploaded
    and then queried."""
    import ruler

    keys = [f"{a}-{w}" for a, w in zip(ruler.WORDS[::2], ruler.WORDS[1::2])][:questions]
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    n, order, start = rng.randint(*prompt), rng.random(), rng.random()

    def context(n_chars: int) -> str:
        at = int(start * max(1, len(b.prose) - n_chars - 1))
        text = " ".join(b.prose[at:at + n_chars].split())
        return ruler._insert([x.strip() + "." for x in text.split(".") if x.strip()], needles, random.Random(order))

    q = "What is the special magic number for {} mentioned in the provided text?"
    pre = "The special magic number for {} mentioned in the provided text is"
    # Fit the document once (with the longest question), then ask every question on it.
    doc_chars = 200
    lo, hi = 200, n * 8
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(b.ids(context(mid), q.format(keys[0]), pre.format(keys[0]))) <= n:
            lo = doc_chars = mid
        else:
            hi = mid - 1
    doc = context(doc_chars)
    reqs = [[b.ids(doc, q.format(k), pre.format(k)), rng.randint(*output)] for k in keys]
    for r in reqs[1:]:
        r.append({"after": 0, "extend": False})
    return reqs, [[v] for v in values]

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
    TextWorkload("multi-turn", "chats with prefix caching on: 4 turns each, a 1.5k-2.5k-token passage first, "
                 "128-256-token answers, each turn's prompt the last prompt + answer + a new message",
                 (1536, 2560), (128, 256), 6, "multi-turn", turns=4, prefix_caching=True),
    TextWorkload("long-generation-text", "long generation on SmolLM2: continue a 128-512-token prose passage for "
                 "2,048 tokens, 8 at once, KV-limited", (128, 512), (2048, 2048), 8, "long-answer",
                 config="decode-snapkv-512.toml"),
    TextWorkload("quest-decode", "decode-heavy: 8 long answers (512 tokens) at once, each continuing a 4k-token "
                 "prose passage (--prompt-len 7680:7680 for 8k)", (4096, 4096), (512, 512), 8, "long-answer",
                 config="quest-1024.toml"),
    TextWorkload("shared-doc", "many questions on one 3k-token document with prefix caching on (the first alone, "
                 "then 15 at once), short answers", (3072, 3072), (24, 48), 16, "shared-doc", prefix_caching=True),
]}
