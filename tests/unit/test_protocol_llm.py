"""The request protocol's messages and request validation (pure)."""

from __future__ import annotations

import re

import pytest

from lloom.errors import InvalidRequest, ProtocolError
from lloom.protocol import llm, openai_body, safejson
from lloom.protocol.llm import ErrorCode, RequestKind


@pytest.mark.parametrize(
    "msg",
    [
        llm.Request(RequestKind.CHAT, {"model": "m", "messages": []}),
        llm.Chunk({"choices": [{"delta": {"content": "é"}}]}),
        llm.Response({"choices": []}),
        llm.End("r1", "m", llm.Usage(3, 4)),
        llm.Error(ErrorCode.BUSY, "full"),
        llm.End(
            "r2",
            "m",
            llm.Usage(1, 2),
            llm.Usage(5, 6),
            llm.ReceiptRequest("0xE", 31337, "0xC", 10, 20, 99),
        ),
        llm.End(
            "r3",
            "m",
            llm.Usage(1, 2),
            None,
            llm.ReceiptRequest(
                "0xE", 31337, "0xC", 10, 20, 99, llm.SignedTotals(9, 18, 77, b"\x02" * 65)
            ),
        ),
        llm.Request(RequestKind.CHAT, {"model": "m"}, "req_0123abcd"),
        llm.SignedReceipt("r2", b"\x01" * 65),
        llm.Refusal("r2", "inflated"),
    ],
)
def test_round_trip(msg: llm.Message) -> None:
    assert llm.decode(llm.encode(msg)) == msg


def test_error_status_defaults_and_overrides() -> None:
    assert llm.Error(ErrorCode.UNKNOWN_MODEL, "x").status == 404
    assert llm.Error(ErrorCode.BACKEND_ERROR, "x", 429).status == 429
    assert ErrorCode.BACKEND_TIMEOUT.http_status == 504
    assert not ErrorCode.TOO_LARGE.retryable


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xff\xfe",
        b"[1]",
        b'{"t": "nope"}',
        b'{"t": "request", "kind": "image", "body": {}}',
        b'{"t": "request", "kind": "chat", "body": []}',
        b'{"t": "end", "request_id": "r", "model": "m", "usage": {"prompt_tokens": -1, '
        b'"completion_tokens": 1}, "usage_source": "backend"}',
        b'{"t": "end", "request_id": "r", "model": "m", "usage": {"prompt_tokens": 1, '
        b'"completion_tokens": 1, "total_tokens": 5}, "usage_source": "backend"}',
        b'{"t": "error", "code": "weird", "message": "x"}',
        b'{"t": "error", "code": "busy", "message": "x", "status": "500"}',
        b"[" * 100000,
        b'{"t": "receipt", "request_id": "r", "signature": "0x12"}',
        b'{"t": "receipt", "request_id": "r", "signature": "0x' + b"zz" * 65 + b'"}',
        b'{"t": "end", "request_id": "r", "model": "m", "usage": {"prompt_tokens": 1, '
        b'"completion_tokens": 1}, "usage_source": "backend", "receipt": {"chain_id": -1}}',
        b'{"t": "request", "kind": "chat", "body": {}, "id": "has space"}',
        b'{"t": "request", "kind": "chat", "body": {}, "id": 7}',
        b'{"t": "end", "request_id": "r", "model": "m", "usage": {"prompt_tokens": 1, '
        b'"completion_tokens": 1}, "receipt": {"executor": "0xE", "chain_id": 1, '
        b'"contract": "0xC", "prompt_total": 1, "completion_total": 1, "deadline": 1, '
        b'"previous": {"prompt_total": 0, "completion_total": 0, "deadline": 0, '
        b'"signature": "0x12"}}}',
    ],
)
def test_decode_rejects(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        llm.decode(frame)


def test_deep_nesting_is_refused_before_parsing() -> None:
    assert safejson.json_depth(b'{"a": [[1]]}') == 3  # few openers: counted, not scanned
    deep = b'{"t": "chunk", "data": ' + b"[" * 70 + b"]" * 70 + b"}"
    assert safejson.json_depth(deep) == 71
    with pytest.raises(ProtocolError, match="nested deeper"):
        llm.decode(deep)
    # Brackets inside strings do not count.
    text = b'{"t": "chunk", "data": {"x": "' + b"[" * 500 + b'"}}'
    assert isinstance(llm.decode(text), llm.Chunk)
    with pytest.raises(ProtocolError):
        llm.decode(b"[" * 1_000_000)


def test_simple_prompt_form_becomes_a_message() -> None:
    body = openai_body.normalize_chat_body({"model": "m", "prompt": "hi", "seed": 3})
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["seed"] == 3 and "prompt" not in body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "JSON object"),
        ({"messages": [{"role": "user", "content": "x"}]}, "'model'"),
        ({"model": "bad id", "messages": [{"role": "user"}]}, "'model'"),
        ({"model": "m"}, "'messages'"),
        ({"model": "m", "messages": []}, "'messages'"),
        ({"model": "m", "messages": ["x"]}, "'messages[0]'"),
        ({"model": "m", "messages": [{"content": "x"}]}, "'messages[0].role'"),
        ({"model": "m", "messages": [{"role": "u", "content": 3}]}, "'messages[0].content'"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "'max_tokens'"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "'max_tokens'"),
        ({"model": "m", "prompt": "x", "temperature": 2.5}, "'temperature'"),
        ({"model": "m", "prompt": "x", "temperature": "hot"}, "'temperature'"),
        ({"model": "m", "prompt": "x", "top_p": -0.1}, "'top_p'"),
        ({"model": "m", "prompt": "x", "stop": ["a"] * 5}, "'stop'"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "'stream'"),
        ({"model": "m", "prompt": "x", "n": 2}, "'n'"),
    ],
)
def test_bad_chat_bodies(body: object, field: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(field)):
        openai_body.normalize_chat_body(body)


def test_completion_bodies() -> None:
    assert openai_body.normalize(RequestKind.COMPLETION, {"model": "m", "prompt": ["a", "b"]})
    with pytest.raises(InvalidRequest, match="'prompt'"):
        openai_body.normalize(RequestKind.COMPLETION, {"model": "m", "prompt": 3})


@pytest.mark.parametrize("field", ["seed", "temperature", "top_k", "logit_bias"])
def test_numbers_of_thousands_of_digits_are_bad_fields_not_crashes(field: str) -> None:
    huge = int("9" * 4000)  # below CPython's 4,300-digit parse limit: it reaches validation
    value: object = {"1": huge} if field == "logit_bias" else huge
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], field: value}
    with pytest.raises(InvalidRequest, match=field):
        openai_body.normalize_chat_body(body)
