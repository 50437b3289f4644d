"""ToolRegistry: schemas from hints and docstrings, validation, invocation off the loop."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Literal

import anyio
import pytest

from converge.core import ToolRegistry
from converge.core.tools import schema_for_function
from converge.errors import (
    SyncInEventLoopError,
    ToolArgumentError,
    ToolExecutionError,
    UnknownToolError,
    UsageError,
)
from nesting import deep_list

registry = ToolRegistry()


@registry.tool
def search(query: str, limit: int = 5, tags: list[str] | None = None) -> list[str]:
    """Search the knowledge base.

    Args:
        query: Text to look for.
        limit: How many hits to return,
            at most.
        tags: Optional tag filter.
    """
    return [f"{query}:{i}" for i in range(limit)]


@registry.tool(name="convert")
async def convert_units(value: float, unit: Literal["m", "ft"]) -> float:
    """Convert a length."""
    await anyio.lowlevel.checkpoint()
    return value * 3.28084 if unit == "m" else value / 3.28084


@registry.tool
def where_am_i() -> str:
    """Name the thread the tool runs on."""
    return threading.current_thread().name


def test_schema_is_derived_from_hints_and_docstring() -> None:
    schema = registry.get("search").schema()
    assert schema["description"] == "Search the knowledge base."
    params = schema["parameters"]
    assert params["required"] == ["query"]
    assert params["additionalProperties"] is False
    assert params["properties"]["query"] == {"type": "string", "description": "Text to look for."}
    assert params["properties"]["limit"] == {
        "type": "integer",
        "description": "How many hits to return, at most.",
        "default": 5,
    }
    assert params["properties"]["tags"]["anyOf"] == [
        {"type": "array", "items": {"type": "string"}},
        {"type": "null"},
    ]
    assert registry.get("convert").parameters["properties"]["unit"] == {"enum": ["m", "ft"]}
    assert registry.names() == ["search", "convert", "where_am_i"]
    assert len(registry.schemas()) == 3


@pytest.mark.anyio
async def test_ainvoke_runs_sync_tool_in_a_worker_thread() -> None:
    assert await registry.ainvoke("where_am_i", {}) != threading.current_thread().name
    assert await registry.ainvoke("search", {"query": "x", "limit": 2}) == ["x:0", "x:1"]


@pytest.mark.anyio
async def test_ainvoke_awaits_async_tool() -> None:
    assert await registry.ainvoke("convert", {"value": 1, "unit": "m"}) == pytest.approx(3.28084)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"query": 5},
        {"query": "x", "limit": "3"},
        {"query": "x", "limit": True},
        {"query": "x", "tags": ["a", 1]},
        {"query": "x", "unexpected": 1},
    ],
)
async def test_invalid_arguments_raise_tool_argument_error(params: dict[str, Any]) -> None:
    with pytest.raises(ToolArgumentError):
        await registry.ainvoke("search", params)


@pytest.mark.anyio
async def test_enum_is_enforced() -> None:
    with pytest.raises(ToolArgumentError, match="not one of"):
        await registry.ainvoke("convert", {"value": 1, "unit": "km"})


@pytest.mark.anyio
async def test_unknown_tool_raises_typed_error_listing_known_tools() -> None:
    with pytest.raises(UnknownToolError, match="search"):
        await registry.ainvoke("nope", {})
    with pytest.raises(UnknownToolError):
        registry.get(["not", "hashable"])  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_failing_tool_raises_tool_execution_error_with_cause() -> None:
    reg = ToolRegistry()

    @reg.tool
    def broken() -> None:
        """Always fails."""
        raise ZeroDivisionError("boom")

    with pytest.raises(ToolExecutionError) as info:
        await reg.ainvoke("broken")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_sync_invoke_from_script() -> None:
    assert registry.invoke("search", {"query": "q", "limit": 1}) == ["q:0"]
    assert registry.invoke("convert", {"value": 0, "unit": "ft"}) == 0


@pytest.mark.anyio
async def test_sync_invoke_on_event_loop_is_refused() -> None:
    with pytest.raises(SyncInEventLoopError, match="ainvoke"):
        registry.invoke("where_am_i")


def test_registration_errors() -> None:
    reg = ToolRegistry()
    reg.register(lambda: None, name="ok")
    with pytest.raises(UsageError, match="already"):
        reg.register(lambda: None, name="ok")
    with pytest.raises(UsageError, match="invalid tool name"):
        reg.register(lambda: None, name="has space")

    def star(*args: int) -> None: ...

    with pytest.raises(UsageError):
        reg.register(star)

    def odd(x: object) -> None: ...

    with pytest.raises(UsageError, match="JSON schema"):
        reg.register(odd)
    with pytest.raises(UsageError):
        reg.register("not callable")  # type: ignore[arg-type]


def unresolvable(x: Nope) -> None:  # type: ignore[name-defined]  # noqa: F821
    """A hint that names nothing."""


def described(x: int, y: str = "a") -> None:
    """Do a thing.

    Args:
        x: The number.
    """


@pytest.mark.parametrize(
    "func",
    [unresolvable, int, functools.partial(print)],
    ids=["unresolvable-hint", "no-signature", "partial-with-star-args"],
)
@pytest.mark.parametrize(
    "describe",
    [schema_for_function, lambda f: ToolRegistry().register(f, name="t")],
    ids=["schema_for_function", "register"],
)
def test_undescribable_callables_are_usage_errors(
    describe: Callable[[Any], object], func: Any
) -> None:
    # Raised NameError, ValueError (no signature) and TypeError (get_type_hints).
    with pytest.raises(UsageError):
        describe(func)


def test_schema_for_function_refuses_a_non_callable() -> None:
    with pytest.raises(UsageError, match="callable"):  # raised TypeError
        schema_for_function(object())  # type: ignore[arg-type]


def test_partial_needs_a_name_and_is_described_by_its_remaining_parameters() -> None:
    reg = ToolRegistry()
    with pytest.raises(UsageError, match="name="):  # raised AttributeError (__name__)
        reg.register(functools.partial(described, y="b"))
    tool = reg.register(functools.partial(described, y="b"), name="part")
    assert tool.description == "Do a thing."
    assert tool.parameters["required"] == ["x"]
    assert tool.parameters["properties"]["x"] == {"type": "integer", "description": "The number."}
    assert tool.parameters["properties"]["y"]["default"] == "b"
    assert reg.invoke("part", {"x": 1}) is None


def test_contains_takes_any_object() -> None:
    assert "search" in registry
    assert "nope" not in registry
    assert [] not in registry  # raised TypeError (unhashable)


class Unprintable(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def fails_unprintably() -> None:
    """Always fails, with an exception repr cannot show."""
    raise Unprintable


def test_errors_about_unrepresentable_values_keep_their_type() -> None:
    # Each message repr'd the value: RecursionError, or the RuntimeError of a bad repr.
    deep = deep_list()
    reg = ToolRegistry()
    reg.register(fails_unprintably)
    with pytest.raises(ToolExecutionError):
        reg.invoke("fails_unprintably")
    with pytest.raises(UnknownToolError):
        reg.get(deep)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        reg.register(described, name=deep)  # type: ignore[arg-type]
    with pytest.raises(ToolArgumentError):
        registry.validate("convert", {"value": 1, "unit": deep})


@pytest.mark.anyio
async def test_ainvoke_error_of_an_unrepresentable_exception_keeps_its_type() -> None:
    reg = ToolRegistry()
    reg.register(fails_unprintably)
    with pytest.raises(ToolExecutionError):
        await reg.ainvoke("fails_unprintably")
