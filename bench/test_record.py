"""Write the test command's counts and step times, with provenance (called by scripts/test.sh).

    python bench/test_record.py LOG STEPS SECONDS OUT

LOG: everything the steps printed; STEPS: "seconds<TAB>command" per step. The counts are the
closing line's (cargo's `test result:` lines and pytest's summaries; cargo's ignored tests count as
skipped), the emulated CUDA runs on their own line, as scripts/test.sh prints them.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402


def counts(log: str) -> dict:
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for line in log.splitlines():
        if line.startswith("[emulated]") or not (line.startswith("test result:")
                                                   or re.search(r" (passed|skipped).* in [0-9.]+s", line)):
            continue
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|ignored)", line):
            total["skipped" if word == "ignored" else word] += int(n)
    return total


def main(argv: list[str]) -> int:
    log_path, steps_path, seconds, out = argv
    log = Path(log_path).read_text(errors="replace")
    steps = [{"seconds": int(t), "command": c} for t, c in
             (line.split("\t", 1) for line in Path(steps_path).read_text().splitlines() if "\t" in line)]
    emulated = re.search(r"^cuda-emulated: (\d+) passed, (\d+) failed", log, re.M)
    slowest = [line.strip() for line in log.splitlines() if re.match(r"^\d+\.\d+s (call|setup|teardown) ", line)]
    record = {
        "provenance": provenance.record(argv=["CI=true", "bash", ".ci/run"] if os.environ.get("CI") else ["bash", "scripts/test.sh"]),
        "seconds": int(seconds), "counts": counts(log),
        "emulated_cuda": {"passed": int(emulated[1]), "failed": int(emulated[2])} if emulated else None,
        "steps": steps, "slowest_tests": slowest[:25],
    }
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
