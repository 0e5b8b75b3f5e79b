"""DHT keys for lloom, as go-libp2p and js-libp2p compute them.

A key is the binary CIDv1 with the ``raw`` codec (0x55) of the sha256 multihash of a name
(``0x12 0x20 || sha256(name)``). A bare sha256, as in py-libp2p's examples, would not match
providers announced by other implementations.

- ``lloom/executor/v1``: every executor provides this key.
- ``lloom/model/<model-id>/v1``: one key per model an executor serves.
"""

from __future__ import annotations

import base64
import hashlib
import re

from lloom.errors import UsageError

EXECUTOR_ROLE_NAME = "lloom/executor/v1"

_CID_V1_RAW_SHA256 = bytes([0x01, 0x55, 0x12, 0x20])
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")


def cid_key(name: str) -> bytes:
    """The binary CIDv1 (raw codec, sha256) of ``name`` encoded as UTF-8."""
    return _CID_V1_RAW_SHA256 + hashlib.sha256(name.encode("utf-8")).digest()


def cid_string(key: bytes) -> str:
    """The multibase base32 (``b…``) text form of a binary CID, as ``CID.toString()``."""
    return "b" + base64.b32encode(key).decode("ascii").lower().rstrip("=")


def validate_model_id(model: str) -> str:
    """Return ``model`` if it is a usable model id, else raise :class:`UsageError`."""
    if not _MODEL_ID.fullmatch(model):
        raise UsageError(
            f"invalid model id {model!r}: use 1-200 characters from letters, digits and ._:/@+-"
        )
    return model


def model_key_name(model: str) -> str:
    """The DHT key name of a model: ``lloom/model/<model-id>/v1``."""
    return f"lloom/model/{validate_model_id(model)}/v1"


def executor_role_key() -> bytes:
    """The DHT key every executor provides."""
    return cid_key(EXECUTOR_ROLE_NAME)


def model_key(model: str) -> bytes:
    """The DHT key of executors serving ``model``."""
    return cid_key(model_key_name(model))
