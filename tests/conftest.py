"""Shared test configuration: accelerator markers skip cleanly without the hardware."""

from __future__ import annotations

import importlib.util

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _has_npu() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch
    import torch_npu  # noqa: F401

    return torch.npu.is_available()


def pytest_collection_modifyitems(config, items):
    checks = {"cuda": _has_cuda, "npu": _has_npu}
    cache = {}
    for item in items:
        for marker, check in checks.items():
            if marker in item.keywords:
                if marker not in cache:
                    cache[marker] = check()
                if not cache[marker]:
                    item.add_marker(pytest.mark.skip(reason=f"needs a {marker} device"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test process: the suite runs on small shared machines, where several
    spinning OpenMP threads per test slow everything down (subprocesses a test starts are unaffected)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
