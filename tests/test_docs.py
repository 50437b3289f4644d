"""The documentation builds with every warning treated as an error, and its API
reference lists every public name."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Packages whose __all__ is the public API the reference must cover.
PACKAGES = [
    "converge.core",
    "converge.durable",
    "converge.runtime",
    "converge.errors",
    "converge.extensions.storage",
    "converge.extensions.crypto",
    "converge.extensions.llm",
    "converge.extensions.rate_limit",
    "converge.extensions.connectors",
    "converge.extensions.connectors.server",
    "converge.durable",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_mkdocs_build_strict(site: Path) -> None:
    assert (site / "index.html").exists()
    assert (site / "reference" / "core" / "index.html").exists()


def _anchors(site: Path) -> set[str]:
    ids: set[str] = set()
    for page in (site / "reference").rglob("index.html"):
        ids |= set(re.findall(r'id="(converge\.[\w.]+)"', page.read_text(encoding="utf-8")))
    return ids


def _is_module(path: str) -> bool:
    try:
        importlib.import_module(path)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("package", PACKAGES)
def test_api_reference_lists_every_public_name(package: str, site: Path) -> None:
    # A name counts as listed when a reference page has an entry for it directly under a
    # module (so a same-named method of some class does not count).
    listed = {
        anchor.rsplit(".", 1)[1]
        for anchor in _anchors(site)
        if _is_module(anchor.rsplit(".", 1)[0])
    }
    module = importlib.import_module(package)
    missing = sorted(set(module.__all__) - listed)
    assert not missing, f"{package}: not in the API reference: {missing}"
