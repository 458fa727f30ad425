"""RULER-style long-context tasks, generated from a seed, in a model's chat template with the
question last (so a compression at prefill end has seen it), except `niah_qfirst`.

Tasks (after RULER, Hsieh et al. 2024, sized for a 135M model):
- `niah_number`, `niah_word`, `niah_uuid`: one needle "One of the special magic {kind}s for
  {key} is: {value}." at a random depth of a haystack; the question asks for it.
- `niah_multikey`: the needle plus three needles of other keys (distractors).
- `niah_multivalue`: four needles of the same key; all four values are asked for.
- `niah_qfirst`: `niah_number` with the question before the document and an answer prefix that
  does not name the key, so the prompt's last tokens say nothing of what is asked: the task a
  compression chosen at prefill end by the prompt's last queries (SnapKV's window) cannot plan
  for, as with a question asked after a document was compressed; a selection made per decode
  step from the answer's own queries (Quest) can.
- `vt`: variable tracking, a chain `VAR A = 12345. VAR B = VAR A. ...` of four hops spread over
  the haystack; every variable holding the value is asked for.
- `cwe`: common words extraction, a numbered word list where five words recur; the five most
  common are asked for.
- `fwe`: frequent words extraction, random coded words with Zipf frequencies; the three most
  frequent are asked for.
Haystacks: `prose` (held-out public-domain text, byte-llama-5m's val.txt) or `filler`
(RULER's repeated "The grass is green..." noise). A sample scores 1 when every expected answer
appears in the generated text (exact match, case-insensitive), else 0.
"""

from __future__ import annotations

import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
WORDS = ("apple river candle mirror garden violin pepper lantern castle meadow rocket harbor marble "
         "feather canyon button winter orchid pencil dragon island saddle thunder velvet comet walnut "
         "basket falcon ribbon glacier tomato copper parrot silver forest jacket ladder magnet needle "
         "ocean pillow quartz rabbit shadow tunnel umbrella valley window yellow zebra anchor bridge "
         "cactus dolphin engine fossil guitar helmet igloo jungle kettle lemon monkey nectar oyster").split()
KEYS = ("long-context", "blue-harbor", "quiet-summit", "silver-lake", "paper-tiger", "north-wind", "red-canyon",
        "green-valley", "iron-gate", "cold-river", "warm-light", "old-bridge")
TASKS = ("niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_qfirst", "vt", "cwe",
         "fwe")
HAYSTACK_TASKS = ("niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_qfirst", "vt")


@dataclass
class Sample:
    id: str
    task: str
    length: int  # target length in tokens: the prompt plus its answer budget fit in it
    haystack: str
    prompt: list[int]  # token ids, chat template applied, answer prefix included
    answers: list[str]
    max_tokens: int


def _value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "word":
        return rng.choice(WORDS)
    return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (4, 4))


class Builder:
    """Turns a context and a question into token ids of the target length with the model's
    tokenizer and chat template."""

    def __init__(self, tokenizer, prose: str):
        self.tok = tokenizer
        self.prose = prose

    def ids(self, context: str, question: str, answer_prefix: str, question_first: bool = False) -> list[int]:
        content = (f"Read the text below, then answer this question: {question}\n\n{context}\n\n"
                   "Answer the question asked before the text." if question_first else f"{context}\n\n{question}")
        msgs = [{"role": "user", "content": content}]
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.tok(text + answer_prefix, add_special_tokens=False)["input_ids"]

    def haystack(self, kind: str, rng: random.Random, n_chars: int) -> list[str]:
        """Sentences of the haystack, about `n_chars` characters in all."""
        if kind == "filler":
            unit = FILLER.split(". ")
            out, size = [], 0
            while size < n_chars:
                s = unit[len(out) % len(unit)].rstrip(".") + "."
                out.append(s)
                size += len(s) + 1
            return out
        start = rng.randrange(0, max(1, len(self.prose) - n_chars - 1))
        text = " ".join(self.prose[start:start + n_chars].split())
        return [s.strip() + "." for s in text.split(".") if s.strip()]

    def fit(self, make, length: int) -> list[int]:
        """The longest prompt `make(n_chars)` not over `length` tokens (binary search)."""
        lo, hi = 200, length * 8
        best = make(lo)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            ids = make(mid)
            if len(ids) <= length:
                lo, best = mid, ids
            else:
                hi = mid - 1
        return best


def _insert(sentences: list[str], needles: list[str], rng: random.Random) -> str:
    out = list(sentences)
    for n in needles:
        out.insert(rng.randrange(0, len(out) + 1), n)
    return " ".join(out)


