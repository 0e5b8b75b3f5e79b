"""The one exception tree of lloom, and what each error means at every edge.

::

    LloomError                 lloom's own failure; unknown exceptions become InternalError
    ├── UsageError             bad input from a person: CLI flags, config files (exit code 2)
    │   ├── ConfigError
    │   └── IdentityError      a bad private key or key file; never carries the key itself
    ├── PeerInputError         a peer or an HTTP caller sent something lloom refuses
    │   ├── ProtocolError      bytes that break a lloom wire protocol
    │   │   ├── FrameTooLarge
    │   │   └── TruncatedFrame
    │   ├── InvalidRequest     an OpenAI request body that is not acceptable (field named)
    │   │   └── RequestTooLarge
    │   ├── Unauthorized       no or a wrong gateway API key
    │   ├── Forbidden          a refused Host or Origin
    │   ├── UnsupportedMediaType  a POST body that is not application/json
    │   └── RateLimited        a gateway key over one of its limits
    ├── NetworkError           libp2p I/O failed (dial, stream, DHT)
    │   ├── DialError
    │   └── PeerTimeout
    ├── BackendError           an executor's LLM backend failed
    │   ├── BackendUnreachable
    │   ├── BackendTimeout
    │   └── BackendHTTPError   the backend answered with an HTTP error (status kept)
    ├── RemoteError            a peer answered a request with an error frame (code kept)
    ├── Refused                an executor refuses a request (unknown model, busy, …)
    ├── ChainError             a transaction or chain query failed
    │   └── ChainResetError    the chain no longer holds what was settled (reset or replaced)
    ├── StoreError             a local database (usage store, ledger) refused or failed
    ├── DevnetError            ``lloom devnet`` could not start or keep its local network
    ├── ClientError            a client could not get an answer
    │   ├── NoExecutorError        nobody serves the model (the DHT said so)
    │   ├── DiscoveryFailed        the lookup itself failed (timeout, no validator): try later
    │   ├── AllExecutorsFailed     every executor tried failed before the first token
    │   ├── RequestTimeout         no answer within the client's timeout
    │   └── PartialResponseError   an executor failed after tokens were delivered
    └── InternalError          a bug of lloom's, caught at a request boundary

Each class carries its meaning at the edges, so a new error is one edit: ``code`` (the
protocol error code of an ``error`` frame and the OpenAI error ``code``), ``http_status``
(what a gateway answers), ``exit_code`` (what a CLI exits with) and ``retryable`` (whether
another executor may succeed where this one failed). :func:`as_lloom_error` turns any
exception caught at a boundary into a :class:`LloomError`, so nothing unknown reaches a task
group. Library errors are translated where they happen with ``raise ... from exc``.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` frame: why an executor refused or failed a request."""

    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    UNKNOWN_MODEL = "unknown_model"
    BUSY = "busy"
    BACKEND_UNREACHABLE = "backend_unreachable"
    BACKEND_ERROR = "backend_error"
    BACKEND_TIMEOUT = "backend_timeout"
    RECEIPT_REQUIRED = "receipt_required"
    INTERNAL = "internal"

    @property
    def http_status(self) -> int:
        """The HTTP status a gateway answers with for this error."""
        return _STATUS[self]

    @property
    def retryable(self) -> bool:
        """Whether another executor may succeed where this one failed."""
        return self not in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)


_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.BUSY: 503,
    ErrorCode.BACKEND_UNREACHABLE: 502,
    ErrorCode.BACKEND_ERROR: 502,
    ErrorCode.BACKEND_TIMEOUT: 504,
    ErrorCode.RECEIPT_REQUIRED: 402,
    ErrorCode.INTERNAL: 500,
}


