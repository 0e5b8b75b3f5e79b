"""The ``error`` frame a peer gets for a failed request (pure code).

A peer learns the kind of failure (the error's wire code) and, for its own mistakes and
refusals, why; never the text of a backend's error or of a bug, which may hold internal
addresses, echoed keys or data. Those stay in the executor's log.
"""

from __future__ import annotations

from lloom.errors import (
    BackendError,
    BackendHTTPError,
    ErrorCode,
    LloomError,
    PeerInputError,
    Refused,
)
from lloom.protocol import llm

#: What a peer is told when a backend fails; the backend's own text stays in the local log
#: (it may hold internal addresses or echoed keys).
_BACKEND_MESSAGES = {
    ErrorCode.BACKEND_UNREACHABLE: "the executor's backend is unreachable",
    ErrorCode.BACKEND_TIMEOUT: "the executor's backend timed out",
    ErrorCode.BACKEND_ERROR: "the executor's backend failed",
}


def error_frame(exc: LloomError) -> llm.Error:
    """The ``error`` frame a peer gets for ``exc``: a code and a message that reveals
    nothing of the executor (peer input errors and refusals are about the peer's request)."""
    code = exc.error_code
    status = 0
    if isinstance(exc, PeerInputError | Refused):
        message = str(exc)
    elif isinstance(exc, BackendError):
        message = _BACKEND_MESSAGES.get(code, "the executor's backend failed")
        if isinstance(exc, BackendHTTPError) and 400 <= exc.status < 500:
            status = exc.status
            message = f"the executor's backend refused the request (HTTP {exc.status})"
    else:
        code, message = ErrorCode.INTERNAL, "internal error"
    return llm.Error(code, message, status)
