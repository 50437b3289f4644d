"""LLM extension: provider abstraction and LLM-driven agent.

Providers on the official SDKs (:class:`OpenAIProvider`, :class:`AnthropicProvider`,
:class:`MistralProvider`; extras ``llm-openai``, ``llm-anthropic``, ``llm-mistral``, all
three in ``llm``) share one :class:`RetryPolicy` and one error mapping onto
``converge.errors.Provider*``. :class:`LLMAgent` turns model output into
:mod:`converge.core.decisions`; :func:`arun_react` runs its tool calls in a loop.
Test helpers without a network live in :mod:`converge.extensions.llm.testing`.

Importing this package imports no SDK: each provider imports its SDK when constructed.
"""

from __future__ import annotations

from converge.errors import (
    ContentFilteredError,
    ProviderOverloadedError,
    ResponseIncompleteError,
    ResponseRefusedError,
    ResponseTruncatedError,
)
from converge.extensions.llm._retry import RetryPolicy
from converge.extensions.llm.agent import LLMAgent
from converge.extensions.llm.anthropic import AnthropicProvider
from converge.extensions.llm.decisions_json import decisions_tool, parse_decisions
from converge.extensions.llm.fallback import FallbackProvider
from converge.extensions.llm.limits import LimitedProvider
from converge.extensions.llm.mistral import MistralProvider
from converge.extensions.llm.openai import OpenAIProvider
from converge.extensions.llm.protocol import ChatResult, LLMProvider, ToolCall, Usage
from converge.extensions.llm.react import ReActResult, arun_react, run_react
from converge.extensions.llm.stream import ChatStream

__all__ = [
    "AnthropicProvider",
    "ChatResult",
    "ChatStream",
    "ContentFilteredError",
    "FallbackProvider",
    "LLMAgent",
    "LLMProvider",
    "LimitedProvider",
    "MistralProvider",
    "OpenAIProvider",
    "ProviderOverloadedError",
    "ReActResult",
    "ResponseIncompleteError",
    "ResponseRefusedError",
    "ResponseTruncatedError",
    "RetryPolicy",
    "ToolCall",
    "Usage",
    "arun_react",
    "decisions_tool",
    "parse_decisions",
    "run_react",
]
