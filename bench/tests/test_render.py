"""Figures cannot drift: every rendered table and quoted figure of README.md and bench/README.md
equals what bench/render.py makes of bench/results/, and every result file says how it was made."""

from __future__ import annotations

import json
import re

import provenance
import render


def test_every_quoted_figure_and_table_matches_its_result_file():
    problems: list[str] = []
    for doc in render.DOCS:
        render.render_text(doc.read_text(), doc.name, problems)
    assert not problems, "run `python bench/render.py` (or fix the result):\n" + "\n".join(problems)


def test_the_docs_quote_figures_through_the_renderer():
    text = "\n".join(doc.read_text() for doc in render.DOCS)
    assert len(render.QUOTE.findall(text)) >= 10
    assert {m[2] for m in render.BLOCK.finditer(text)} >= {"summary", "demo", "ci"}


def test_a_changed_figure_is_named():
    readme = render.DOCS[0].read_text()
    m = render.QUOTE.search(readme)
    assert m, "README.md quotes no figure through the renderer"
    problems: list[str] = []
    render.render_text(readme.replace(m[0], "9" + m[0], 1), "README.md", problems)
    assert len(problems) == 1 and f"quotes 9{m[1]} where {m[2]}:{m[3]}" in problems[0]
    table = render.BLOCK.search(readme)
    problems = []
    render.render_text(readme.replace(table[3], table[3].replace("|", "| 1", 1), 1), "README.md", problems)
    assert problems == [f"README.md: the block render:{table[2]} differs from its result files"]


def test_every_result_file_carries_its_provenance():
    files = sorted(render.RESULTS.glob("*.json"))
    assert files
    problems = [msg for f in files for msg in provenance.check(json.loads(f.read_text()), f.name)]
    assert not problems, "\n".join(problems)
    for f in files:
        p = json.loads(f.read_text())["provenance"]
        assert p["machine"].get("cores"), f.name
        if not p.get("recovered") and p.get("model"):
            assert len(p["model"]["weights_sha256"]) == 64, f.name


def test_provenance_resolves_every_default(lib):
    cfg = provenance.effective_config('[sparsity]\npolicy = "snapkv"\nbudget_ratio = 0.25\n')
    snap = cfg["resolved"]["sparsity"]
    assert (snap["pool_kernel"], snap["window"], snap["sink_tokens"], snap["pool"]) == (31, 32, 4, "max")
    assert "decode" not in cfg["resolved"]


def test_the_docs_link_only_files_inside_the_repository():
    """README.md, bench/README.md, benches/README.md and docs/design.md: every relative link
    resolves inside the repository, and none points outside it (../shared was the old home of
    the design and the test model)."""
    docs = [*render.DOCS, render.ROOT / "docs" / "design.md"]
    bad = []
    for doc in docs:
        text = doc.read_text()
        bad += [f"{doc.name}: mentions {m}" for m in re.findall(r"\.\./shared\S*", text)]
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve()
            if render.ROOT not in path.parents and path != render.ROOT or not path.exists():
                bad.append(f"{doc.name}: link {target} does not resolve inside the repository")
    assert not bad, "\n".join(bad)
