"""The benchmark's modules import each other by name (bench/ is a scripts folder)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def lib():
    from kvsieve_vllm.lib import Library

    return Library()
