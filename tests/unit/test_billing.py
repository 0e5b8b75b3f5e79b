"""The canonical billing count: test vectors (the same as in docs/protocol.md)."""

from __future__ import annotations

from typing import Any

import pytest

from lloom.protocol import billing
from lloom.protocol.llm import RequestKind

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize(
    ("kind", "body", "tokens"),
    [
        (RequestKind.CHAT, {"messages": [{"role": "user", "content": "Hello!"}]}, 9),
        (
            RequestKind.CHAT,
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "name": "ada", "content": "Name three rivers."},
                ]
            },
            20,
        ),
        (
            RequestKind.CHAT,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
                        ],
                    }
                ]
            },
            96,
        ),
        (
            RequestKind.CHAT,
            {
                "messages": [
                    {"role": "user", "content": "Weather in Paris?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
                ],
                "tools": [WEATHER_TOOL],
            },
            58,
        ),
        (RequestKind.COMPLETION, {"prompt": ["Once upon", "a time"]}, 4),
    ],
)
def test_prompt_vectors(kind: RequestKind, body: dict[str, Any], tokens: int) -> None:
    assert billing.prompt_tokens(kind, body) == tokens


def test_tools_and_response_format_are_billed_in_their_canonical_spelling() -> None:
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    with_tools = plain | {"tools": [WEATHER_TOOL]}
    reordered = plain | {"tools": [{"function": WEATHER_TOOL["function"], "type": "function"}]}
    assert billing.chat_prompt_tokens(with_tools) > billing.chat_prompt_tokens(plain)
    assert billing.chat_prompt_tokens(with_tools) == billing.chat_prompt_tokens(reordered)
    schema = plain | {"response_format": {"type": "json_object"}}
    assert billing.chat_prompt_tokens(schema) > billing.chat_prompt_tokens(plain)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("Echo: Hello!", 4), ("héllo wörld 🌍", 9), ("<|endoftext|>", 7), ("", 0)],
)
def test_count_vectors(text: str, tokens: int) -> None:
    assert billing.count(text) == tokens


def test_completion_is_capped_at_the_clients_max_tokens() -> None:
    assert billing.completion_tokens("one two three four five", None) == 5
    assert billing.completion_tokens("one two three four five", 3) == 3


def test_delivered_text_of_chunks_and_responses() -> None:
    chunk = {
        "choices": [
            {
                "delta": {
                    "reasoning_content": "hm",
                    "content": "Hi",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                }
            }
        ]
    }
    assert billing.delivered_text(chunk) == "hmHif{}"
    response = {"choices": [{"message": {"content": "Hello"}}, {"text": " there"}]}
    assert billing.delivered_text(response) == "Hello there"
    assert billing.delivered_text({"choices": [{"delta": {"content": 7}}], "usage": {}}) == ""
