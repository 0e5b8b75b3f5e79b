"""Mid-stream resume: continue a streamed answer on another executor, as pure code.

When an executor fails after part of a streamed answer reached the user, the client may run
the same request on another executor and continue the answer there, if the result can be
reproduced: decoding is deterministic (``temperature`` 0, or a ``seed``), there is one
choice, and what was delivered is plain text (no tool calls, reasoning or log
probabilities, which a replay could not check). The new executor's answer is then checked
against the delivered text, chunk by chunk (:class:`Replay`): the part already delivered is
swallowed, the rest is passed on as if the first executor had sent it (its ``id`` and
``created``), and any difference ends the attempt. So the user sees one uninterrupted
stream, or the error it would have seen without resume.

The resumed request tells the executor the delivered text (``resume`` in the request
message), so that it bills only what it adds
(:func:`lloom.protocol.billing.resumed_completion_tokens`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from lloom.errors import LloomError
from lloom.protocol import llm

#: Keys a streamed choice's delta may carry for the answer to stay resumable.
_PLAIN_DELTA = frozenset({"role", "content", "refusal"})
#: Keys of a chunk that name the answer and are carried over to resumed chunks.
_IDENTITY = ("id", "created", "system_fingerprint")


class ResumeMismatch(LloomError):
    """The re-run answer differs from the delivered text."""


def not_resumable(request: llm.Request) -> str | None:
    """Why ``request`` cannot be resumed on another executor, or None if it can."""
    body = request.body
    if not request.stream:
        return "the answer was not streamed"
    if body.get("n", 1) != 1:
        return "it asked for several choices"
    if body.get("temperature") != 0 and body.get("seed") is None:
        return "its sampling is not reproducible (set temperature 0 or a seed to allow resume)"
    if body.get("logprobs"):
        return "it asked for log probabilities"
    return None


def chunk_text(chunk: dict[str, Any]) -> str | None:
    """The plain text one streamed chunk adds, or None if it carries something a replay
    cannot check (several choices, tool calls, reasoning, log probabilities)."""
    choices = chunk.get("choices")
    if not choices:
        return ""
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if choice.get("index", 0) != 0 or choice.get("logprobs") is not None:
        return None
    delta = choice.get("delta")
    if isinstance(delta, dict):
        if set(delta) - _PLAIN_DELTA or delta.get("refusal"):
            return None
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _finished(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices") or []
    return any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


@dataclass
class Delivered:
    """What the user has received of one streamed answer, across executors."""

    text: str = ""
    chunks: int = 0
    #: Whether everything delivered was plain text (see :func:`chunk_text`).
    plain: bool = True
    #: Whether a chunk with a ``finish_reason`` was delivered.
    finished: bool = False
    #: The first chunk's ``id``, ``created`` and ``system_fingerprint``.
    identity: dict[str, Any] = field(default_factory=dict)

    def add(self, chunk: dict[str, Any]) -> None:
        """Note one chunk passed on to the user."""
        if not self.chunks:
            self.identity = {k: chunk[k] for k in _IDENTITY if k in chunk}
        self.chunks += 1
        text = chunk_text(chunk)
        if text is None:
            self.plain = False
        else:
            self.text += text
        self.finished = self.finished or _finished(chunk)

    def why_not_resumable(self, request: llm.Request) -> str | None:
        """Why the answer cannot be continued elsewhere, or None."""
        if (reason := not_resumable(request)) is not None:
            return reason
        if not self.plain:
            return "the delivered part is not plain text"
        if self.finished:
            return "the answer had already finished"
        return None


class Replay:
    """Checks a re-run answer against the ``delivered`` text and yields what is new.

    :meth:`feed` takes each chunk of the re-run in order and returns the chunk to pass on
    (the first one trimmed to the new text, all of them carrying the first executor's
    ``id``), or None while the re-run is still repeating what was delivered. It raises
    :class:`ResumeMismatch` as soon as the re-run differs.
    """

    def __init__(self, delivered: Delivered) -> None:
        self.prefix = delivered.text
        self.identity = dict(delivered.identity)
        self.matched = 0
        self.caught_up = False

    def feed(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk to pass on for ``chunk``, or None (see the class docstring)."""
        if self.caught_up:
            return self._as_first(chunk)
        text = chunk_text(chunk)
        if text is None:
            raise ResumeMismatch("the re-run answer is not plain text")
        need = self.prefix[self.matched :]
        if len(text) <= len(need):
            if not need.startswith(text):
                raise ResumeMismatch(self._where())
            self.matched += len(text)
            if _finished(chunk):
                if self.matched < len(self.prefix):
                    raise ResumeMismatch("the re-run answer ended before the delivered text")
                return self._catch_up(chunk, "")
            return None  # still repeating the delivered text
        if not text.startswith(need):
            raise ResumeMismatch(self._where())
        self.matched = len(self.prefix)
        return self._catch_up(chunk, text[len(need) :])

    def _catch_up(self, chunk: dict[str, Any], rest: str) -> dict[str, Any]:
        self.caught_up = True
        out = copy.deepcopy(chunk)
        choice = out["choices"][0]
        if isinstance(choice.get("delta"), dict):
            choice["delta"] = {"content": rest}
        else:
            choice["text"] = rest
        return self._as_first(out)

    def _as_first(self, chunk: dict[str, Any]) -> dict[str, Any]:
        if not self.identity:
            return chunk
        return {**chunk, **self.identity}

    def _where(self) -> str:
        return f"the re-run answer differs from the delivered text after {self.matched} characters"
