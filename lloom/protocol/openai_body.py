"""Validating OpenAI request bodies before they go to a backend (pure code).

A request body comes from a stranger and goes to an operator's backend, so only a
documented allow-list of OpenAI fields passes (:data:`CHAT_FIELDS`, :data:`COMPLETION_FIELDS`),
each checked for type and range. Anything else — ``best_of``, ``ignore_eos``, ``min_tokens``,
``id_slot``, ``store``, ``service_tier``, grammars — is refused, as OpenAI refuses an
unrecognised argument. ``n`` must be the integer 1. Image and audio parts must carry their
data inline (``data:`` URLs) unless the policy allows remote media (a backend that fetches
URLs would otherwise fetch whatever address a stranger names). The executor's
:class:`Policy` then clamps ``max_tokens`` to its limit.

Every problem is an :class:`~lloom.errors.InvalidRequest` naming the field, which the
executor turns into a ``bad_request`` error frame and the gateway into an HTTP 400.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lloom.dhtkeys import validate_model_id
from lloom.errors import InvalidRequest, UsageError
from lloom.protocol.llm import RequestKind

#: Most stop sequences, tools, logit_bias entries accepted.
MAX_STOP = 4
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300


@dataclass(frozen=True, slots=True)
class Policy:
    """What an executor lets through to its backend.

    ``max_tokens`` is the most completion tokens one request may ask for (a larger or a
    missing ``max_tokens`` is set to it); ``allow_remote_media`` lets ``http(s)`` image and
    audio URLs through (only for backends that do not fetch them, or fetch them safely).
    """

    max_tokens: int | None = None
    allow_remote_media: bool = False


#: The gateway and the CLI check shape only: the executor applies its own policy.
OPEN = Policy(max_tokens=None, allow_remote_media=True)


def _fail(message: str) -> InvalidRequest:
    return InvalidRequest(message)


def _number(low: float, high: float, integer: bool = False) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        kinds = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise _fail(f"'{key}' must be {'an integer' if integer else 'a number'}")
        # A huge int would overflow math.isfinite; compare it as it is.
        if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
            raise _fail(f"'{key}' must be between {low:g} and {high:g}")

    return check


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(f"'{key}' must be a positive integer")


def _boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(f"'{key}' must be a boolean")


def _string(limit: int) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if not isinstance(value, str) or len(value) > limit:
            raise _fail(f"'{key}' must be a string of at most {limit} characters")

    return check


def _stop(key: str, value: Any) -> None:
    if isinstance(value, str):
        return
    if not (
        isinstance(value, list)
        and len(value) <= MAX_STOP
        and all(isinstance(s, str) for s in value)
    ):
        raise _fail(f"'{key}' must be a string or a list of at most {MAX_STOP} strings")


def _n(key: str, value: Any) -> None:
    if type(value) is not int or value != 1:
        raise _fail(f"'{key}' other than the integer 1 is not supported")


def _stream_options(key: str, value: Any) -> None:
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise _fail(f"'{key}' may only hold 'include_usage'")
    if "include_usage" in value:
        _boolean(f"{key}.include_usage", value["include_usage"])


def _logit_bias(key: str, value: Any) -> None:
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _fail(f"'{key}' must be an object of at most {MAX_LOGIT_BIAS} entries")
    check = _number(-100, 100)
    for token, bias in value.items():
        if not token.isdigit():
            raise _fail(f"'{key}' keys must be token ids")
        check(f"{key}.{token}", bias)


def _tools(key: str, value: Any) -> None:
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise _fail(f"'{key}' must be a list of at most {MAX_TOOLS} tools")
    for i, tool in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _fail(f"'{where}' must be an object with type 'function'")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _fail(f"'{where}.function' must be an object with a string 'name'")
        if "description" in function and not isinstance(function["description"], str):
            raise _fail(f"'{where}.function.description' must be a string")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise _fail(f"'{where}.function.parameters' must be an object")


def _tool_choice(key: str, value: Any) -> None:
    if value in ("none", "auto", "required"):
        return
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
        and isinstance(value["function"].get("name"), str)
    ):
        return
    raise _fail(f"'{key}' must be 'none', 'auto', 'required' or a function choice")


def _response_format(key: str, value: Any) -> None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _fail(f"'{key}' must be an object with type 'text', 'json_object' or 'json_schema'")
    if kind == "json_schema" and not isinstance(value.get("json_schema"), dict):
        raise _fail(f"'{key}.json_schema' must be an object")


_COMMON: dict[str, Callable[[str, Any], None]] = {
    "model": _string(200),
    "max_tokens": _positive_int,
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "top_k": _number(0, 1000, integer=True),
    "min_p": _number(0, 1),
    "repeat_penalty": _number(0, 2),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "seed": _number(-(2**63), 2**64 - 1, integer=True),
    "stop": _stop,
    "stream": _boolean,
    "stream_options": _stream_options,
    "n": _n,
    "logit_bias": _logit_bias,
    "user": _string(256),
}

#: Fields of ``/v1/chat/completions`` that reach a backend.
CHAT_FIELDS: dict[str, Callable[[str, Any], None]] = {
    **_COMMON,
    "messages": lambda key, value: None,  # checked by _messages
    "max_completion_tokens": _positive_int,
    "logprobs": _boolean,
    "top_logprobs": _number(0, 20, integer=True),
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _boolean,
    "response_format": _response_format,
}

#: Fields of ``/v1/completions`` that reach a backend.
COMPLETION_FIELDS: dict[str, Callable[[str, Any], None]] = {
    **_COMMON,
    "prompt": lambda key, value: None,  # checked in normalize_completion_body
    "logprobs": _number(0, 5, integer=True),
    "echo": _boolean,
    "suffix": _string(100_000),
}


def _check_fields(
    body: Mapping[str, Any], fields: Mapping[str, Callable[[str, Any], None]]
) -> None:
    for key, value in body.items():
        check = fields.get(key)
        if check is None:
            raise _fail(
                f"'{key}' is not supported (see docs/protocol.md for the fields lloom forwards)"
            )
        if value is not None:
            check(key, value)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail("'model' is required and must be a string")
    try:
        validate_model_id(model)
    except UsageError as exc:
        raise _fail(f"'model': {exc}") from None


def _media_url(where: str, url: Any, policy: Policy) -> None:
    if not isinstance(url, str):
        raise _fail(f"'{where}' must be a string")
    if url.startswith("data:"):
        return
    if not policy.allow_remote_media:
        raise _fail(f"'{where}' must be a data: URL (this executor does not fetch remote media)")
    if not url.startswith(("http://", "https://")):
        raise _fail(f"'{where}' must be a data: or http(s):// URL")


def _part(where: str, part: Any, policy: Policy) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _fail(f"'{where}' must be an object with a string 'type'")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _fail(f"'{where}.text' must be a string")
    elif kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict):
            raise _fail(f"'{where}.image_url' must be an object")
        _media_url(f"{where}.image_url.url", image.get("url"), policy)
    elif kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise _fail(f"'{where}.input_audio.data' must be a base64 string")
    else:
        raise _fail(f"'{where}.type' {kind[:40]!r} is not supported")


def _messages(messages: Any, policy: Policy) -> None:
    if not isinstance(messages, list) or not messages:
        raise _fail("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _fail(f"'{where}' must be an object")
        if not isinstance(message.get("role"), str):
            raise _fail(f"'{where}.role' must be a string")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                _part(f"{where}.content[{j}]", part, policy)
        elif content is not None and not isinstance(content, str):
            raise _fail(f"'{where}.content' must be a string or a list of parts")


def _apply(body: dict[str, Any], policy: Policy) -> dict[str, Any]:
    """Clamp the completion limit to the policy's ``max_tokens`` (set it when missing)."""
    limit = policy.max_tokens
    if limit is None:
        return body
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(key) is None or body[key] > limit:
        body[key] = limit
    return body


