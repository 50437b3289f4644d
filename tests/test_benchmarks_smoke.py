"""Every benchmark script runs with ``--quick`` and prints well-formed result lines.

Benchmarks are scripts, not tests (see ``benchmarks/``), but they must never rot: each
one prints one JSON object per case and implementation, with ``case``, ``impl`` and a
positive ``ops_per_s`` (crypto adds ``mb_per_s``), and measures converge against at
least one peer. The scripts only have to run, not to run fast, so the selected ones run
two at a time, slowest first, while their tests wait for them in turn.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ``benchmarks/_*.py`` are the scripts' shared helpers, not benchmarks.
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
# The slowest scripts (about 26, 10, 9, 8 and 7 s alone) start first; the rest take 2-6 s.
SLOWEST = ("redis", "outbound", "rate_limit", "llm_overhead", "storage")


Run = tuple[subprocess.CompletedProcess[str], list[str]]


def run_quick(script: Path, scratch: Path) -> Run:
    """The script's ``--quick`` run with its temporary files in ``scratch``, and what it
    left there (the gateway benchmark left about 100 MB of SQLite files per run)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path]),
        "TMPDIR": str(scratch),
    }
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return proc, sorted(path.name for path in scratch.iterdir())


@pytest.fixture(scope="module")
def quick_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Path, Future[Run]]]:
    """Every selected script's ``--quick`` run, started at once two at a time."""
    selected = {
        item.callspec.params["script"]
        for item in request.session.items
        if item.path == Path(__file__) and hasattr(item, "callspec")
    }
    rank = {name: i for i, name in enumerate(SLOWEST)}
    order = sorted(selected, key=lambda script: rank.get(script.stem, len(rank)))
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {
            script: pool.submit(run_quick, script, tmp_path_factory.mktemp(script.stem))
            for script in order
        }
    finally:
        pool.shutdown(cancel_futures=True)  # runs not started yet when the module stops early


def result_lines(stdout: str) -> list[dict[str, Any]]:
    rows = []
    for line in stdout.splitlines():
        if line.lstrip().startswith("{"):
            rows.append(json.loads(line))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_runs_quick_and_prints_json_lines(
    script: Path, quick_runs: dict[Path, Future[Run]]
) -> None:
    proc, left = quick_runs[script].result()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert left == [], f"{script.name} left temporary files behind"
    rows = result_lines(proc.stdout)
    assert rows, f"{script.name} printed no JSON result lines"
    for row in rows:
        assert isinstance(row.get("case"), str), row
        assert isinstance(row.get("impl"), str), row
        assert row["case"], row
        assert row["impl"], row
        rate = row.get("ops_per_s")
        assert isinstance(rate, int | float), row
        assert math.isfinite(rate), row
        assert rate > 0, row
        if "mb_per_s" in row:
            assert row["mb_per_s"] >= 0, row
    if script.stem == "gateway" and sys.platform == "linux":  # each server's CPU per event
        assert all(row["cpu_us_per_event"] > 0 for row in rows), rows
    if script.stem == "outbound":  # the sender's CPU per delivery
        assert all(row["cpu_us_per_delivery"] > 0 for row in rows), rows
    if script.stem == "crypto":  # throughput cases report MB/s too
        assert all("mb_per_s" in row for row in rows if "crypt" in row["case"]), rows
    impls = {row["impl"] for row in rows}
    assert "converge" in impls, f"{script.name} never measures converge"
    assert impls - {"converge"}, f"{script.name} measures no peer"
