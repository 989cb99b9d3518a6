"""Process tuning applied by servers at startup."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from sluice import _tuning


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_tune_process_raises_gc_thresholds_and_reports_what_applied(restore_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    applied = _tuning.tune_process()
    assert gc.get_threshold() == _tuning.GC_THRESHOLDS
    assert applied["gc"] is True
    # glibc's mallopt exists on Linux with glibc; elsewhere the call is a no-op.
    assert applied["allocator"] is (sys.platform == "linux")
    assert _tuning.tune_allocator() is applied["allocator"]  # idempotent
