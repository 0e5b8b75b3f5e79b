"""Offline token counting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lloom import tokens


def test_known_vector_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    tokens.get_encoding.cache_clear()
    used = tokens.ensure_offline_encodings(tmp_path / "cache")
    assert used == tmp_path / "cache"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(used)
    assert len(list(used.iterdir())) == 2
    assert tokens.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert tokens.count_text("hello world") == 2
    assert tokens.count_text("hello world", "o200k_base") == 2


def test_corrupt_cache_file_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    used = tokens.ensure_offline_encodings(tmp_path)
    victim = next(used.iterdir())
    victim.write_bytes(b"garbage")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    tokens.ensure_offline_encodings(tmp_path)
    assert victim.stat().st_size > 1000


def test_chat_prompt_count() -> None:
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "hello world"}]},
        {"role": "user", "name": "bob", "content": None},
    ]
    expected = 3
    expected += 3 + tokens.count_text("system") + tokens.count_text("You are terse.")
    expected += 3 + tokens.count_text("user") + 2
    expected += 3 + tokens.count_text("user") + 0 + 1 + tokens.count_text("bob")
    assert tokens.count_chat_prompt(messages) == expected


def test_special_token_text_is_ordinary() -> None:
    assert tokens.count_text("<|endoftext|>") > 1


def test_encoding_for_model() -> None:
    assert tokens.encoding_for_model("gpt-4o-mini") == "o200k_base"
    assert tokens.encoding_for_model("openai/o3") == "o200k_base"
    assert tokens.encoding_for_model("smollm2") == "cl100k_base"
    with pytest.raises(ValueError, match="unknown encoding"):
        tokens.get_encoding("p50k_base")
