"""converge's exception hierarchy.

Every error converge raises on purpose derives from :class:`ConvergeError`. Where a
caller would reasonably catch a builtin (``ValueError`` for bad input, ``TimeoutError``
for a deadline, ``OSError`` for a storage failure), the converge error derives from that
builtin too, so ``except ValueError`` keeps working.

```text
ConvergeError
├── UsageError (ValueError)                    bad argument to a public entry point
│   └── ConfigurationError                     invalid configuration object
├── SyncInEventLoopError (RuntimeError)        sync shim called on the event-loop thread
├── MissingDependencyError (ImportError)       optional extra not installed
├── ClosedError (RuntimeError)                 object used after aclose()
├── FormatError (ValueError)                   malformed serialized data
│   └── MessageFormatError                     bad Message dict/bytes
├── SignatureError (ValueError)                Ed25519 signature missing or invalid
├── IdentityError
│   └── WrongPasswordError (ValueError)        identity file did not open
├── StoreError (OSError)
│   ├── StoreCorruptedError                    stored bytes do not decode (names the key)
│   ├── StoreUnavailableError                  backend unreachable / not working
│   │   └── StoreOutcomeUnknownError           a write got no answer: applied or not, unknown
│   └── StoreLockTimeoutError (TimeoutError)   cross-process lock not acquired in time
├── CryptoError
│   ├── CryptoTypeError (TypeError)            non-bytes where bytes are required
│   ├── CryptoValueError (ValueError)          wrong key length, negative size, ...
│   ├── DecryptionError (ValueError)           tampered, truncated or wrong-key ciphertext
│   └── KeyNotFoundError (LookupError)         EncryptedStore blob names an unknown key id
├── ToolError
│   ├── UnknownToolError (LookupError)
│   ├── ToolArgumentError (ValueError)
│   └── ToolExecutionError                     the tool itself raised
├── LLMError
│   ├── DecisionParseError (ValueError)        model output is not valid decision JSON
│   ├── BudgetExceededError                    ReAct loop ran out of steps or tokens
│   └── ProviderError                          carries .provider and .status_code
│       ├── ProviderAuthError
│       ├── ProviderRateLimitError             carries .retry_after
│       ├── ProviderTimeoutError (TimeoutError)
│       ├── ProviderConnectionError (ConnectionError)
│       └── ProviderResponseError              malformed / unexpected response
│           ├── ProviderOverloadedError        server overloaded (529, overloaded_error)
│           ├── ResponseTruncatedError         stopped at the token limit; carries .result
│           ├── ResponseIncompleteError        a stream ended with no stop reason; .result
│           ├── ContentFilteredError           cut by a content filter; carries .result
│           └── ResponseRefusedError           the model refused; carries .result
├── RateLimitError
│   └── RateLimitTimeoutError (TimeoutError)   acquire gave up; carries .retry_after
├── QueueError
│   ├── QueueFullError                         a durable queue holds max_pending records
│   └── DuplicateRecordError                   a record id or one of its claims exists
├── RuntimeBusError
│   ├── AgentFailedError                       an agent raised; carries .agent_id
│   └── BusFullError                           a receiver's inbox is full (no-wait publish)
└── WebhookError
    ├── WebhookSecurityError (ValueError)      inbound request rejected; carries .status
    │   └── DuplicateEventError                replayed event id
    ├── DeliveryError                          outbound delivery failed for good
    └── IdempotencyConflictError (ValueError)  outbound key reused for another action
```
"""

from __future__ import annotations

__all__ = [
    "AgentFailedError",
    "BudgetExceededError",
    "BusFullError",
    "ClosedError",
    "ConfigurationError",
    "ContentFilteredError",
    "ConvergeError",
    "CryptoError",
    "CryptoTypeError",
    "CryptoValueError",
    "DecisionParseError",
    "DecryptionError",
    "DeliveryError",
    "DuplicateEventError",
    "DuplicateRecordError",
    "FormatError",
    "IdempotencyConflictError",
    "IdentityError",
    "KeyNotFoundError",
    "LLMError",
    "MessageFormatError",
    "MissingDependencyError",
    "ProviderAuthError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderOverloadedError",
    "ProviderRateLimitError",
    "ProviderResponseError",
    "ProviderTimeoutError",
    "QueueError",
    "QueueFullError",
    "RateLimitError",
    "RateLimitTimeoutError",
    "ResponseIncompleteError",
    "ResponseRefusedError",
    "ResponseTruncatedError",
    "RuntimeBusError",
    "SignatureError",
    "StoreCorruptedError",
    "StoreError",
    "StoreLockTimeoutError",
    "StoreOutcomeUnknownError",
    "StoreUnavailableError",
    "SyncInEventLoopError",
    "ToolArgumentError",
    "ToolError",
    "ToolExecutionError",
    "UnknownToolError",
    "UsageError",
    "WebhookError",
    "WebhookSecurityError",
    "WrongPasswordError",
]


