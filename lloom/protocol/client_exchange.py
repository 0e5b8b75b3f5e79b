"""The client's side of the request exchange, as a pure state machine (no I/O).

Like h11 for HTTP: the caller hands it frames that arrived and gets events back, asks it
for the frames to send, and does the reading and writing itself. One
:class:`ClientExchange` follows one stream, request after request::

    IDLE --send()--> WAITING --chunk/response--> WAITING
    WAITING --end--> IDLE, or RECEIPT when the end asks for a receipt
    RECEIPT --answer_receipt()--> IDLE
    WAITING --error frame--> IDLE           (the stream stays usable)
    any --malformed or out-of-order frame--> CLOSED (reset the stream)
    IDLE/WAITING --closed()--> CLOSED

An executor that closes a reused idle stream before answering (its keep-alive ran out) is
told apart from one that vanished mid-answer (:meth:`ClientExchange.closed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from lloom.errors import InternalError, NetworkError, ProtocolError
from lloom.protocol import billing, llm


class ClientState(Enum):
    """Where a client's stream is in the exchange."""

    IDLE = "idle"
    WAITING = "waiting"
    RECEIPT = "receipt"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ChunkArrived:
    """A streamed chunk, and the text it delivers."""

    data: dict[str, Any]
    text: str


@dataclass(frozen=True, slots=True)
class ResponseArrived:
    """The whole (non-streamed) response."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ended:
    """The request ended; when ``end.receipt`` is set, a receipt answer must be sent."""

    end: llm.End


@dataclass(frozen=True, slots=True)
class Failed:
    """The executor ended the request with an error frame."""

    error: llm.Error


Event = ChunkArrived | ResponseArrived | Ended | Failed


class UnansweredClose(NetworkError):
    """The executor closed the stream before answering anything: on a reused stream this
    is its keep-alive running out, and a fresh stream may be opened."""


class ClientExchange:
    """The client's state of one request stream (see the module docstring)."""

    def __init__(self) -> None:
        self.state = ClientState.IDLE
        self.request: llm.Request | None = None
        #: Chunks received for the current request.
        self.chunks = 0
        self.response: dict[str, Any] | None = None
        self._text: list[str] = []
        self.end: llm.End | None = None

    @property
    def text(self) -> str:
        """The text the current request's answer delivered so far."""
        return "".join(self._text)

    @property
    def answered(self) -> bool:
        """Whether anything of the current request's answer arrived."""
        return self.chunks > 0 or self.response is not None

    def send(self, request: llm.Request) -> bytes:
        """The frame of ``request``; the stream must be idle."""
        self._expect(ClientState.IDLE, "send a request")
        self.state = ClientState.WAITING
        self.request = request
        self.chunks, self.response, self._text, self.end = 0, None, [], None
        return llm.encode(request)

    def receive(self, frame: bytes) -> Event:
        """The event of one frame from the executor; raises :class:`ProtocolError` (and
        the stream is CLOSED) for anything malformed or out of order."""
        self._expect(ClientState.WAITING, "receive a frame")
        try:
            msg = llm.decode(frame)
        except ProtocolError:
            self.state = ClientState.CLOSED
            raise
        match msg:
            case llm.Chunk(data=data) if self.response is None:
                self.chunks += 1
                text = billing.delivered_text(data)
                self._text.append(text)
                return ChunkArrived(data, text)
            case llm.Response(data=data) if self.response is None and not self.chunks:
                self.response = data
                self._text.append(billing.delivered_text(data))
                return ResponseArrived(data)
            case llm.End():
                self.end = msg
                self.state = ClientState.RECEIPT if msg.receipt is not None else ClientState.IDLE
                return Ended(msg)
            case llm.Error():
                self.state = ClientState.IDLE
                return Failed(msg)
        self.state = ClientState.CLOSED
        raise ProtocolError(f"unexpected {type(msg).__name__} from executor")

    def answer_receipt(self, answer: llm.SignedReceipt | llm.Refusal) -> bytes:
        """The frame answering the receipt the last ``end`` asked for."""
        self._expect(ClientState.RECEIPT, "answer a receipt")
        self.state = ClientState.IDLE
        return llm.encode(answer)

    def closed(self) -> None:
        """The executor closed the stream. Raises :class:`UnansweredClose` if a request
        was waiting for its first frame, :class:`NetworkError` if it was cut mid-answer."""
        state, self.state = self.state, ClientState.CLOSED
        if state is ClientState.WAITING:
            if not self.answered:
                raise UnansweredClose("executor closed the stream without answering")
            raise NetworkError("executor closed the stream without ending the request")

    @property
    def reusable(self) -> bool:
        """Whether another request may be sent on this stream."""
        return self.state is ClientState.IDLE

    def _expect(self, state: ClientState, action: str) -> None:
        if self.state is not state:
            raise InternalError(f"cannot {action} on a stream in state {self.state.value}")