class LloomError(Exception):
    """Root of every error lloom raises on purpose."""

    #: Protocol error code (an :class:`ErrorCode` value) or OpenAI error code.
    code: str = ErrorCode.INTERNAL.value
    #: HTTP status a gateway answers with.
    http_status: int = 500
    #: OpenAI error ``type``.
    openai_type: str = "api_error"
    #: Exit code of a CLI that stops on this error.
    exit_code: int = 1
    #: Whether another executor may succeed where this one failed.
    retryable: bool = True

    @property
    def error_code(self) -> ErrorCode:
        """The wire code of an ``error`` frame for this error."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return ErrorCode.INTERNAL


class UsageError(LloomError):
    """A person gave lloom bad input (a flag, a file, a key). CLIs exit with code 2."""

    code = ErrorCode.BAD_REQUEST.value
    http_status = 400
    openai_type = "invalid_request_error"
    exit_code = 2
    retryable = False


class ConfigError(UsageError):
    """A configuration file or value is invalid; the message names the field."""


class IdentityError(UsageError):
    """A private key or key file is invalid. The message never contains the key."""


class PeerInputError(LloomError):
    """A remote peer or an HTTP caller sent input that lloom refuses.

    Not a fault of lloom's and not a person's bad flag: the answer is an error frame or an
    HTTP 4xx, one log line, and the process carries on.
    """

    code = ErrorCode.BAD_REQUEST.value
    http_status = 400
    openai_type = "invalid_request_error"
    exit_code = 2
    retryable = False


class ProtocolError(PeerInputError):
    """A remote peer violated a lloom wire protocol (garbage, truncation, oversize).

    Retryable: seen by a client, it is one misbehaving executor; another may do better.
    """

    retryable = True


class FrameTooLarge(ProtocolError):
    """A frame announced a length above the agreed maximum."""

    code = ErrorCode.TOO_LARGE.value
    http_status = 413


class TruncatedFrame(ProtocolError):
    """The stream ended in the middle of a frame."""


class InvalidRequest(PeerInputError):
    """An OpenAI request body is not acceptable; the message names the field."""


class RequestTooLarge(InvalidRequest):
    """A request body above the accepted size."""

    code = ErrorCode.TOO_LARGE.value
    http_status = 413


class Unauthorized(PeerInputError):
    """A gateway request without a valid API key."""

    code = "invalid_api_key"
    http_status = 401


class Forbidden(PeerInputError):
    """A gateway request refused for where it comes from (its Host or Origin header)."""

    code = "forbidden"
    http_status = 403


class UnsupportedMediaType(PeerInputError):
    """A POST whose body is not declared ``application/json``."""

    code = "unsupported_media_type"
    http_status = 415


class RateLimited(PeerInputError):
    """A gateway key is over one of its limits; ``retry_after`` seconds until it may retry."""

    code = "rate_limit_exceeded"
    http_status = 429
    openai_type = "requests"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NetworkError(LloomError):
    """libp2p networking failed: a dial, a stream, or a DHT query."""

    code = ErrorCode.INTERNAL.value
    http_status = 502


class DialError(NetworkError):
    """Could not connect to a peer."""


class PeerTimeout(NetworkError):
    """A peer did not answer within the allowed time."""


class BackendError(LloomError):
    """An OpenAI-compatible backend of an executor failed."""

    code = ErrorCode.BACKEND_ERROR.value
    http_status = 502


class BackendUnreachable(BackendError):
    """The backend could not be connected to."""

    code = ErrorCode.BACKEND_UNREACHABLE.value


class BackendTimeout(BackendError):
    """The backend did not answer in time."""

    code = ErrorCode.BACKEND_TIMEOUT.value
    http_status = 504


class BackendHTTPError(BackendError):
    """The backend answered with an HTTP error; ``status`` and its message are kept.

    The message is for the executor's own log: peers get a generic one (the backend's text
    may hold internal addresses or echoed keys).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"backend returned HTTP {status}: {message}")
        self.status = status
        self.message = message


class RemoteError(LloomError):
    """A peer answered with an error frame; ``code`` says which kind."""

    exit_code = 7

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        _take_meaning(self, code)


class Refused(LloomError):
    """An executor refuses a request (unknown model, busy, receipts required); the wire
    ``code`` gives its meaning."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code.value
        _take_meaning(self, code.value)


def _take_meaning(exc: LloomError, code: str) -> None:
    """Status and retryability of an error known only by its wire code."""
    try:
        known = ErrorCode(code)
    except ValueError:
        exc.http_status, exc.retryable = 502, True
        return
    exc.http_status, exc.retryable = known.http_status, known.retryable
    if 400 <= exc.http_status < 500:
        exc.openai_type = "invalid_request_error"


class ChainError(LloomError):
    """A transaction or chain query failed."""


class ChainResetError(ChainError):
    """The chain no longer holds what was settled: it was reset, replaced or the contract
    is gone. Settlement waits, and resumes when a contract is there again."""


class StoreError(LloomError):
    """A local database (the executor's usage store, a client's ledger) refused or failed."""


class DevnetError(LloomError):
    """``lloom devnet`` could not start, reuse or keep running its local network."""


class ClientError(LloomError):
    """A client could not get an answer."""


class NoExecutorError(ClientError):
    """No executor serving the requested model was found."""

    code = "model_not_found"
    http_status = 404
    openai_type = "invalid_request_error"
    exit_code = 3
    retryable = False


class DiscoveryFailed(ClientError):
    """Looking executors up failed (a timeout, no validator connected): not knowing is not
    "nobody serves it", so this is a 503 to retry, never a 404."""

    code = "discovery_unavailable"
    http_status = 503
    openai_type = "service_unavailable"
    #: Seconds a caller should wait before retrying.
    retry_after = 2


class AllExecutorsFailed(ClientError):
    """Every executor tried failed before delivering a token; ``errors`` says why."""

    code = "no_executor_reachable"
    http_status = 503
    openai_type = "service_unavailable"
    exit_code = 4
    #: Seconds a caller should wait before retrying (busy executors free up quickly).
    retry_after = 1

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        detail = "; ".join(f"{peer[:16]}…: {why}" for peer, why in errors)
        super().__init__(f"all {len(errors)} executor(s) failed: {detail}")
        self.errors = errors


class RequestTimeout(ClientError):
    """The request did not complete within the client's timeout."""

    code = "timeout"
    http_status = 504
    openai_type = "timeout"
    exit_code = 5


class PartialResponseError(ClientError):
    """An executor failed after part of the answer was delivered."""

    code = "partial_response"
    http_status = 502
    exit_code = 6
    retryable = False


class InternalError(LloomError):
    """A bug of lloom's (an exception it did not expect), caught at a request boundary.

    The message is generic; the original exception is logged where it was caught.
    """


def as_lloom_error(exc: BaseException) -> LloomError:
    """``exc`` as a :class:`LloomError`: itself, or an :class:`InternalError` standing in
    for an exception lloom did not expect (its text is not passed on: it may hold data)."""
    if isinstance(exc, LloomError):
        return exc
    return InternalError(f"internal error ({type(exc).__name__})")
