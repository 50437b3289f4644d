"""Every code block in the README and docs/ runs (or parses) as written.

* ``python`` blocks run as scripts in a fresh directory. A block may carry a marker on
  the line right before its fence:

  - ``<!-- docs-test: continue -->``: a fragment that runs after the page's previous
    Python blocks, in their namespace (it may use their imports and names);
  - ``<!-- docs-test: skip REASON -->``: not run (a real API key, a network service); the
    reason is required, and the block must still compile.

  Top-level ``await`` is a fragment of async code: it needs one of the markers, and then
  runs inside an event loop.
* ``bash`` lines that start with ``converge`` are parsed by the real argument parser;
  ``pip install`` lines install from source (``-e``), because the name ``converge`` on
  PyPI belongs to another project.
* ``toml`` and ``json`` blocks parse.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"<!--\s*docs-test:\s*(continue|skip)\s*(.*?)\s*-->\s*$")
_LANGS = {"python", "bash", "toml", "json", "text", "console"}


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass
class Chain:
    """A Python block and the ``continue`` fragments that follow it."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def where(self) -> str:
        return self.blocks[0].where


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = _MARKER.search(before)
            found.append(
                Block(
                    page,
                    line,
                    match.group(1),
                    match.group(2),
                    marker.group(1) if marker else None,
                    marker.group(2) if marker else "",
                )
            )
    return found


BLOCKS = blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def chains() -> list[Chain]:
    out: list[Chain] = []
    last: dict[Path, Chain] = {}
    for block in PYTHON:
        if block.marker == "skip":
            continue
        if block.marker == "continue" and block.page in last:
            last[block.page].blocks.append(block)
            continue
        chain = last[block.page] = Chain([block])
        out.append(chain)
    return out


def has_top_level_await(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        compile(code, "<block>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        return True
    return False


# Runs each block of a chain in one namespace; top-level await runs in an event loop.
_RUNNER = """
import ast, inspect, json, sys
import anyio
namespace = {"__name__": "__main__"}
for where, code in json.loads(sys.stdin.read()):
    compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if compiled.co_flags & inspect.CO_COROUTINE:
        async def run(compiled=compiled):
            await eval(compiled, namespace)
        anyio.run(run)
    else:
        exec(compiled, namespace)
"""


def test_every_fence_names_a_known_language() -> None:
    bad = [b.where for b in BLOCKS if b.lang not in _LANGS]
    assert not bad, f"code blocks without a known language tag: {bad}"


def test_skipped_blocks_give_a_reason_and_python_ones_still_compile() -> None:
    for block in BLOCKS:
        if block.marker != "skip":
            continue
        assert block.reason, f"{block.where}: docs-test: skip needs a reason"
        if block.lang == "python" and block.reason != "signature":
            compile(block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_top_level_await_is_marked_as_a_fragment() -> None:
    unmarked = [b.where for b in PYTHON if b.marker is None and has_top_level_await(b.code)]
    assert not unmarked, f"top-level await in blocks presented as scripts: {unmarked}"


@pytest.mark.parametrize("chain", chains(), ids=lambda c: c.where)
def test_python_block_runs(chain: Chain, tmp_path: Path) -> None:
    src = str(ROOT / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    payload = json.dumps([(b.where, b.code) for b in chain.blocks])
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=payload,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _converge_lines() -> list[tuple[str, list[str]]]:
    out = []
    for block in BLOCKS:
        if block.lang != "bash":
            continue
        text = block.code.replace("\\\n", " ")
        for line in text.splitlines():
            command = line.split("#", 1)[0].strip()
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", command):
                words = shlex.split(part) if part else []
                if words and words[0] == "converge":
                    out.append((block.where, words[1:]))
    return out


@pytest.mark.parametrize(("where", "argv"), _converge_lines(), ids=lambda v: str(v)[:60])
def test_documented_converge_command_lines_parse(where: str, argv: list[str]) -> None:
    from converge.cli.commands import _parser

    try:
        _parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help, --version
            return
        pytest.fail(f"{where}: `converge {' '.join(argv)}` does not parse (exit {exc.code})")


def test_pip_installs_are_from_source() -> None:
    for block in BLOCKS:
        if block.lang != "bash":
            continue
        for line in block.code.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line.split("#", 1)[0]):
                words = shlex.split(part) if part.strip() else []
                if words[:2] == ["pip", "install"]:
                    named = [w for w in words[2:] if re.match(r"converge\b", w)]
                    assert not named, (
                        f"{block.where}: pip install {named} gets PyPI's other project"
                    )
    for page in PAGES:
        # In prose, too (the bare name appears only where it is explained).
        assert not re.search(r'pip install ["\']converge\[', page.read_text()), page


@pytest.mark.parametrize(
    "block",
    [b for b in BLOCKS if b.lang in ("toml", "json") and b.marker != "skip"],
    ids=lambda b: b.where,
)
def test_data_blocks_parse(block: Block) -> None:
    if block.lang == "toml":
        tomllib.loads(block.code)
    else:
        json.loads(block.code)


def test_narrative_pages_do_not_dump_whole_modules() -> None:
    for page in PAGES:
        if "reference" in page.parts:
            continue
        directives = re.findall(r"^:::\s*(\S+)", page.read_text(), re.M)
        assert not directives, f"{page.name} renders API pages {directives}: link the reference"
