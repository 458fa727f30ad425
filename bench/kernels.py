"""The CPU kernel benchmarks' summary, committed: runs `cargo bench --bench kernels` (criterion)
and writes bench/results/kernels-cpu.json from criterion's estimates, with its provenance;
benches/README.md's table is rendered from it (bench/render.py, block `kernels`).

    python bench/kernels.py            # run the benchmarks (~6 min on 2 cores), then summarize
    python bench/kernels.py --no-run   # summarize what target/criterion holds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402

LENGTHS = (4096, 16384)  # benches/kernels.rs `lengths()` without KVSIEVE_BENCH_FULL


def rows() -> list[dict]:
    """Each measured pair of benches/kernels.rs: group, kernel and bound bench, what they are."""
    out = []
    for bs in (16, 128):
        for layout in ("nhd", "hnd"):
            for n in LENGTHS:
                out.append(dict(group=f"compact_{layout}_b{bs}_{n}", kernel="kernel", bound="bound", what="compact",
                                against="memcpy of the same bytes", shape=f"{layout.upper()}, block {bs}, {n // 1024}k tokens"))
    for n in LENGTHS:
        out.append(dict(group=f"select_{n}", kernel="kernel", bound="bound", what="select tokens",
                        against="one scalar read (sum) of the scores", shape=f"8 x {n // 1024}k scores"))
        out.append(dict(group=f"select_{n}", kernel="kernel", bound="read_simd", what="select tokens",
                        against="one SIMD read (8 accumulators)", shape=f"8 x {n // 1024}k scores"))
    for n in (2048, 4096):
        out.append(dict(group=f"snapkv_{n}", kernel="kernel/flops", bound="bound/flops", what="snapkv score",
                        against="the same FLOPs as bare f32 dot products, same threads",
                        shape=f"{n // 1024}k tokens, window 32, pool 31"))
    # After the others, so the row numbers the docs quote stay put.
    for n in LENGTHS:
        out.append(dict(group=f"quest_{n}", kernel="kernel", bound="bound", what="quest select",
                        against="one SIMD read of the min/max metadata it reads",
                        shape=f"8 decode rows of {n // 1024}k tokens, blocks of 32, 1,024 tokens kept"))
        out.append(dict(group=f"quest_{n}", kernel="kernel", bound="scalar", what="quest select",
                        against="row by row: quest_bound + select_blocks_row",
                        shape=f"8 decode rows of {n // 1024}k tokens, blocks of 32, 1,024 tokens kept"))
    return out


def mean_ns(group: str, bench: str) -> float | None:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    f = target / "criterion" / group / bench / "new" / "estimates.json"
    return json.loads(f.read_text())["mean"]["point_estimate"] if f.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-run", action="store_true", help="only summarize target/criterion")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "kernels-cpu.json")
    a = ap.parse_args(argv)
    if not a.no_run:
        subprocess.run(["cargo", "bench", "--bench", "kernels"], cwd=ROOT, check=True)
    table = []
    for r in rows():
        k, b = mean_ns(r["group"], r["kernel"]), mean_ns(r["group"], r["bound"])
        if k is None or b is None:
            raise SystemExit(f"no criterion estimate for {r['group']}/{r['kernel']} or /{r['bound']}; run without "
                             "--no-run")
        table.append({**r, "kernel_ns": k, "bound_ns": b, "ratio": b / k})
    result = {"provenance": provenance.record(argv=["cargo", "bench", "--bench", "kernels"],
                                              note="criterion means (sample size 10, 2 s per bench); "
                                                   "summarized by bench/kernels.py"),
              "shapes": "one Llama-3-8B-like layer: 8 KV heads of 128, 32 query heads, bf16 KV, one sequence per "
                        "call, 25% of the tokens kept (random per head), block ids shuffled",
              "rows": table}
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