class ConvergeError(Exception):
    """Base of every error converge raises on purpose."""


# -- general ---------------------------------------------------------------------------


class UsageError(ConvergeError, ValueError):
    """A public entry point was called with an invalid argument."""


class ConfigurationError(UsageError):
    """A configuration object (bucket config, policy, profile, ...) is invalid."""


class SyncInEventLoopError(ConvergeError, RuntimeError):
    """A synchronous shim was called on an event-loop thread.

    Calling it would block (or deadlock) the loop; the message names the coroutine
    method to ``await`` instead.
    """


class MissingDependencyError(ConvergeError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


class ClosedError(ConvergeError, RuntimeError):
    """The object was used after it was closed."""


class FormatError(ConvergeError, ValueError):
    """Serialized data is malformed."""


class MessageFormatError(FormatError):
    """A :class:`~converge.core.message.Message` dict or byte string is malformed."""


class SignatureError(ConvergeError, ValueError):
    """A signature is missing or does not verify."""


class IdentityError(ConvergeError):
    """An identity could not be created, loaded or saved."""


class WrongPasswordError(IdentityError, ValueError):
    """The password does not open the saved identity (or the file is damaged)."""


# -- storage ---------------------------------------------------------------------------


class StoreError(ConvergeError, OSError):
    """A store operation failed."""


class StoreCorruptedError(StoreError):
    """The bytes stored under a key do not decode. Other keys are unaffected.

    Attributes:
        key: The key whose value is corrupt.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"stored value for key {key!r} is corrupt: {reason}")
        self.key = key


class StoreUnavailableError(StoreError):
    """The storage backend cannot be reached or is not working."""


class StoreOutcomeUnknownError(StoreUnavailableError):
    """A write was sent but no answer came in time: it may or may not have been applied.

    Nothing was retried automatically (retrying a ``put_if_absent`` could report that
    our own value is someone else's). Read the key to learn the outcome.

    Attributes:
        key: The key written (the first one, for a multi-key update).
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(
            f"the write of key {key!r} may or may not have been applied: {reason}; "
            "read the key to find out"
        )
        self.key = key


class StoreLockTimeoutError(StoreError, TimeoutError):
    """A cross-process lock was not acquired in time."""


# -- crypto ----------------------------------------------------------------------------


class CryptoError(ConvergeError):
    """Base of the crypto extension's errors."""


class CryptoTypeError(CryptoError, TypeError):
    """An argument has the wrong type (for example ``str`` where ``bytes`` is needed)."""


class CryptoValueError(CryptoError, ValueError):
    """An argument has the right type but an invalid value (key length, size, ...)."""


class DecryptionError(CryptoError, ValueError):
    """Ciphertext is tampered, truncated, or was sealed with another key or AAD.

    The message never contains key material or plaintext.
    """


class KeyNotFoundError(CryptoError, LookupError):
    """A sealed value names a key id that is not configured."""


# -- tools -----------------------------------------------------------------------------


class ToolError(ConvergeError):
    """Base of tool-registry errors."""


class UnknownToolError(ToolError, LookupError):
    """No tool is registered under that name."""


class ToolArgumentError(ToolError, ValueError):
    """Tool parameters do not match the tool's schema."""


class ToolExecutionError(ToolError):
    """The tool function itself raised; the original is the ``__cause__``."""


# -- llm -------------------------------------------------------------------------------


class LLMError(ConvergeError):
    """Base of the LLM extension's errors."""


class DecisionParseError(LLMError, ValueError):
    """Model output is not a valid decision list."""


class BudgetExceededError(LLMError):
    """A ReAct loop exhausted its step or token budget."""


class ProviderError(LLMError):
    """A call to a model provider failed.

    Attributes:
        provider: Provider name (``"openai"``, ``"anthropic"``, ``"mistral"``, ...).
        status_code: HTTP status, when the provider answered.
    """

    def __init__(self, message: str, *, provider: str = "", status_code: int | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.status_code = status_code


class ProviderAuthError(ProviderError):
    """The provider rejected the credentials (401/403)."""


class ProviderRateLimitError(ProviderError):
    """The provider kept answering 429 past the retry budget.

    Attributes:
        retry_after: Seconds the provider asked to wait, when it said.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status_code: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, status_code=status_code)
        self.retry_after = retry_after


class ProviderTimeoutError(ProviderError, TimeoutError):
    """The call (or its overall deadline) timed out."""


class ProviderConnectionError(ProviderError, ConnectionError):
    """The provider could not be reached."""


class ProviderResponseError(ProviderError):
    """The provider answered with an error status or a malformed body."""


class ProviderOverloadedError(ProviderResponseError):
    """The provider is overloaded (HTTP 529, or an ``overloaded_error`` event in a stream).

    A 5xx-class condition (``status_code`` is 529 when the server gave no other): retried
    by the :class:`RetryPolicy <converge.extensions.llm.RetryPolicy>` before any text was
    streamed, raised as is after.
    """


class _ResultError(ProviderResponseError):
    """A complete answer that the caller did not ask to accept; carries it as ``.result``."""

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status_code: int | None = 200,
        result: object = None,
    ) -> None:
        super().__init__(message, provider=provider, status_code=status_code)
        self.result = result


class ResponseTruncatedError(_ResultError):
    """The model stopped at the output token limit (``length``, ``max_tokens``).

    Attributes:
        result: The partial :class:`ChatResult <converge.extensions.llm.ChatResult>`;
            pass ``allow_partial=True`` to get it returned instead. Raise ``max_tokens``
            (or ``max_completion_tokens``) to get the whole answer.
    """


class ResponseIncompleteError(_ResultError):
    """A stream ended before the provider said the answer was complete: no stop reason
    came (no ``finish_reason``, no ``message_delta``), so a proxy, a load balancer or the
    provider cut it short and the text may stop mid-sentence.

    Retried by the :class:`RetryPolicy <converge.extensions.llm.RetryPolicy>` when it
    ends a stream before any text; raised at the end of the stream after text.

    Attributes:
        result: The partial :class:`ChatResult <converge.extensions.llm.ChatResult>`
            (``stop_reason == "incomplete"``); pass ``allow_partial=True`` to get it
            returned instead.
    """


class ContentFilteredError(_ResultError):
    """The provider's content filter cut or withheld the answer (``content_filter``).

    Attributes:
        result: The partial :class:`ChatResult <converge.extensions.llm.ChatResult>`.
    """


class ResponseRefusedError(_ResultError):
    """The model refused to answer (OpenAI's ``refusal``, Anthropic's ``refusal`` stop).

    Attributes:
        result: The :class:`ChatResult <converge.extensions.llm.ChatResult>`; its
            ``text`` holds the refusal message when the provider gave one.
    """


# -- rate limiting ---------------------------------------------------------------------


class RateLimitError(ConvergeError):
    """Base of the rate-limit extension's errors."""


class RateLimitTimeoutError(RateLimitError, TimeoutError):
    """Waiting for capacity gave up.

    Attributes:
        retry_after: Seconds until the message would have been admitted
            (``math.inf`` if it never can be, e.g. cost above capacity).
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# -- durable queues --------------------------------------------------------------------


class QueueError(ConvergeError):
    """Base of the durable queues' errors (``converge.durable``)."""


class QueueFullError(QueueError):
    """A durable queue already holds ``max_pending`` open records; nothing was added."""


class DuplicateRecordError(QueueError):
    """The record id, or one of the claims written with it, exists; nothing was added."""


# -- runtime ---------------------------------------------------------------------------


class RuntimeBusError(ConvergeError):
    """Base of the message runtime's errors."""


class AgentFailedError(RuntimeBusError):
    """An agent raised while deciding or executing decisions.

    Attributes:
        agent_id: The failing agent's identity fingerprint or name.
    """

    def __init__(self, message: str, *, agent_id: str) -> None:
        super().__init__(message)
        self.agent_id = agent_id


class BusFullError(RuntimeBusError):
    """A publish that may not wait found a receiver's inbox full; nothing was delivered."""


# -- webhooks --------------------------------------------------------------------------


class WebhookError(ConvergeError):
    """Base of the connectors extension's errors."""


class WebhookSecurityError(WebhookError, ValueError):
    """An inbound webhook request was rejected.

    Attributes:
        status: The HTTP status the gateway answers with (400, 401, 403, ...).
        reason: A short machine-readable reason (``"bad_signature"``, ...).
    """

    def __init__(self, message: str, *, status: int = 400, reason: str = "rejected") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class DuplicateEventError(WebhookSecurityError):
    """The event id was already accepted inside the idempotency window."""

    def __init__(self, message: str = "duplicate event", *, reason: str = "duplicate") -> None:
        super().__init__(message, status=200, reason=reason)


class DeliveryError(WebhookError):
    """An outbound action could not be delivered (dead-lettered)."""


class IdempotencyConflictError(WebhookError, ValueError):
    """An outbound idempotency key is already taken by a different action.

    Submitting the same action again with its key is fine (it returns the original
    record); a different action under a key that is still kept is refused, because
    only one of the two could ever be delivered. The gateway answers ``409``.

    Attributes:
        existing_id: The outbox id the key already names.
    """

    def __init__(self, message: str, *, existing_id: str) -> None:
        super().__init__(message)
        self.existing_id = existing_id
