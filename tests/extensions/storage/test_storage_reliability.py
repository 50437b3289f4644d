"""Reliability: SIGKILLed writers never tear values; 16 processes race put_if_absent.

Each scenario runs in a fresh single-threaded interpreter (``crash_helper.py``) that
forks the writers and racers, so fork never copies pytest's threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HELPER = Path(__file__).with_name("crash_helper.py")
KILLS = 200


def run_helper(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(HELPER), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["file", "sqlite"])
def test_writer_killed_at_random_moments_never_leaves_a_torn_or_lost_value(
    backend: str, tmp_path: Path
) -> None:
    result = run_helper("kill", backend, str(tmp_path), str(KILLS), "20260101")
    assert result["kills"] == KILLS
    # Each kill came after at least one acknowledged put, within about two more.
    assert result["acknowledged_writes"] >= KILLS
    assert result["checked"] > KILLS


def test_file_store_leaves_no_temp_files_behind_a_crash_once_listed(tmp_path: Path) -> None:
    run_helper("kill", "file", str(tmp_path), "20", "7")
    from converge.extensions.storage import FileStore
    from converge.extensions.storage import file as file_module

    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    store = FileStore(tmp_path)
    for name in leftovers:  # age them past the grace period; their writers are dead
        os.utime(tmp_path / name, (0, 0))
    assert set(store.list()) <= {f"key/{i}" for i in range(8)}
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []
    assert file_module._TMP_GRACE < 60


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["file", "sqlite"])
def test_sixteen_processes_racing_put_if_absent_have_exactly_one_winner(
    backend: str, tmp_path: Path
) -> None:
    result = run_helper("race", backend, str(tmp_path), "16")
    for round_ in result["rounds"]:
        assert round_["errors"] == 0, round_
        assert len(round_["winners"]) == 1, round_
        assert round_["losers"] == 15, round_
        assert round_["stored"] == round_["winners"][0], round_
