"""One exception hierarchy for HERA. The CLI prints `str(exc)` as one line; the server maps
each class to an OpenAI-shaped error with its HTTP status (see hera_core.serving.server)."""

from __future__ import annotations


class HeraError(Exception):
    """Base class. The message is one line that names the fix."""

    http_status = 500
    error_type = "server_error"


class ConfigError(HeraError, ValueError):
    """A configuration value is invalid."""

    http_status = 400
    error_type = "invalid_request_error"


class InvalidRequestError(HeraError, ValueError):
    """A client's request is malformed or cannot be served as asked."""

    http_status = 400
    error_type = "invalid_request_error"


class FieldError(InvalidRequestError):
    """A request field HERA refuses, or a field's value it cannot take; `param` names the field
    (the OpenAI error body's `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(HeraError):
    """A model file is not installed; the message names the package and command."""


class UsageError(HeraError, ValueError):
    """A command-line value, or a file it names (tasks, traces, votes), cannot be used; the
    message says which one and what to do. The CLI prints it as one line."""

    http_status = 400
    error_type = "invalid_request_error"


class MissingExtraError(HeraError):
    """A command needs a library or data package that this install leaves out (an extra of
    pyproject's optional-dependencies, or a package `make install` adds); the message names it."""


class CacheMissError(HeraError, LookupError):
    """An offline replay asked the completion cache for something it does not hold."""


class SelfTestFailed(HeraError):
    """`hera doctor` found a broken install; the message names the fix."""


class CannotServeLocallyError(InvalidRequestError):
    """The local engine cannot serve this step (the runtime sends it to the cloud instead)."""


class ContextOverflowError(CannotServeLocallyError):
    """The prompt does not fit the model's context window."""


class CloudError(HeraError):
    """The cloud LLM could not be reached or answered with an error.

    `attempts` lists each try as (outcome, seconds): outcome is "ok", an HTTP status, or the
    name of the connection error; the runtime books them in the ledger.
    """

    http_status = 502
    error_type = "upstream_error"

    def __init__(self, message: str, attempts: list[tuple[str, float]] | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts or []


class CloudRequestError(CloudError):
    """The cloud refused the request itself (HTTP 400-422 but 401/403): the client's mistake."""

    http_status = 400
    error_type = "invalid_request_error"


class StructuredOutputError(CloudError):
    """The cloud's answer did not parse or validate against the request's response_format, again
    after one retry: returned as this error, never as an answer that breaks the client's parser."""


class CloudUnavailableError(CloudError):
    """The cloud endpoint is unreachable (connection refused, DNS, timeout, open circuit)."""

    http_status = 503


class BudgetExceededError(HeraError):
    """A cloud spend cap is reached and the configured action is to refuse."""

    http_status = 429
    error_type = "insufficient_quota"
