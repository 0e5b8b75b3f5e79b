"""DHT keys are CIDv1 (raw) of sha256 multihashes, as go/js libp2p compute them."""

from __future__ import annotations

import hashlib

import pytest

from lloom.dhtkeys import (
    cid_key,
    cid_string,
    executor_role_key,
    model_key,
    model_key_name,
    validate_model_id,
)
from lloom.errors import UsageError


def test_role_key_layout() -> None:
    key = executor_role_key()
    assert key[:4] == bytes([0x01, 0x55, 0x12, 0x20])
    assert key[4:] == hashlib.sha256(b"lloom/executor/v1").digest()


def test_cid_string_matches_py_cid() -> None:
    import cid  # py-cid, installed with libp2p

    key = cid_key("lloom/executor/v1")
    text = cid_string(key)
    assert text.startswith("bafkrei")
    assert cid.from_string(text).buffer == key


def test_model_keys() -> None:
    assert model_key_name("smollm2") == "lloom/model/smollm2/v1"
    assert model_key("smollm2") == cid_key("lloom/model/smollm2/v1")
    assert model_key("a") != model_key("b")
    assert validate_model_id("meta-llama/Llama-3.1-8B-Instruct:q4") == (
        "meta-llama/Llama-3.1-8B-Instruct:q4"
    )


@pytest.mark.parametrize("bad", ["", " x", "a b", "x\n", "-lead", "a" * 201, "é"])
def test_bad_model_ids(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid model id"):
        validate_model_id(bad)
