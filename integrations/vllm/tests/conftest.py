"""Shared fixtures: the library under test (KVSIEVE_LIB, set by scripts/test.sh) and vLLM's
environment for CPU runs."""

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


@pytest.fixture(scope="session")
def lib():
    from kvsieve_vllm.lib import Library

    return Library()
