"""Mapping lloom's errors to OpenAI's error JSON and HTTP statuses (pure code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lloom.errors import (
    AllExecutorsFailed,
    LloomError,
    NoExecutorError,
    PartialResponseError,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    UsageError,
)
from lloom.protocol.llm import ErrorCode


@dataclass(frozen=True, slots=True)
class ApiError:
    """An error as the gateway answers it."""

    status: int
    message: str
    type: str
    code: str | None = None

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {
            "error": {"message": self.message, "type": self.type, "param": None, "code": self.code}
        }


def bad_request(message: str) -> ApiError:
    """A 400 for a malformed request."""
    return ApiError(400, message, "invalid_request_error")


_BY_TYPE: tuple[tuple[type[LloomError], int, str, str | None], ...] = (
    (UsageError, 400, "invalid_request_error", None),
    (ProtocolError, 400, "invalid_request_error", None),
    (NoExecutorError, 404, "invalid_request_error", "model_not_found"),
    (RequestTimeout, 504, "timeout", "timeout"),
    (AllExecutorsFailed, 503, "service_unavailable", "no_executor_reachable"),
    (PartialResponseError, 502, "api_error", "partial_response"),
)


def _remote(exc: RemoteError) -> ApiError:
    try:
        code = ErrorCode(exc.code)
    except ValueError:
        return ApiError(502, str(exc), "api_error", exc.code)
    kind = "invalid_request_error" if code.http_status in (400, 404, 413) else "api_error"
    return ApiError(code.http_status, exc.message, kind, code.value)


def api_error(exc: LloomError) -> ApiError:
    """The answer for ``exc``."""
    if isinstance(exc, RemoteError):
        return _remote(exc)
    for kind, status, type_, code in _BY_TYPE:
        if isinstance(exc, kind):
            return ApiError(status, str(exc), type_, code)
    return ApiError(502, str(exc), "api_error", None)
