"""Every module's ``__all__`` lists exactly its public names."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import TypeVar

import pytest

import converge

# Modules whose import needs an optional SDK or server are still checked: the dev extra
# installs them all.
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(converge.__path__, prefix="converge.")
    if not info.name.rsplit(".", 1)[-1].startswith("_")
    and ".testing" not in info.name  # test helpers may export pytest fixtures
)


def public_names(module: ModuleType) -> set[str]:
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_") or inspect.ismodule(value) or isinstance(value, TypeVar):
            continue
        if name in {"annotations", "TYPE_CHECKING"}:  # compiler/typing switches
            continue
        defined_here = getattr(value, "__module__", module.__name__) == module.__name__
        is_package = hasattr(module, "__path__")
        # A package re-exports; a module exports what it defines (constants included).
        if is_package or defined_here or not (inspect.isclass(value) or callable(value)):
            names.add(name)
    return names


@pytest.mark.parametrize("name", ["converge", *MODULES])
def test_all_matches_public_names(name: str) -> None:
    module = importlib.import_module(name)
    declared = getattr(module, "__all__", None)
    assert declared is not None, f"{name} has no __all__"
    assert len(declared) == len(set(declared)), f"{name}.__all__ has duplicates"
    missing = [n for n in declared if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    undeclared = public_names(module) - set(declared)
    assert not undeclared, f"{name} has public names missing from __all__: {sorted(undeclared)}"
