"""Framing: round trips and every kind of bad input, without any network."""

from __future__ import annotations

import random

import pytest

from lloom.errors import FrameTooLarge, ProtocolError, TruncatedFrame
from lloom.framing import (
    MAX_VARINT_BYTES,
    FrameDecoder,
    decode_varint,
    encode_frame,
    encode_varint,
)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**32, 2**63 - 1])
def test_varint_round_trip(value: int) -> None:
    data = encode_varint(value)
    assert decode_varint(data + b"tail") == (value, len(data))


def test_varint_known_bytes() -> None:
    assert encode_varint(300) == b"\xac\x02"
    assert encode_varint(0) == b"\x00"


def test_varint_incomplete_returns_none() -> None:
    assert decode_varint(b"") is None
    assert decode_varint(b"\x80") is None
    assert decode_varint(b"\xff" * (MAX_VARINT_BYTES - 1)) is None


def test_varint_too_long() -> None:
    with pytest.raises(ProtocolError, match="longer"):
        decode_varint(b"\xff" * MAX_VARINT_BYTES)
    with pytest.raises(ProtocolError, match="longer"):
        decode_varint(b"\xff" * 20 + b"\x01")


def test_varint_non_minimal() -> None:
    with pytest.raises(ProtocolError, match="non-minimal"):
        decode_varint(b"\x81\x00")


def test_varint_rejects_negative_and_huge() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        encode_varint(-1)
    with pytest.raises(ValueError, match="too large"):
        encode_varint(2**63)


def test_frames_round_trip_in_random_chunks() -> None:
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randrange(0, 5000)) for _ in range(50)]
    wire = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder(max_size=8192)
    got: list[bytes] = []
    pos = 0
    while pos < len(wire):
        step = rng.randrange(1, 700)
        got += dec.feed(wire[pos : pos + step])
        pos += step
    dec.eof()
    assert got == payloads
    assert dec.idle


def test_byte_at_a_time() -> None:
    wire = encode_frame(b"hello") + encode_frame(b"")
    dec = FrameDecoder()
    got: list[bytes] = []
    for b in wire:
        got += dec.feed(bytes([b]))
    assert got == [b"hello", b""]


def test_oversized_rejected_before_payload() -> None:
    dec = FrameDecoder(max_size=1024)
    with pytest.raises(FrameTooLarge, match="1025"):
        dec.feed(encode_varint(1025))
    # A claim of 2**62 bytes must fail at once, not try to allocate.
    with pytest.raises(FrameTooLarge):
        FrameDecoder(max_size=1024).feed(encode_varint(2**62))


def test_encode_refuses_oversized() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 11, max_size=10)


@pytest.mark.parametrize(
    "wire",
    [encode_frame(b"abcdef")[:-1], encode_varint(10), b"\x80", encode_frame(b"ok") + b"\x05ab"],
)
def test_truncated(wire: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(wire)
    with pytest.raises(TruncatedFrame):
        dec.eof()


def test_garbage_is_a_protocol_error_or_needs_more() -> None:
    rng = random.Random(11)
    for _ in range(300):
        dec = FrameDecoder(max_size=256)
        try:
            dec.feed(rng.randbytes(rng.randrange(1, 64)))
            dec.eof()
        except ProtocolError:
            continue


def test_wanted_tracks_the_payload() -> None:
    dec = FrameDecoder()
    assert dec.wanted == 1
    dec.feed(encode_varint(100) + b"x" * 40)
    assert dec.wanted == 60


def test_bad_max_size() -> None:
    with pytest.raises(ValueError, match="positive"):
        FrameDecoder(max_size=0)