def completion_limit(body: Mapping[str, Any]) -> int | None:
    """The most completion tokens ``body`` asks for, if it says."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def normalize_chat_body(body: object, policy: Policy = OPEN) -> dict[str, Any]:
    """Validate a chat-completions body and return it (a copy) as it may be forwarded.

    The design's simple ``{"model", "prompt"}`` form becomes one user message.
    Raises :class:`InvalidRequest` naming the bad field.
    """
    if not isinstance(body, dict):
        raise _fail("request body must be a JSON object")
    out = dict(body)
    if "messages" not in out and isinstance(out.get("prompt"), str):
        out["messages"] = [{"role": "user", "content": out.pop("prompt")}]
    _check_fields(out, CHAT_FIELDS)
    _messages(out.get("messages"), policy)
    return _apply(out, policy)


def normalize_completion_body(body: object, policy: Policy = OPEN) -> dict[str, Any]:
    """Validate a legacy completions body (``prompt`` a string or list of strings)."""
    if not isinstance(body, dict):
        raise _fail("request body must be a JSON object")
    out = dict(body)
    _check_fields(out, COMPLETION_FIELDS)
    prompt = out.get("prompt")
    if not (
        isinstance(prompt, str)
        or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
    ):
        raise _fail("'prompt' must be a string or a non-empty list of strings")
    return _apply(out, policy)


def normalize(kind: RequestKind, body: object, policy: Policy = OPEN) -> dict[str, Any]:
    """Validate ``body`` for ``kind`` under ``policy``."""
    if kind is RequestKind.CHAT:
        return normalize_chat_body(body, policy)
    return normalize_completion_body(body, policy)
