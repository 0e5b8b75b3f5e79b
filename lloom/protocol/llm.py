"""The request protocol between a client and an executor: ``/lloom/llm/1.0.0``.

One libp2p stream carries one request. Every message is one frame
(:mod:`lloom.framing`) holding a UTF-8 JSON object with a type field ``t``::

    client -> executor   {"t": "request", "kind": "chat"|"completion", "body": {...}, "id"?,
                          "resume"?: {"delivered": "..."}}
    executor -> client   {"t": "chunk", "data": {...}}        0..n, streaming only
                         {"t": "response", "data": {...}}     non-streaming only
                         {"t": "end", "request_id", "model", "usage", "backend_usage"?,
                          "receipt"?}
                      or {"t": "error", "code", "message", "status"}
    client -> executor   {"t": "receipt", "request_id", "signature"}   answers end.receipt
                      or {"t": "refusal", "request_id", "reason"}

``body`` is an OpenAI request body (``/v1/chat/completions`` or ``/v1/completions``);
``data`` are OpenAI response objects or stream chunks, exactly as a backend produced them
(with the network model id). Every exchange ends with exactly one terminal message,
``end`` or ``error``: a killed executor looks like a clean end of stream, so a stream that
ends without one is a failure. The usage an ``end`` states is the billing count
(:mod:`lloom.protocol.billing`) the executor stored. docs/protocol.md is the specification.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from lloom.errors import ErrorCode as ErrorCode  # noqa: PLC0414 - re-exported: wire codes live in the error tree
from lloom.errors import ProtocolError
from lloom.protocol.safejson import safe_loads

PROTOCOL_ID = "/lloom/llm/1.0.0"


class RequestKind(StrEnum):
    """Which OpenAI endpoint a request is for."""

    CHAT = "chat"
    COMPLETION = "completion"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one request."""

    prompt_tokens: int
    completion_tokens: int

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProtocolError(f"usage.{name} must be a non-negative integer")

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, int]:
        """OpenAI's usage object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }

    @classmethod
    def from_json(cls, obj: object) -> Usage:
        """Parse OpenAI's usage object (``total_tokens`` must agree if present)."""
        if not isinstance(obj, Mapping):
            raise ProtocolError("usage must be an object")
        usage = cls(obj.get("prompt_tokens"), obj.get("completion_tokens"))  # type: ignore[arg-type]
        total = obj.get("total_tokens")
        if total is not None and total != usage.total_tokens:
            raise ProtocolError("usage.total_tokens is not prompt + completion")
        return usage


#: A request id a client may attach (a gateway's ``x-request-id``): 1-64 of these.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class Request:
    """A client's request; ``body`` is the OpenAI request body.

    ``request_id`` is the client's own id for the request (a gateway's ``x-request-id``);
    the executor keeps it in the usage row, so one request can be followed end to end.
    ``resume`` is set when the request continues an answer another executor broke off:
    the text already delivered, which this executor's answer repeats and does not bill
    (:mod:`lloom.protocol.resume`).
    """

    kind: RequestKind
    body: dict[str, Any]
    request_id: str | None = None
    resume: str | None = None

    def __post_init__(self) -> None:
        if self.request_id is not None and not _REQUEST_ID.fullmatch(self.request_id):
            raise ProtocolError("request id must be 1-64 of A-Z a-z 0-9 . _ -")

    @property
    def model(self) -> str:
        """The requested network model id."""
        return str(self.body["model"])

    @property
    def stream(self) -> bool:
        """Whether the client asked for a streamed answer."""
        return bool(self.body.get("stream", False))


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed OpenAI chunk."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Response:
    """A complete (non-streamed) OpenAI response object."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SignedTotals:
    """Running totals of a channel that the client signed before, with its signature: what
    a client that lost its own record needs to check that the executor's base is its own."""

    prompt_total: int
    completion_total: int
    deadline: int
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        """The ``previous`` object of a receipt request."""
        return {
            "prompt_total": self.prompt_total,
            "completion_total": self.completion_total,
            "deadline": self.deadline,
            "signature": "0x" + self.signature.hex(),
        }

    @classmethod
    def from_json(cls, obj: object) -> SignedTotals:
        """Parse a ``previous`` object."""
        if not isinstance(obj, Mapping):
            raise ProtocolError("receipt.previous must be an object")
        ints = [_uint(obj, k) for k in ("prompt_total", "completion_total", "deadline")]
        return cls(ints[0], ints[1], ints[2], _signature(obj))


@dataclass(frozen=True, slots=True)
class ReceiptRequest:
    """What an executor asks the client to sign after a request (verified accounting).

    The running totals asked are ``previous`` (the last totals the client signed on this
    channel, or zero) plus this request's usage: usage the client did not sign never
    enters them.
    """

    executor: str
    chain_id: int
    contract: str
    prompt_total: int
    completion_total: int
    deadline: int
    previous: SignedTotals | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object inside an ``end`` message."""
        obj: dict[str, Any] = {
            "executor": self.executor,
            "chain_id": self.chain_id,
            "contract": self.contract,
            "prompt_total": self.prompt_total,
            "completion_total": self.completion_total,
            "deadline": self.deadline,
        }
        if self.previous is not None:
            obj["previous"] = self.previous.to_json()
        return obj

    @classmethod
    def from_json(cls, obj: object) -> ReceiptRequest:
        """Parse the ``receipt`` object of an ``end`` message."""
        if not isinstance(obj, Mapping):
            raise ProtocolError("receipt request must be an object")
        previous = obj.get("previous")
        return cls(
            _string(obj, "executor"),
            _uint(obj, "chain_id"),
            _string(obj, "contract"),
            _uint(obj, "prompt_total"),
            _uint(obj, "completion_total"),
            _uint(obj, "deadline"),
            None if previous is None else SignedTotals.from_json(previous),
        )

    @property
    def base(self) -> tuple[int, int]:
        """The (prompt, completion) totals this request's usage is added to."""
        if self.previous is None:
            return 0, 0
        return self.previous.prompt_total, self.previous.completion_total


