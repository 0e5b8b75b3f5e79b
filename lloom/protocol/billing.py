"""The canonical billing count: the token counts a client signs for, computed the same way,
exactly, by the executor and by the client from what both of them saw.

A backend's own usage report cannot be checked by the client (another tokenizer, a chat
template it never sees), so lloom bills a count that both sides compute from the request
the client sent and the text it received, with one named tokenizer shipped offline:

- **Tokenizer** :data:`BILLING_ENCODING` (``cl100k_base``; tiktoken's rank file, sha256
  ``223921b7…b2a7``). ``count(s)`` is the number of tokens of ``s`` with special-token text
  counted as ordinary text.
- **Chat prompt**: 3, plus for each message 3 + ``count(role)`` + ``count(text)`` (a string
  content, or its ``text`` parts joined) + 1 + ``count(name)`` when named + ``count(name) +
  count(arguments)`` of each tool call + ``count(tool_call_id)`` + 85 per image or audio part;
  plus ``count(canonical_json(x))`` for ``tools``, an object ``tool_choice`` and
  ``response_format`` when present.
- **Legacy completion prompt**: ``count`` of the prompt, or the sum over a list of prompts.
- **Completion**: ``count`` of the delivered text: for every chunk (or the one response) in
  order, for every choice, its ``reasoning_content`` and ``content`` (strings only), each
  tool call's function ``name`` and ``arguments``, and a legacy choice's ``text``; never
  more than the ``max_completion_tokens`` or ``max_tokens`` the client sent.
- **Resumed completion** (a request carrying ``resume``, :mod:`lloom.protocol.resume`): the
  completion count minus ``count`` of the text delivered before, never below 0.

Counts are of the request body as the client sent it, after the one rewrite both sides
make: a chat body with a string ``prompt`` and no ``messages`` is one user message.

``canonical_json(x)`` is ``json.dumps(x, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``. Test vectors are in docs/protocol.md and tests/unit/test_billing.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from lloom.protocol.llm import RequestKind
from lloom.tokens import count_text

#: The tokenizer of billing counts.
BILLING_ENCODING = "cl100k_base"
#: Tokens billed for one image or audio part (its bytes are not text).
MEDIA_PART_TOKENS = 85


def count(text: str) -> int:
    """Billing tokens of ``text``."""
    return count_text(text, BILLING_ENCODING) if text else 0


def canonical_json(value: object) -> str:
    """The one JSON spelling of ``value`` that is counted."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _strings(*values: object) -> str:
    return "".join(v for v in values if isinstance(v, str))


def _content(content: object) -> tuple[str, int]:
    """(text, media parts) of a message's content."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    text, media = [], 0
    for part in content:
        if not isinstance(part, Mapping):
            continue
        if part.get("type") == "text":
            text.append(_strings(part.get("text")))
        elif part.get("type") in ("image_url", "input_audio"):
            media += 1
    return "".join(text), media


def _tool_calls(calls: object) -> Iterable[str]:
    if not isinstance(calls, list):
        return
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            yield _strings(function.get("name"), function.get("arguments"))


def chat_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The billing count of a chat request's prompt."""
    total = 3
    for message in body.get("messages") or []:
        if not isinstance(message, Mapping):
            continue
        text, media = _content(message.get("content"))
        total += 3 + count(_strings(message.get("role"))) + count(text)
        total += MEDIA_PART_TOKENS * media
        if isinstance(message.get("name"), str) and message["name"]:
            total += 1 + count(message["name"])
        total += sum(count(t) for t in _tool_calls(message.get("tool_calls")))
        total += count(_strings(message.get("tool_call_id")))
    for key in ("tools", "response_format"):
        if body.get(key) is not None:
            total += count(canonical_json(body[key]))
    if isinstance(body.get("tool_choice"), Mapping):
        total += count(canonical_json(body["tool_choice"]))
    return total


def prompt_tokens(kind: RequestKind, body: Mapping[str, Any]) -> int:
    """The billing count of a request's prompt."""
    if kind is RequestKind.CHAT:
        return chat_prompt_tokens(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return sum(count(p) for p in prompt if isinstance(p, str))
    return count(_strings(prompt))


def delivered_text(data: Mapping[str, Any]) -> str:
    """The generated text a stream chunk or a complete response delivers."""
    parts: list[str] = []
    for choice in data.get("choices") or []:
        if not isinstance(choice, Mapping):
            continue
        holder = choice.get("delta") or choice.get("message") or {}
        if isinstance(holder, Mapping):
            parts.append(_strings(holder.get("reasoning_content"), holder.get("content")))
            parts.extend(_tool_calls(holder.get("tool_calls")))
        parts.append(_strings(choice.get("text")))
    return "".join(parts)


def completion_tokens(text: str, max_tokens: int | None) -> int:
    """The billing count of a completion: ``count(text)``, never above the request's own
    ``max_tokens`` (the backend's tokenizer is not the billing one, so its last token may
    count as more)."""
    counted = count(text)
    return counted if max_tokens is None else min(counted, max_tokens)


def resumed_completion_tokens(text: str, delivered: str, max_tokens: int | None) -> int:
    """The billing count of a resumed answer (:mod:`lloom.protocol.resume`): what ``text``
    adds to the ``delivered`` text another executor already billed. When ``text`` repeats
    ``delivered`` and goes on, ``completion_tokens(text) - count(delivered)``, so the two
    executors' counts add up to the count of the whole answer; while ``text`` is still
    repeating it, 0; when ``text`` differs, all of it."""
    if text.startswith(delivered):
        return max(0, completion_tokens(text, max_tokens) - count(delivered))
    if delivered.startswith(text):
        return 0
    return completion_tokens(text, max_tokens)
