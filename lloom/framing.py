"""Length-prefixed framing for lloom's own protocols, as pure code (no I/O).

A frame is an unsigned LEB128 varint (as in multiformats ``unsigned-varint``) giving the
payload length, followed by the payload. Every decoder has a maximum frame size: a length
above it is rejected as soon as the varint is read, before any payload is buffered, so a
peer can never make us allocate what it claims. Varints longer than 9 bytes, non-minimal
varints and streams that end mid-frame are protocol errors.

:class:`FrameDecoder` is an incremental state machine in the style of h11: feed it bytes
as they arrive and it returns the complete frames. The async adapter that reads a libp2p
stream under a timeout lives in :mod:`lloom.node.streams`.
"""

from __future__ import annotations

from lloom.errors import FrameTooLarge, ProtocolError, TruncatedFrame

#: Longest varint accepted (9 bytes encode 63 bits, as multiformats' unsigned-varint).
MAX_VARINT_BYTES = 9

#: Default maximum payload of one frame: 4 MiB.
DEFAULT_MAX_FRAME = 4 * 1024 * 1024


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer as an unsigned LEB128 varint."""
    if value < 0:
        raise ValueError("varint must be non-negative")
    if value >= 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError("varint too large")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """Decode a varint at the start of ``data``.

    Returns ``(value, bytes_consumed)``, or ``None`` if ``data`` holds only a prefix of a
    varint. Raises :class:`ProtocolError` for an over-long or non-minimal varint.
    """
    value = 0
    for i, byte in enumerate(data):
        if i >= MAX_VARINT_BYTES:
            raise ProtocolError(f"varint longer than {MAX_VARINT_BYTES} bytes")
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ProtocolError("non-minimal varint encoding")
            return value, i + 1
    if len(data) >= MAX_VARINT_BYTES:
        raise ProtocolError(f"varint longer than {MAX_VARINT_BYTES} bytes")
    return None


def encode_frame(payload: bytes, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Prefix ``payload`` with its length. Refuses payloads above ``max_size``."""
    if len(payload) > max_size:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the maximum {max_size}")
    return encode_varint(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes, get complete payloads back."""

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        self.max_size = max_size
        self._buf = bytearray()
        self._need: int | None = None  # payload length of the frame being read

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every frame now complete, in order."""
        self._buf += data
        frames: list[bytes] = []
        while True:
            if self._need is None:
                head = decode_varint(self._buf)
                if head is None:
                    return frames
                length, used = head
                if length > self.max_size:
                    raise FrameTooLarge(
                        f"peer announced a frame of {length} bytes; maximum is {self.max_size}"
                    )
                del self._buf[:used]
                self._need = length
            if len(self._buf) < self._need:
                return frames
            frames.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None

    @property
    def wanted(self) -> int:
        """How many more bytes are needed at least to finish the current frame."""
        if self._need is None:
            return 1
        return max(1, self._need - len(self._buf))

    @property
    def idle(self) -> bool:
        """True when no partial frame is buffered."""
        return self._need is None and not self._buf

    def eof(self) -> None:
        """Signal the end of the stream: raises :class:`TruncatedFrame` mid-frame."""
        if not self.idle:
            raise TruncatedFrame("stream ended in the middle of a frame")
