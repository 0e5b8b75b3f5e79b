"""The executor's side of the request exchange, as a pure state machine (no I/O).

The executor's adapter (:mod:`lloom.executor.handler`) reads frames, hands them to an
:class:`ExecutorExchange`, acts on the events, and writes the frames it returns::

    IDLE --request frame--> SERVING          (RequestArrived)
    SERVING --send_chunk/send_response--> SERVING
    SERVING --send_end--> IDLE, or RECEIPT when the end asks for a receipt
    SERVING/IDLE --send_error--> IDLE        (a refusal such as ``busy`` keeps the stream)
    RECEIPT --receipt or refusal--> IDLE     (ReceiptArrived)
    RECEIPT --a next request instead--> SERVING (ReceiptArrived(None), RequestArrived)
    RECEIPT --anything else, or receipt_timed_out()--> IDLE (ReceiptArrived(None))

Requests are validated here: an invalid one raises a :class:`PeerInputError` and leaves the
stream IDLE for the caller to send the error frame. The exchange also keeps what the
current answer delivered, and counts its billing usage, resumes included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lloom.errors import InternalError, ProtocolError
from lloom.protocol import billing, llm, openai_body
from lloom.protocol.openai_body import Policy


class ExecutorState(Enum):
    """Where an executor's stream is in the exchange."""

    IDLE = "idle"
    SERVING = "serving"
    RECEIPT = "receipt"


@dataclass(frozen=True, slots=True)
class RequestArrived:
    """A valid request, normalized for the backend; ``client_limit`` is the completion
    limit the client itself asked for (the billing cap)."""

    request: llm.Request
    client_limit: int | None


@dataclass(frozen=True, slots=True)
class ReceiptArrived:
    """The client's answer to the last receipt request: None when it sent none."""

    answer: llm.SignedReceipt | llm.Refusal | None


Event = RequestArrived | ReceiptArrived


class ExecutorExchange:
    """The executor's state of one request stream (see the module docstring).

    ``policy`` says, per model id, what may reach that model's backend.
    """

    def __init__(self, policy: Callable[[str | None], Policy]) -> None:
        self.policy = policy
        self.state = ExecutorState.IDLE
        self.current: RequestArrived | None = None
        self._text: list[str] = []
        self.chunks = 0

    @property
    def text(self) -> str:
        """The text the current answer delivered so far."""
        return "".join(self._text)

    def receive(self, frame: bytes) -> list[Event]:
        """The events of one frame from the client (see the module docstring)."""
        if self.state is ExecutorState.RECEIPT:
            return self._receipt_answer(frame)
        if self.state is not ExecutorState.IDLE:
            raise InternalError(f"no frame is read while {self.state.value}")
        return [self._request(llm.decode(frame))]

    def _request(self, msg: llm.Message) -> RequestArrived:
        if not isinstance(msg, llm.Request):
            raise ProtocolError(f"expected a request message, not {type(msg).__name__}")
        model = msg.body.get("model")
        body = openai_body.normalize(
            msg.kind, msg.body, self.policy(model if isinstance(model, str) else None)
        )  # validates msg.body too
        request = llm.Request(msg.kind, body, msg.request_id, msg.resume)
        self.current = RequestArrived(request, openai_body.completion_limit(msg.body))
        self.state = ExecutorState.SERVING
        self._text, self.chunks = [], 0
        return self.current

    def _receipt_answer(self, frame: bytes) -> list[Event]:
        self.state = ExecutorState.IDLE
        try:
            msg = llm.decode(frame)
        except ProtocolError:
            return [ReceiptArrived(None)]
        if isinstance(msg, llm.SignedReceipt | llm.Refusal):
            return [ReceiptArrived(msg)]
        if isinstance(msg, llm.Request):  # a client that does not sign receipts
            return [ReceiptArrived(None), self._request(msg)]
        return [ReceiptArrived(None)]

    def receipt_timed_out(self) -> ReceiptArrived:
        """No receipt came in time (or the client closed the stream)."""
        self._expect(ExecutorState.RECEIPT, "give up on a receipt")
        self.state = ExecutorState.IDLE
        return ReceiptArrived(None)

    def send_chunk(self, data: dict[str, Any]) -> bytes:
        """The frame of one streamed chunk."""
        self._expect(ExecutorState.SERVING, "send a chunk")
        self._text.append(billing.delivered_text(data))
        self.chunks += 1
        return llm.encode(llm.Chunk(data))

    def send_response(self, data: dict[str, Any]) -> bytes:
        """The frame of a whole response."""
        self._expect(ExecutorState.SERVING, "send a response")
        self._text.append(billing.delivered_text(data))
        return llm.encode(llm.Response(data))

    def usage(self) -> llm.Usage:
        """The billing count of the current request and what its answer delivered so far
        (a resumed request bills only what it adds to the delivered text)."""
        if self.current is None:
            raise InternalError("no request is being served")
        request, limit = self.current.request, self.current.client_limit
        text = self.text
        if request.resume is None:
            completion = billing.completion_tokens(text, limit)
        else:
            completion = billing.resumed_completion_tokens(text, request.resume, limit)
        return llm.Usage(billing.prompt_tokens(request.kind, request.body), completion)

    def send_end(self, end: llm.End) -> bytes:
        """The frame ending the current request."""
        self._expect(ExecutorState.SERVING, "end a request")
        self.state = ExecutorState.RECEIPT if end.receipt is not None else ExecutorState.IDLE
        return llm.encode(end)

    def send_error(self, error: llm.Error) -> bytes:
        """The error frame ending the current request (or refusing one that never became
        current; :func:`lloom.protocol.error_frames.error_frame` makes it); the stream stays
        usable."""
        self.state = ExecutorState.IDLE
        return llm.encode(error)

    def _expect(self, state: ExecutorState, action: str) -> None:
        if self.state is not state:
            raise InternalError(f"cannot {action} on a stream in state {self.state.value}")
