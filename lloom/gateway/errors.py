"""lloom's errors as OpenAI's error JSON and HTTP statuses (pure code).

The status, ``type`` and ``code`` of each error live on its class in :mod:`lloom.errors`;
this module only shapes the body. Errors that are not about the caller's request say
nothing of the network's inside beyond their kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lloom.errors import (
    ClientError,
    InternalError,
    PeerInputError,
    RemoteError,
    as_lloom_error,
)


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


def api_error(exc: BaseException) -> ApiError:
    """The answer for ``exc`` (any exception: unknown ones become a generic 500)."""
    err = as_lloom_error(exc)
    if isinstance(err, RemoteError):
        message = err.message
    elif isinstance(err, PeerInputError | ClientError):
        message = str(err)
    elif isinstance(err, InternalError):
        message = "internal error"
    else:
        message = f"{type(err).__name__}: {err}"
    return ApiError(err.http_status, message, err.openai_type, err.code)