def make_sample(b: Builder, task: str, length: int, haystack: str, seed: int) -> Sample:
    rng = random.Random(f"{task}/{length}/{haystack}/{seed}")
    sid = f"{task}-{length}-{haystack}-{seed}"
    if task.startswith("niah"):
        kind = {"niah_number": "number", "niah_word": "word", "niah_uuid": "uuid"}.get(task, "number")
        keys = rng.sample(KEYS, 4)
        key = keys[0]
        if task == "niah_multivalue":
            values = []
            while len(values) < 4:
                v = _value(kind, rng)
                if v not in values:
                    values.append(v)
            needles = [f"One of the special magic {kind}s for {key} is: {v}." for v in values]
            question = f"What are all the special magic {kind}s for {key} mentioned in the provided text?"
            prefix = f"The special magic {kind}s for {key} mentioned in the provided text are"
            answers, max_tokens = values, 64
        else:
            value = _value(kind, rng)
            needles = [f"One of the special magic {kind}s for {key} is: {value}."]
            if task == "niah_multikey":
                needles += [f"One of the special magic {kind}s for {k} is: {_value(kind, rng)}." for k in keys[1:]]
            question = f"What is the special magic {kind} for {key} mentioned in the provided text?"
            prefix = f"The special magic {kind} for {key} mentioned in the provided text is"
            if task == "niah_qfirst":
                prefix = f"Answer: the special magic {kind} is"
            answers, max_tokens = [value], 24
        order = rng.random()

        def make(n_chars: int) -> list[int]:
            r = random.Random(order)
            context = _insert(b.haystack(haystack, random.Random(seed), n_chars), needles, r)
            return b.ids(context, question, prefix, question_first=task == "niah_qfirst")
    elif task == "vt":
        value = str(rng.randrange(10_000, 100_000))
        names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(5)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        question = (f"Find all variables that are assigned the value {value} in the text above.")
        prefix = f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are " \
                 f"assigned the value {value}, they are:"
        answers, max_tokens = names, 40
        slots = sorted(rng.random() for _ in chain)

        def make(n_chars: int) -> list[int]:
            sentences = b.haystack(haystack, random.Random(seed), n_chars)
            out = list(sentences)
            for frac, line in zip(slots, chain):  # in order, each after the previous
                out.insert(min(len(out), int(frac * (len(out) + 1))), line)
            return b.ids(" ".join(out), "Memorize and track the chain(s) of variable assignment hidden in the "
                         "text. " + question, prefix)
    elif task == "cwe":
        common = rng.sample(WORDS, 5)
        rare_pool = [w for w in WORDS if w not in common]
        question = "What are the 5 most common words in the above list?"
        prefix = "Answer: The top 5 words that appear most often in the list are:"
        answers, max_tokens = common, 40

        def make(n_chars: int) -> list[int]:
            r = random.Random(seed)
            words = []
            while sum(len(w) + 6 for w in words) < n_chars:
                words += common * 1 + r.sample(rare_pool, 3)
            # The common words recur in every round of 8; rare words seldom repeat.
            r.shuffle(words)
            listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
            return b.ids(f"Below is a numbered list of words. {listing}", question, prefix)
    elif task == "fwe":
        vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7))) for _ in range(40)]
        weights = [1 / (i + 1) ** 1.2 for i in range(len(vocab))]
        question = "What are the 3 most frequently appeared coded words in the above text?"
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        answers, max_tokens = vocab[:3], 24

        def make(n_chars: int) -> list[int]:
            r = random.Random(seed)
            words = []
            while sum(len(w) + 1 for w in words) < n_chars:
                words.append(r.choices(vocab, weights)[0])
            return b.ids("Read the following coded text and track the frequency of each coded word. Find the three "
                         "most frequently appeared coded words. ... " + " ".join(words) + " ...", question, prefix)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    prompt = b.fit(make, length - max_tokens)  # so an 8192-token model answers at "8k"
    return Sample(sid, task, length, haystack, prompt, answers, max_tokens)


def haystacks(task: str) -> tuple[str, ...]:
    """The haystacks a task is built on: the needle tasks on prose and filler, variable tracking
    on filler, the word-counting tasks on none (their list is the context)."""
    return ("prose", "filler") if task.startswith("niah") else ("filler",) if task == "vt" else ("none",)


def suite(tokenizer, prose_path: Path, cells, seed: int = 0) -> list[Sample]:
    """One sample per `(task, length, haystack, index)` of `cells`."""
    b = Builder(tokenizer, Path(prose_path).read_text(errors="replace"))
    return [make_sample(b, task, length, hay, seed * 100_000 + i) for task, length, hay, i in cells]


def score(text: str, answers: list[str]) -> int:
    """1 when every expected answer appears in the generated text (case-insensitive)."""
    low = text.lower()
    return int(all(a.lower() in low for a in answers))


def as_dict(s: Sample) -> dict:
    return asdict(s)
