"""Every name, signature and default in the seed reference is a promise: check them all.

``tests/data/seed-converge-extensions.txt`` is a copy of the public reference of
``converge.extensions``. This test parses its class, function and method lines and checks
each against the real objects: parameter names, order, kinds and defaults, async-ness,
documented bases, and class attribute defaults. Extra keyword-only parameters and extra
trailing parameters with defaults are allowed (they extend the API without breaking it).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SEED = Path(__file__).parent / "data" / "seed-converge-extensions.txt"
FACTORY = "__factory__"


@dataclass
class Entry:
    kind: str  # "class", "exception", "function", "method", "property", "attribute", "bases"
    owner: str  # dotted class path for members, else the dotted object path
    name: str
    params: str = ""
    is_async: bool = False
    default: str | None = None


def _parse() -> list[Entry]:
    entries: list[Entry] = []
    owner = ""
    for raw in SEED.read_text().splitlines():
        line = raw.strip()
        if m := re.match(r"^(class|exception) (converge\.[\w.]+?)(?:\((.*)\))?\[source\]$", line):
            owner = m.group(2)
            entries.append(Entry(m.group(1), owner, owner, m.group(3) or ""))
        elif m := re.match(r"^(converge\.[\w.]+)\((.*)\) .*\[source\]$", line):
            owner = ""
            entries.append(Entry("function", m.group(1), m.group(1), m.group(2)))
        elif owner and (m := re.match(r"^(async )?(\w+)\((.*)\)(?: .*)?\[source\]$", line)):
            entries.append(Entry("method", owner, m.group(2), m.group(3), bool(m.group(1))))
        elif owner and (m := re.match(r"^property (\w+): .+$", line)):
            entries.append(Entry("property", owner, m.group(1)))
        elif owner and (m := re.match(r"^Bases: (.+)$", line)):
            entries.append(Entry("bases", owner, m.group(1)))
        elif owner and (m := re.match(r"^(\w+): [^=]+?(?: = (.+))?$", line)):
            entries.append(Entry("attribute", owner, m.group(1), default=m.group(2)))
    return entries


ENTRIES = _parse()


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _seed_parameters(params: str) -> list[tuple[str, str, Any]]:
    """``(name, kind, default)`` per seed parameter; default is ``inspect._empty`` if none."""
    source = f"def f({params.replace('=<factory>', '=' + FACTORY)}): pass"
    args = ast.parse(source).body[0].args  # type: ignore[attr-defined]
    out: list[tuple[str, str, Any]] = []
    positional = args.posonlyargs + args.args
    pos_defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, pos_defaults, strict=True):
        out.append((arg.arg, "positional", _literal(default)))
    if args.vararg:
        out.append((args.vararg.arg, "var_positional", inspect.Parameter.empty))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append((arg.arg, "keyword", _literal(default)))
    if args.kwarg:
        out.append((args.kwarg.arg, "var_keyword", inspect.Parameter.empty))
    return out


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return inspect.Parameter.empty
    if isinstance(node, ast.Name) and node.id == FACTORY:
        return FACTORY
    return ast.literal_eval(node)


_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


def _check_signature(obj: Any, params: str, label: str, *, owner: type | None = None) -> None:
    actual = list(inspect.signature(obj).parameters.values())
    if actual and actual[0].name == "self":
        actual = actual[1:]
    by_name = {p.name: p for p in actual}
    expected = _seed_parameters(params)
    seed_positional = [n for n, k, _ in expected if k == "positional"]
    real_positional = [p.name for p in actual if _KINDS[p.kind] == "positional"]
    assert real_positional[: len(seed_positional)] == seed_positional, (
        f"{label}: positional parameters {real_positional} do not start with {seed_positional}"
    )
    for extra in actual:
        if extra.name not in {n for n, _, _ in expected} and _KINDS[extra.kind] == "positional":
            assert extra.default is not inspect.Parameter.empty, (
                f"{label}: extra positional parameter {extra.name!r} needs a default"
            )
    for name, kind, default in expected:
        if kind in ("var_positional", "var_keyword"):
            assert any(_KINDS[p.kind] == kind for p in actual), f"{label}: lacks {kind}"
            continue
        assert name in by_name, f"{label}: missing parameter {name!r}"
        param = by_name[name]
        assert _KINDS[param.kind] == kind, f"{label}: {name!r} should be {kind}"
        if default == FACTORY:
            fields = {f.name: f for f in dataclasses.fields(owner)} if owner else {}
            assert name in fields, f"{label}: {name!r} should be a dataclass field"
            assert fields[name].default_factory is not dataclasses.MISSING, (
                f"{label}: {name!r} should have a default factory"
            )
        else:
            assert param.default == default, (
                f"{label}: default of {name!r} is {param.default!r}, the seed says {default!r}"
            )


def _id(entry: Entry) -> str:
    return f"{entry.kind}:{entry.owner.rsplit('.', 1)[-1]}.{entry.name.rsplit('.', 1)[-1]}"


def test_seed_parses_into_every_documented_name() -> None:
    kinds = {e.kind for e in ENTRIES}
    assert {"class", "exception", "function", "method", "property", "attribute"} <= kinds
    assert len([e for e in ENTRIES if e.kind == "class"]) == 19


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.kind == "class"], ids=_id)
def test_class_constructor_matches_seed(entry: Entry) -> None:
    cls = _resolve(entry.owner)
    assert inspect.isclass(cls)
    if entry.params and not entry.params.startswith("*args"):  # Protocols take anything
        _check_signature(cls, entry.params, entry.owner, owner=cls)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.kind == "function"], ids=_id)
def test_function_matches_seed(entry: Entry) -> None:
    _check_signature(_resolve(entry.owner), entry.params, entry.owner)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.kind == "method"], ids=_id)
def test_method_matches_seed(entry: Entry) -> None:
    cls = _resolve(entry.owner)
    method = getattr(cls, entry.name)
    label = f"{entry.owner}.{entry.name}"
    assert inspect.iscoroutinefunction(method) == entry.is_async, (
        f"{label} should {'' if entry.is_async else 'not '}be async"
    )
    _check_signature(method, entry.params, label)


@pytest.mark.parametrize(
    "entry", [e for e in ENTRIES if e.kind in ("property", "attribute")], ids=_id
)
def test_attribute_matches_seed(entry: Entry) -> None:
    cls = _resolve(entry.owner)
    if dataclasses.is_dataclass(cls):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if entry.name in fields:
            field = fields[entry.name]
            if entry.default is not None:
                assert field.default == ast.literal_eval(entry.default)
            return
    if entry.kind == "property":
        assert isinstance(inspect.getattr_static(cls, entry.name), property)
        return
    assert hasattr(cls, entry.name), f"{entry.owner} lacks {entry.name}"
    if entry.default is not None:
        assert getattr(cls, entry.name) == ast.literal_eval(entry.default)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.kind == "bases"], ids=_id)
def test_documented_bases_hold(entry: Entry) -> None:
    cls = _resolve(entry.owner)
    for base in (b.strip() for b in entry.name.split(",")):
        if base in {"object", "Protocol"}:
            continue
        assert base in {k.__name__ for k in cls.__mro__}, f"{entry.owner} should derive {base}"
