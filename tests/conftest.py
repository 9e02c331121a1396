"""Suite-wide configuration: a header saying which backends can run here, and the ``gpu`` marker
skipping cleanly (with the reason) on machines without a CUDA device. The shared specs, skip
markers and parity harness live in ``helpers.py``."""

from __future__ import annotations

import pytest
from helpers import HAS_CUDA, HAS_EXTENSION, HAS_TRITON, TRITON_INTERPRET


def pytest_report_header(config: pytest.Config) -> str:
    triton = "absent" if not HAS_TRITON else "interpreter" if TRITON_INTERPRET else "compiled"
    extension = "built" if HAS_EXTENSION else "absent"
    device = "yes" if HAS_CUDA else "no"
    return f"margin_kernels backends: triton={triton}, extension={extension}, cuda device={device}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
