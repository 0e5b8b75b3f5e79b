"""Framed reads and writes on a libp2p stream, each under a timeout.

The framing itself is pure code (:mod:`lloom.framing`); this adapter only moves bytes.
A killed peer shows up as a clean EOF and a frozen peer would block a read forever, so
every read is bounded by ``read_timeout`` and protocols must end with an explicit final
frame.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF, StreamError

from lloom.errors import NetworkError, PeerTimeout
from lloom.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from lloom.node.muxer import fits_window

#: Bytes asked of the stream per read call.
READ_CHUNK = 64 * 1024


class FramedStream:
    """Length-prefixed frames over an :class:`INetStream`.

    ``max_frame`` bounds what is read, ``max_write_frame`` (default the same) what is
    written: an executor accepts small requests but may send large responses.
    """

    def __init__(
        self,
        stream: INetStream,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_write_frame: int | None = None,
        read_timeout: float = 30.0,
    ) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.max_write_frame = max_frame if max_write_frame is None else max_write_frame
        self.read_timeout = read_timeout
        self._decoder = FrameDecoder(max_frame)
        self._ready: deque[bytes] = deque()
        #: Called after every ``probe_every`` s without a frame while a read waits; it
        #: raises when the peer is gone (a ping), so a dead connection is noticed long
        #: before ``read_timeout`` (which may be minutes while a model thinks).
        self.probe: Callable[[], Awaitable[object]] | None = None
        self.probe_every = 5.0

    async def read_frame(self, timeout: float | None = None) -> bytes | None:
        """The next frame, or ``None`` if the stream ended cleanly between frames.

        Raises :class:`PeerTimeout` when no complete frame arrives within ``timeout``
        (default ``read_timeout``), :class:`ProtocolError` for bad framing and
        :class:`NetworkError` when the stream is reset.
        """
        limit = self.read_timeout if timeout is None else timeout
        deadline = trio.current_time() + limit
        try:
            while not self._ready:
                left = deadline - trio.current_time()
                if left <= 0:
                    raise PeerTimeout(f"no frame from peer within {limit:g} s")
                wait = left if self.probe is None else min(left, self.probe_every)
                data = b""
                with trio.move_on_after(wait) as quiet:
                    with contextlib.suppress(StreamEOF):
                        data = await self.stream.read(READ_CHUNK)
                if quiet.cancelled_caught:  # quiet for a while: is the peer still there?
                    if self.probe is not None and trio.current_time() < deadline:
                        await self._check_alive()
                    continue
                if not data:
                    self._decoder.eof()
                    return None
                self._ready.extend(self._decoder.feed(data))
        except StreamError as exc:
            raise NetworkError(f"stream failed while reading: {type(exc).__name__}") from exc
        return self._ready.popleft()

    async def _check_alive(self) -> None:
        assert self.probe is not None
        try:
            await self.probe()
        except Exception as exc:  # a failed ping: py-libp2p raises assorted types
            raise PeerTimeout(
                f"peer stopped answering (no frame for {self.probe_every:g} s and "
                f"no ping answer: {str(exc) or type(exc).__name__})"
            ) from None

    async def write_frame(self, payload: bytes, timeout: float | None = None) -> None:
        """Write one frame; raises :class:`NetworkError` if the stream is gone."""
        await self.write_frames([payload], timeout)

    async def write_frames(self, payloads: list[bytes], timeout: float | None = None) -> None:
        """Write frames in order, in one write of the stream (one Yamux frame when they
        fit); raises :class:`NetworkError` if the stream is gone."""
        data = b"".join(encode_frame(p, self.max_write_frame) for p in payloads)
        limit = self.read_timeout if timeout is None else timeout
        try:
            if fits_window(self.stream, len(data)):  # no wait for the peer's credit
                await self.stream.write(data)
                return
            with trio.fail_after(limit):
                await self.stream.write(data)
        except trio.TooSlowError:
            raise PeerTimeout(f"peer did not accept a frame within {limit:g} s") from None
        except StreamError as exc:
            raise NetworkError(f"stream failed while writing: {type(exc).__name__}") from exc

    async def discard(self, seconds: float = 1.0, max_bytes: int = 4 * 1024 * 1024) -> None:
        """End a stream whose framing is lost: close our side, read and drop what the peer
        is still sending (so a writer blocked on flow control is released) for at most
        ``seconds`` and ``max_bytes``, then reset."""
        await self.close()
        dropped = 0
        with trio.move_on_after(seconds), contextlib.suppress(StreamError, StreamEOF):
            while dropped < max_bytes:
                data = await self.stream.read(READ_CHUNK)
                if not data:
                    break
                dropped += len(data)
        await self.reset()

    async def close(self) -> None:
        """Close the stream, ignoring a peer that already went away."""
        with contextlib.suppress(StreamError):
            await self.stream.close()

    async def reset(self) -> None:
        """Reset the stream (abort), ignoring errors."""
        with contextlib.suppress(StreamError):
            await self.stream.reset()
