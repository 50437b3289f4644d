"""Project hygiene: packaging metadata, lint and types."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def all_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs.extend(extra)
    return [Requirement(s) for s in specs]


def test_compromised_mistralai_release_is_never_admitted() -> None:
    mistral = [r for r in all_requirements() if r.name == "mistralai"]
    assert mistral, "the llm extras must depend on mistralai"
    for req in mistral:
        assert not req.specifier.contains("2.4.6", prereleases=True), str(req)


def test_core_install_stays_light() -> None:
    names = {Requirement(s).name for s in PYPROJECT["project"]["dependencies"]}
    assert names <= {"anyio", "cryptography", "httpx2", "sniffio"}


# What src/ may import besides the standard library: its core dependencies, the packages
# of its extras, and what those bring and converge uses on purpose.
IMPORTABLE = {
    "converge",
    *("anyio", "cryptography", "httpx2", "sniffio"),  # core
    *("openai", "anthropic", "mistralai", "opentelemetry", "coredis", "uvicorn", "trio"),
    "httpcore2",  # httpx2's transport (connection errors)
    "h11",  # uvicorn's HTTP/1.1 parser, which the CLI's server protocol extends
    "pydantic",  # mistralai's request models (their validation errors)
    "pytest",  # the fixtures of converge's testing modules
}


def test_src_imports_nothing_only_the_dev_extra_installs() -> None:
    """httpx, for one, is only the tests' client: an import of it in src/ breaks a user's
    install (the SDKs and converge send with httpx2)."""
    found: dict[str, str] = {}
    for path in (ROOT / "src" / "converge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in IMPORTABLE:
                    found[top] = f"{path.relative_to(ROOT)}:{node.lineno}"
    assert found == {}


def test_extras_named_as_documented() -> None:
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    assert {
        "llm",
        "llm-openai",
        "llm-anthropic",
        "llm-mistral",
        "redis",
        "server",
        "trio",
        "docs",
        "dev",
    } <= extras


def test_package_is_typed() -> None:
    assert (ROOT / "src" / "converge" / "py.typed").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "src", "tests", "benchmarks", "examples"],
        ["mypy", "src"],
    ],
    ids=["ruff", "mypy-strict"],
)
def test_static_checks_are_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
