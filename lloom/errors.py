"""The one exception tree of lloom.

::

    LloomError
    ├── UsageError            bad input from a person: CLI flags, config files (exit code 2)
    │   ├── ConfigError
    │   └── IdentityError     a bad private key or key file; never carries the key itself
    ├── ProtocolError         a peer sent bytes that break a lloom wire protocol
    │   ├── FrameTooLarge
    │   └── TruncatedFrame
    ├── NetworkError          libp2p I/O failed (dial, stream, DHT)
    │   ├── DialError
    │   └── PeerTimeout
    ├── BackendError          an executor's LLM backend failed
    │   ├── BackendUnreachable
    │   ├── BackendTimeout
    │   └── BackendHTTPError  the backend answered with an HTTP error (status kept)
    ├── RemoteError           a peer answered a request with an error frame (code kept)
    ├── ChainError            a transaction or chain query failed (lloom.chain.tx)
    ├── DevnetError           ``lloom devnet`` could not start or keep its local network
    └── ClientError           a client could not get an answer
        ├── NoExecutorError       nobody serves the model
        ├── AllExecutorsFailed    every executor tried failed before the first token
        ├── RequestTimeout        no answer within the client's timeout
        └── PartialResponseError  an executor failed after tokens were delivered

Library errors are translated at the boundary with ``raise ... from exc`` so callers only
ever need to catch ``LloomError`` subclasses.
"""

from __future__ import annotations


class LloomError(Exception):
    """Root of every error lloom raises on purpose."""


class UsageError(LloomError):
    """A person gave lloom bad input (a flag, a file, a key). CLIs exit with code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file or value is invalid; the message names the field."""


class IdentityError(UsageError):
    """A private key or key file is invalid. The message never contains the key."""


class ProtocolError(LloomError):
    """A remote peer violated a lloom wire protocol (garbage, truncation, oversize)."""


class FrameTooLarge(ProtocolError):
    """A frame announced a length above the agreed maximum."""


class TruncatedFrame(ProtocolError):
    """The stream ended in the middle of a frame."""


class NetworkError(LloomError):
    """libp2p networking failed: a dial, a stream, or a DHT query."""


class DialError(NetworkError):
    """Could not connect to a peer."""


class PeerTimeout(NetworkError):
    """A peer did not answer within the allowed time."""


class BackendError(LloomError):
    """An OpenAI-compatible backend of an executor failed."""


class BackendUnreachable(BackendError):
    """The backend could not be connected to."""


class BackendTimeout(BackendError):
    """The backend did not answer in time."""


class BackendHTTPError(BackendError):
    """The backend answered with an HTTP error; ``status`` and its message are kept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"backend returned HTTP {status}: {message}")
        self.status = status
        self.message = message


class RemoteError(LloomError):
    """A peer answered with an error frame; ``code`` says which kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DevnetError(LloomError):
    """``lloom devnet`` could not start, reuse or keep running its local network."""


class ClientError(LloomError):
    """A client could not get an answer."""


class NoExecutorError(ClientError):
    """No executor serving the requested model was found."""


class AllExecutorsFailed(ClientError):
    """Every executor tried failed before delivering a token; ``errors`` says why."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        detail = "; ".join(f"{peer[:16]}…: {why}" for peer, why in errors)
        super().__init__(f"all {len(errors)} executor(s) failed: {detail}")
        self.errors = errors


class RequestTimeout(ClientError):
    """The request did not complete within the client's timeout."""


class PartialResponseError(ClientError):
    """An executor failed after part of the answer was delivered."""
