"""Tools agents can call: registration, JSON schemas from type hints, validated invocation."""

from __future__ import annotations

import enum
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

import anyio

from converge import _sync
from converge._repr import safe_repr
from converge.errors import ToolArgumentError, ToolExecutionError, UnknownToolError, UsageError

__all__ = ["Tool", "ToolRegistry", "schema_for_function"]

F = TypeVar("F", bound=Callable[..., Any])
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}\Z")
_JSON_TYPES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass(frozen=True, slots=True)
class Tool:
    """A registered tool.

    Attributes:
        name: The name models and decisions use.
        description: What it does (from the docstring's first paragraph).
        parameters: JSON schema (``type: object``) of its keyword arguments.
        func: The function; sync or async.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    func: Callable[..., Any]

    @property
    def is_async(self) -> bool:
        """True when ``func`` is a coroutine function."""
        return inspect.iscoroutinefunction(self.func)

    def schema(self) -> dict[str, Any]:
        """``{"name", "description", "parameters"}``: the common tool-calling shape."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return {}
    if tp is type(None):
        return {"type": "null"}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a) for a in args]}
    if origin is Literal:
        return {"enum": list(args)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    if tp in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset):
        schema: dict[str, Any] = {"type": "array"}
        if args and not (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            if origin is tuple:
                schema["prefixItems"] = [_type_schema(a) for a in args]
                schema["minItems"] = schema["maxItems"] = len(args)
            else:
                schema["items"] = _type_schema(args[0])
        elif args:
            schema["items"] = _type_schema(args[0])
        return schema
    if tp is dict or origin in (dict, Mapping) or tp is Mapping:
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = _type_schema(args[1])
        return schema
    raise UsageError(f"tool parameter type {tp!r} has no JSON schema; use JSON-like types")


def _docstring_parts(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary and per-argument descriptions."""
    if not doc:
        return "", {}
    doc = inspect.cleandoc(doc)
    summary = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    match = re.search(r"^(Args|Arguments|Parameters):\s*$(.*?)(?=^\S|\Z)", doc, re.M | re.S)
    if match:
        current = None
        for line in match.group(2).splitlines():
            item = re.match(r"^\s{2,}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
            if item and (current is None or len(line) - len(line.lstrip()) <= 4):
                current = item.group(1)
                params[current] = item.group(2).strip()
            elif current and line.strip():
                params[current] = f"{params[current]} {line.strip()}"
    return summary, params


def schema_for_function(func: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """Derive ``(description, parameters_schema)`` from ``func``'s hints and docstring.

    A :func:`functools.partial` is described by its remaining parameters, with the
    wrapped function's hints and docstring.

    Raises:
        UsageError: For a non-callable, a callable whose signature or type hints cannot
            be read (no signature, an unresolvable annotation), ``*args``/``**kwargs``,
            or parameter types with no JSON form.
    """
    if not callable(func):
        raise UsageError("a tool must be callable")
    label = getattr(func, "__name__", None) or type(func).__name__
    target = func.func if isinstance(func, functools.partial) else func
    try:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(target)
    except Exception as exc:  # NameError, TypeError, ValueError, ... from user annotations
        raise UsageError(
            f"tool {label!r}: cannot read its signature and type hints ({safe_repr(exc)})"
        ) from exc
    summary, docs = _docstring_parts(target.__doc__)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise UsageError(f"tool {label!r}: *args/**kwargs cannot be described")
        prop = _type_schema(hints.get(name, Any))
        if name in docs:
            prop["description"] = docs[name]
        if param.default is param.empty:
            required.append(name)
        elif param.default is None or isinstance(param.default, str | int | float | bool):
            prop["default"] = param.default
        properties[name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return summary, schema


def _check(value: Any, schema: Mapping[str, Any], path: str) -> None:
    """Validate ``value`` against the JSON-schema subset :func:`schema_for_function` emits."""
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                _check(value, option, path)
                return
            except ToolArgumentError as exc:
                errors.append(str(exc))
        raise ToolArgumentError(f"{path}: matches none of the allowed types ({'; '.join(errors)})")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolArgumentError(f"{path}: {safe_repr(value)} is not one of {schema['enum']}")
    kind = schema.get("type")
    ok = {
        None: True,
        "null": value is None,
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "array": isinstance(value, list | tuple),
        "object": isinstance(value, Mapping),
    }.get(kind, True)
    if not ok:
        raise ToolArgumentError(f"{path}: expected {kind}, got {type(value).__name__}")
    if kind == "array":
        if "prefixItems" in schema:
            if len(value) != len(schema["prefixItems"]):
                raise ToolArgumentError(f"{path}: expected {len(schema['prefixItems'])} items")
            for i, (item, sub) in enumerate(zip(value, schema["prefixItems"], strict=True)):
                _check(item, sub, f"{path}[{i}]")
        elif "items" in schema:
            for i, item in enumerate(value):
                _check(item, schema["items"], f"{path}[{i}]")
    if kind == "object":
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                raise ToolArgumentError(f"{path}: missing required parameter {name!r}")
        for key, item in value.items():
            if key in props:
                _check(item, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                raise ToolArgumentError(f"{path}: unexpected parameter {safe_repr(key)}")
            elif isinstance(schema.get("additionalProperties"), Mapping):
                _check(item, schema["additionalProperties"], f"{path}[{safe_repr(key)}]")


class ToolRegistry:
    """A set of named tools.

    Register with the decorator form (``@registry.tool`` or ``@registry.tool(name=...)``)
    or :meth:`register`. Sync tools run in a worker thread under :meth:`ainvoke` so a
    blocking tool never stalls the event loop.
    """

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
    ) -> Tool:
        """Register ``func`` and return its :class:`Tool`.

        Raises:
            UsageError: For a non-callable, an invalid or duplicate name, no ``name`` for
                a callable without ``__name__`` (a :func:`functools.partial`), or an
                undescribable signature.
        """
        if not callable(func):
            raise UsageError("a tool must be callable")
        tool_name = name or getattr(func, "__name__", None)
        if tool_name is None:
            raise UsageError("give name= for a callable without __name__")
        if not isinstance(tool_name, str) or not _NAME_RE.match(tool_name):
            raise UsageError(
                f"invalid tool name {safe_repr(tool_name)}: letters, digits, '_' or '-', at most 64"
            )
        if tool_name in self._tools:
            raise UsageError(f"a tool named {tool_name!r} is already registered")
        summary, parameters = schema_for_function(func)
        tool = Tool(tool_name, description or summary, parameters, func)
        self._tools[tool_name] = tool
        return tool

    @overload
    def tool(self, func: F) -> F: ...

    @overload
    def tool(
        self, *, name: str | None = None, description: str | None = None
    ) -> Callable[[F], F]: ...

    def tool(
        self,
        func: F | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
    ) -> F | Callable[[F], F]:
        """Decorator that registers a function as a tool and returns it unchanged."""

        def decorate(f: F) -> F:
            self.register(f, name=name, description=description)
            return f

        return decorate(func) if func is not None else decorate

    def get(self, name: str) -> Tool:
        """Return the tool named ``name``.

        Raises:
            UnknownToolError: If none is registered under that name.
        """
        try:
            return self._tools[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._tools)) or "none"
            raise UnknownToolError(
                f"unknown tool {safe_repr(name)} (registered: {known})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """Every tool's :meth:`Tool.schema`."""
        return [t.schema() for t in self._tools.values()]

    def validate(self, name: str, params: Mapping[str, Any]) -> Tool:
        """Check ``params`` against the tool's schema and return the tool.

        Raises:
            UnknownToolError: For an unknown tool.
            ToolArgumentError: For missing, unexpected or mistyped parameters.
        """
        tool = self.get(name)
        if not isinstance(params, Mapping):
            raise ToolArgumentError(f"{name}: parameters must be an object")
        _check(params, tool.parameters, name)
        return tool

    async def ainvoke(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """Validate ``params`` and call the tool; sync tools run in a worker thread.

        Cancelled while a sync tool runs, it returns at once and leaves the thread to
        finish on its own (Python cannot stop a thread); the tool's result is dropped.

        Raises:
            UnknownToolError: For an unknown tool.
            ToolArgumentError: For invalid parameters.
            ToolExecutionError: If the tool raised (the original is ``__cause__``).
        """
        params = {} if params is None else params
        tool = self.validate(name, params)
        try:
            if tool.is_async:
                return await tool.func(**params)
            # Abandoned when cancelled: a tool stuck in a thread (a call with no timeout)
            # must not hold a stopping runner, or a script's timeout, until it returns.
            result = await anyio.to_thread.run_sync(
                functools.partial(tool.func, **params), abandon_on_cancel=True
            )
            if inspect.isawaitable(result):
                return await result
            return result
        except Exception as exc:
            raise ToolExecutionError(f"tool {name!r} failed: {safe_repr(exc)}") from exc

    def invoke(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """Synchronous form of :meth:`ainvoke` (sync tools are called directly)."""
        params = {} if params is None else params
        tool = self.validate(name, params)
        if tool.is_async:
            return _sync.run(self.ainvoke, name, params, async_name="ToolRegistry.ainvoke")
        _sync.check_sync_allowed("ToolRegistry.ainvoke")
        try:
            return tool.func(**params)
        except Exception as exc:
            raise ToolExecutionError(f"tool {name!r} failed: {safe_repr(exc)}") from exc