@dataclass(frozen=True, slots=True)
class End:
    """Successful end of a request.

    ``usage`` is the canonical billing count (:mod:`lloom.protocol.billing`) the executor
    stored; ``backend_usage`` what its backend reported, if it did (for information).
    """

    request_id: str
    model: str
    usage: Usage
    backend_usage: Usage | None = None
    receipt: ReceiptRequest | None = None


@dataclass(frozen=True, slots=True)
class SignedReceipt:
    """The client's answer to a receipt request: its EIP-712 signature (65 bytes)."""

    request_id: str
    signature: bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    """The client's refusal to sign, and why."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Error:
    """Terminal failure of a request."""

    code: ErrorCode
    message: str
    status: int = field(default=0)

    def __post_init__(self) -> None:
        if not self.status:
            object.__setattr__(self, "status", self.code.http_status)


Message = Request | Chunk | Response | End | Error | SignedReceipt | Refusal
Terminal = End | Error


def encode(msg: Message) -> bytes:
    """Serialize a message to the bytes of one frame."""
    obj: dict[str, Any]
    match msg:
        case Request(kind=kind, body=body, request_id=request_id, resume=resume):
            obj = {"t": "request", "kind": kind.value, "body": body}
            if request_id is not None:
                obj["id"] = request_id
            if resume is not None:
                obj["resume"] = {"delivered": resume}
        case Chunk(data=data):
            obj = {"t": "chunk", "data": data}
        case Response(data=data):
            obj = {"t": "response", "data": data}
        case End():
            obj = {
                "t": "end",
                "request_id": msg.request_id,
                "model": msg.model,
                "usage": msg.usage.to_json(),
            }
            if msg.backend_usage is not None:
                obj["backend_usage"] = msg.backend_usage.to_json()
            if msg.receipt is not None:
                obj["receipt"] = msg.receipt.to_json()
        case SignedReceipt():
            obj = {
                "t": "receipt",
                "request_id": msg.request_id,
                "signature": "0x" + msg.signature.hex(),
            }
        case Refusal():
            obj = {"t": "refusal", "request_id": msg.request_id, "reason": msg.reason}
        case Error():
            obj = {
                "t": "error",
                "code": msg.code.value,
                "message": msg.message,
                "status": msg.status,
            }
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _request(obj: dict[str, Any]) -> Message:
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    resume = obj.get("resume")
    if resume is not None:
        resume = _string(_object(obj, "resume"), "delivered")
    return Request(RequestKind(obj["kind"]), _object(obj, "body"), request_id, resume)


def _end(obj: dict[str, Any]) -> Message:
    receipt = obj.get("receipt")
    backend = obj.get("backend_usage")
    return End(
        _string(obj, "request_id"),
        _string(obj, "model"),
        Usage.from_json(obj.get("usage")),
        None if backend is None else Usage.from_json(backend),
        None if receipt is None else ReceiptRequest.from_json(receipt),
    )


def _error(obj: dict[str, Any]) -> Message:
    status = obj.get("status", 0)
    if not isinstance(status, int):
        raise ProtocolError("error.status must be an integer")
    return Error(ErrorCode(obj["code"]), _string(obj, "message"), status)


def _receipt(obj: dict[str, Any]) -> Message:
    return SignedReceipt(_string(obj, "request_id"), _signature(obj))


def _signature(obj: Mapping[str, Any]) -> bytes:
    sig = _string(obj, "signature")
    if not sig.startswith("0x") or len(sig) != 132:
        raise ProtocolError("signature must be 65 bytes of 0x-hex")
    try:
        return bytes.fromhex(sig[2:])
    except ValueError:
        raise ProtocolError("signature must be 65 bytes of 0x-hex") from None


def _uint(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**256:
        raise ProtocolError(f"receipt.{key} must be a non-negative integer below 2**256")
    return value


_PARSERS: dict[str, Callable[[dict[str, Any]], Message]] = {
    "request": _request,
    "chunk": lambda obj: Chunk(_object(obj, "data")),
    "response": lambda obj: Response(_object(obj, "data")),
    "end": _end,
    "error": _error,
    "receipt": _receipt,
    "refusal": lambda obj: Refusal(_string(obj, "request_id"), _string(obj, "reason")),
}


def decode(frame: bytes) -> Message:
    """Parse one frame; raises :class:`ProtocolError` for anything malformed."""
    obj = safe_loads(frame, "frame")
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    kind = obj.get("t")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    try:
        return parser(obj)
    except (KeyError, ValueError) as exc:
        raise ProtocolError(f"malformed {kind} message: {exc}") from None


def _object(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"{key} must be an object")
    return value


def _string(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string")
    return value
