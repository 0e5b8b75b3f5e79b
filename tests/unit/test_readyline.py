"""The ready line round-trips and rejects what is not one."""

from __future__ import annotations

import pytest

from lloom.errors import ProtocolError
from lloom.readyline import ReadyLine

LINE = ReadyLine(
    role="validator",
    peer_id="16Uiu2HAmX",
    address="0xabc",
    listen=("/ip4/127.0.0.1/tcp/1/p2p/16Uiu2HAmX", "/ip4/10.0.0.1/tcp/1/p2p/16Uiu2HAmX"),
    extra=(("http", "127.0.0.1:8080"),),
)


def test_round_trip() -> None:
    text = LINE.format()
    assert text.startswith("ready role=validator ")
    assert ReadyLine.parse(text + "\n") == LINE
    assert ReadyLine.parse(text).get("http") == "127.0.0.1:8080"


@pytest.mark.parametrize("bad", ["", "hello", "ready role=x", "ready role=x peer_id"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ProtocolError):
        ReadyLine.parse(bad)


def test_format_rejects_spaces() -> None:
    with pytest.raises(ValueError, match="spaced"):
        ReadyLine("validator", "a b", "0x", ("x",)).format()
