"""``benchmarks/compare.py --quick`` runs end to end and prints its whole table.

A smoke test only: the sizes of ``--quick`` are too small for the figures to
mean anything, and speed is never asserted in tests (it lives in benchmarks/).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("CI") != "true":  # CI installs the bench extra: there it must run
    pytest.importorskip("distributed")

COMPARE = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"

#: The start of each row's label, one per target of issue #7.
ROWS = (
    "flat: 500 independent inc",
    "tree reduction over 500 leaves",
    "1-task round trip, median of 20",
    "2,000-task graph: scheduler memory per task",
    "2,000-task graph: submission to first result",
    "replay: read + fold 30,006 events",
    "all built-in sinks on / no sinks",
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_quick_prints_every_row(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(COMPARE), "--quick"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "sluice vs Dask distributed" in out, out
    lines = out.splitlines()
    for label in ROWS:
        matching = [line for line in lines if label in line]
        assert len(matching) == 1, f"row {label!r} missing or repeated:\n{out}"
        # Every row ends with its verdict: met, not met, or "-" (not measured).
        row = matching[0].rstrip().rstrip("│").rstrip()
        assert row.endswith(("met", "-")), f"row {label!r} has no verdict:\n{out}"
    assert f"{len(ROWS)} rows;" in out, out
