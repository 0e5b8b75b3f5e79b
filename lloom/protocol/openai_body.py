"""Validating OpenAI request bodies before they go to a backend (pure code).

Chat-completions and legacy completions bodies are checked field by field; every problem is
a :class:`UsageError` naming the field, which the executor turns into a ``bad_request``
error frame and the gateway into an HTTP 400. Fields lloom does not know are passed through.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lloom.dhtkeys import validate_model_id
from lloom.errors import UsageError
from lloom.protocol.llm import RequestKind


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"'{key}' must be a number")
    if not low <= value <= high:
        raise UsageError(f"'{key}' must be between {low:g} and {high:g}")


def _validate_common(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise UsageError("'model' is required and must be a string")
    try:
        validate_model_id(model)
    except UsageError as exc:
        raise UsageError(f"'model': {exc}") from None
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise UsageError("'max_tokens' must be a positive integer")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))
    ):
        raise UsageError("'stop' must be a string or a list of at most 4 strings")
    if not isinstance(body.get("stream", False), bool):
        raise UsageError("'stream' must be a boolean")
    n = body.get("n", 1)
    if n != 1:
        raise UsageError("'n' other than 1 is not supported")


def normalize_chat_body(body: object) -> dict[str, Any]:
    """Validate a chat-completions body and return it (a copy) in OpenAI form.

    The design's simple ``{"model", "prompt"}`` form becomes one user message. Unknown
    fields are passed through. Raises :class:`UsageError` naming the bad field.
    """
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    out = dict(body)
    if "messages" not in out and isinstance(out.get("prompt"), str):
        out["messages"] = [{"role": "user", "content": out.pop("prompt")}]
    _validate_common(out)
    messages = out.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UsageError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UsageError(f"'messages[{i}]' must be an object")
        if not isinstance(message.get("role"), str):
            raise UsageError(f"'messages[{i}].role' must be a string")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise UsageError(f"'messages[{i}].content' must be a string or a list of parts")
    return out


def normalize_completion_body(body: object) -> dict[str, Any]:
    """Validate a legacy completions body (``prompt`` a string or list of strings)."""
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    out = dict(body)
    _validate_common(out)
    prompt = out.get("prompt")
    if not (
        isinstance(prompt, str)
        or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
    ):
        raise UsageError("'prompt' must be a string or a list of strings")
    return out


def normalize(kind: RequestKind, body: object) -> dict[str, Any]:
    """Validate ``body`` for ``kind``."""
    if kind is RequestKind.CHAT:
        return normalize_chat_body(body)
    return normalize_completion_body(body)
