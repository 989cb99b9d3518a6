"""``benchmarks/compare.py --quick``, ``benchmarks/sinks.py --quick --pin`` and
``benchmarks/sink_pairs.py --quick --pin`` run end to end and print every row.

Smoke tests only: the sizes of ``--quick`` are too small for the figures to
mean anything, and speed is never asserted in tests (it lives in benchmarks/).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rabbitmq_node import rabbitmq_available

if os.environ.get("CI") != "true":  # CI installs the bench extra: there it must run
    pytest.importorskip("distributed")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
COMPARE = BENCHMARKS / "compare.py"

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


#: The clusters ``sinks.py --quick --no-breakdown --pin`` runs, one row each.
SINK_CLUSTERS = (
    "sluice, no sinks",
    "sluice, all sinks (defaults: the file sinks' child and RabbitMQ's)",
    "sluice, all sinks (RabbitMQ from a thread)",
    "sluice, all sinks, file sinks in the scheduler's process",
    "sluice, all sinks (both children on the broker's core)",
    "sluice, all sinks, file sinks in the scheduler's process (publisher child on the"
    " broker's core)",
    "sluice, no sinks, workers' events not forwarded",
    "sluice, all sinks, workers' events not forwarded",
    "sluice, all sinks, workers' events not forwarded (both children on the broker's core)",
    "Dask, no plugin",
    "Dask, RabbitMQ plugin from its docs",
)


def need_a_pinned_broker() -> None:
    """Skip (fail on CI) where ``--pin`` cannot start a broker node on a core of its own."""
    if not rabbitmq_available():
        if os.environ.get("CI") == "true":
            pytest.fail("rabbitmq-server is not installed (CI must run this test)")
        pytest.skip("rabbitmq-server is not installed")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("--pin needs 2 cores")


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.timeout(300)
def test_sinks_pin_quick_runs_every_cluster_and_loses_nothing(tmp_path: Path) -> None:
    """On a broker node of its own, pinned: every cluster runs, and each RabbitMQ sink
    delivered all it was given (2,200 tasks x 5 transitions: the timed runs and the
    warm-up), and the time each task took longer is shown for every cluster with sinks."""
    need_a_pinned_broker()
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sinks.py"), "--quick", "--no-breakdown", "--pin"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "250"},  # one line per row: nothing wrapped
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "on core" in out, out
    for label in SINK_CLUSTERS:
        # The first table's row: the label, then its rate in tasks/s.
        row = re.compile(rf"^│ {re.escape(label)} +│ +[\d,]+ │", re.MULTILINE)
        assert len(row.findall(out)) == 1, f"{label!r}:\n{out}"
    # Each round's rate and ratio beside the medians (--quick: one round).
    base_row = re.compile(
        r"^│ sluice, no sinks +│ +([\d,]+) │ +1\.00x │ +([\d,]+) │ +1\.00x │", re.M
    )
    match = base_row.search(out)
    assert match and match[1] == match[2], out
    delivered = re.findall(
        r"published ([\d,]+), confirmed ([\d,]+), spooled [\d,]+; the queue held ([\d,]+)", out
    )
    assert len(delivered) == 7, out
    assert all(counts == ("11,000",) * 3 for counts in delivered), delivered
    spilled = re.compile(r"the\s+scheduler's\s+bus\s+spilled\s+[\d,]+\s+events\s+to\s+disk")
    assert len(spilled.findall(out)) == 7, out
    # The added time a task: one row for each cluster with sinks or a plugin, held
    # against the cluster without them.
    for label in (*(c for c in SINK_CLUSTERS if "all sinks" in c), SINK_CLUSTERS[-1]):
        if label.startswith("Dask"):
            base = "Dask, no plugin"
        elif "not forwarded" in label:
            base = "sluice, no sinks, workers' events not forwarded"
        else:
            base = "sluice, no sinks"
        row = re.compile(rf"^│ {re.escape(label)} +│ {re.escape(base)} +│ +-?[\d,]+ │", re.M)
        assert len(row.findall(out)) == 1, f"{label!r}:\n{out}"
    assert re.search(
        r"Dask's docs plugin alone, outside Dask, after each round: \d+(, \d+)* us", out
    ), out
    assert "sustained rate with confirms (lazy, version 2)" in out, out


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.timeout(300)
def test_sink_pairs_quick_gives_a_ratio_a_pair_and_loses_nothing(tmp_path: Path) -> None:
    """Both clusters up at once, taking turns: a row and a ratio for each pair, and the
    queue held every scheduler transition (2,100 tasks x 5: the runs and the warm-up)."""
    need_a_pinned_broker()
    script = BENCHMARKS / "sink_pairs.py"
    args = ["--quick", "--pin", "--beside-broker", "--sinks", "defaults"]
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    pairs = re.findall(r"^│ +(\d) │ +[\d,]+ │ +[\d,]+ │ +(\d+\.\d\d)x │ +-?\d+ │", out, re.M)
    assert [p[0] for p in pairs] == ["1", "2"], out
    assert re.search(r"ratio: median \d+\.\d\dx \(quartiles .*; \d of 2 pairs >= 0\.85x\)", out)
    assert "had 10,500 confirmed before closing; the queue held 10,500" in out, out
