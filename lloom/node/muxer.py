"""Fewer writes, wake-ups and syscalls per message in py-libp2p 0.8.1's Yamux and TCP.

A streamed answer is many small messages, and py-libp2p pays per message, not per byte
(docs/benchmarks.md, "Where the relay's CPU goes" in the field notes): each DATA frame is
its own Noise message and socket write, every small read sends a WINDOW_UPDATE frame back
(one more frame each way), and every Noise message costs two ``recv`` calls (its length,
then its body). The patches, each applied once and each with a test
(tests/node/test_muxer.py):

- :func:`batch_window_updates`: credit is returned as go-yamux does it — one
  WINDOW_UPDATE when at least half the receive window has been consumed — instead of
  after almost every read.
- :func:`coalesce_writes`: frames written to one connection while a write is under way
  go out together in the next write, one Noise message (a group commit). A lone frame is
  written at once, never delayed. Each caller still returns only once its frame was
  handed to the socket, and gets the error when that failed. The write itself is
  shielded from the caller's cancellation (bounded by ``WRITE_TIMEOUT``): a write cut
  half-way left a partial Noise message on the wire and broke the connection for every
  stream on it.
- :func:`buffer_tcp_reads`: a TCP connection reads what the socket has (up to
  ``READ_SIZE``) and serves the small reads of the Noise and Yamux layers from that.
- :func:`lean_stream_io`: a stream's write that fits its send window in one frame, and
  a read of what is buffered (or waits for it), skip py-libp2p's locks and its debug
  lines (formatted on every call even with debug logging off); anything else (a full
  window, a closed or reset stream) takes py-libp2p's own path.

They change no bytes on the wire but their grouping: frames and messages are the ones the
protocol defines, so peers (go-, js-, rust-libp2p) see nothing new.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import trio
from libp2p.io import trio as trio_io
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.stream_muxer.yamux import yamux as yamux_module

logger = logging.getLogger(__name__)

#: Bytes asked of the socket per ``recv`` (Noise messages are at most 65,537 bytes).
READ_SIZE = 256 * 1024
#: Seconds one coalesced write may take before the connection counts as broken.
WRITE_TIMEOUT = 30.0

_yamux_logger = logging.getLogger(yamux_module.__name__)


# --- window updates -----------------------------------------------------------------------


async def _send_window_update_when_due(self: Any, *, bytes_read: int = 0) -> None:
    """Return receive credit once half the window is consumed (go-yamux's
    ``sendWindowUpdate``), growing the window as py-libp2p's auto-tuning does."""
    buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
    delta = self.target_recv_window - (self.recv_window + buffered)
    if delta <= 0 or delta < self.target_recv_window // 2:
        return
    # No await between reading and updating the window: trio runs this atomically.
    self.recv_window += delta
    self._pending_recv_release = 0
    delta += self._apply_autotune_epoch(buffered)
    await self.send_window_update(delta)


def batch_window_updates() -> None:
    """Install :func:`_send_window_update_when_due` on every Yamux stream."""
    yamux_module.YamuxStream._auto_tune_and_send_window_update = _send_window_update_when_due  # type: ignore[method-assign]


# --- coalesced writes -----------------------------------------------------------------------


class _Batch:
    """Frames that go out in one write; ``done`` is set once they went (or failed)."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class _Writer:
    """The write side of one Yamux connection (kept on it as ``_lloom_writer``)."""

    __slots__ = ("broken", "next", "queue", "writing", "written")

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.next = _Batch()
        self.writing = False
        #: Set (and replaced) after every write: the next batch's callers go on.
        self.written = trio.Event()
        self.broken: BaseException | None = None


def _log_frame(conn: Any, data: bytes) -> None:
    """py-libp2p's TX debug line, only when its logger shows debug."""
    _, typ, flags, sid, length = struct.unpack(yamux_module.YAMUX_HEADER_FORMAT, data[:12])
    _yamux_logger.debug(
        "YAMUX TX: type=%s flags=%#x stream=%d length=%d is_initiator=%s payload_bytes=%d",
        typ,
        flags,
        sid,
        length,
        conn.is_initiator_value,
        len(data) - yamux_module.HEADER_SIZE,
    )


async def _write_frame(self: Any, data: bytes) -> None:
    """``Yamux._write_frame`` as a group commit (see the module docstring): the frame joins
    the queue; whoever finds no write under way writes the whole queue, one batch, and
    the callers of the next batch take their turn after it (no caller writes the others'
    frames for longer than its own batch). A caller cancelled while its frame is still
    queued takes it back, as py-libp2p's lock wait did."""
    if len(data) >= yamux_module.HEADER_SIZE and _yamux_logger.isEnabledFor(logging.DEBUG):
        _log_frame(self, data)
    writer: _Writer | None = getattr(self, "_lloom_writer", None)
    if writer is None:
        writer = self._lloom_writer = _Writer()
    if writer.broken is not None:
        raise ConnectionClosedError(f"connection broken by an earlier write: {writer.broken}")
    writer.queue.append(data)
    mine = writer.next
    try:
        while not mine.done.is_set():
            if writer.writing:
                await writer.written.wait()
            else:
                await _write_queued(self, writer)
    except trio.Cancelled:
        if mine is writer.next:  # not taken into a write yet: take it back
            for i, queued in enumerate(writer.queue):
                if queued is data:
                    del writer.queue[i]
                    break
        raise
    if mine.error is not None:
        raise mine.error


async def _write_queued(conn: Any, writer: _Writer) -> None:
    """Write every queued frame as one batch, then let the next batch's callers go on."""
    writer.writing = True
    batch, writer.next = writer.next, _Batch()
    frames, writer.queue = writer.queue, []
    try:
        await _write_batch(conn, writer, batch, b"".join(frames))
    finally:
        writer.writing = False
        writer.written.set()
        writer.written = trio.Event()


async def _write_batch(conn: Any, writer: _Writer, batch: _Batch, payload: bytes) -> None:
    """Write ``payload``, shielded and bounded; wake everyone whose frame was in it."""
    try:
        with trio.CancelScope(shield=True), trio.fail_after(WRITE_TIMEOUT):
            await conn.secured_conn.write(payload)
    except trio.TooSlowError:
        batch.error = ConnectionClosedError(f"a write took longer than {WRITE_TIMEOUT:g} s")
    except Exception as exc:  # the connection failed: every frame in the batch failed
        batch.error = exc
    if batch.error is not None:  # frames queued behind a failed write fail with it
        writer.broken = writer.next.error = batch.error
        writer.next.done.set()
        writer.queue.clear()
    batch.done.set()


def coalesce_writes() -> None:
    """Install :func:`_write_frame` on every Yamux connection."""
    yamux_module.Yamux._write_frame = _write_frame  # type: ignore[method-assign]


# --- buffered TCP reads ---------------------------------------------------------------------


async def _buffered_read(self: Any, n: int | None = None) -> bytes:
    """``TrioTCPStream.read``, served from what the last ``recv`` brought when it can."""
    if n is not None and n == 0:
        return b""
    buf: bytes = getattr(self, "_lloom_buf", b"")
    pos: int = getattr(self, "_lloom_pos", 0)
    if pos < len(buf):
        end = len(buf) if n is None else min(len(buf), pos + n)
        self._lloom_pos = end
        return buf[pos:end]
    data = await _original_read(self, READ_SIZE)
    if n is None or len(data) <= n:
        return data
    self._lloom_buf, self._lloom_pos = data, n
    return data[:n]


_original_read = trio_io.TrioTCPStream.read


def buffer_tcp_reads() -> None:
    """Install :func:`_buffered_read` on py-libp2p's TCP connections."""
    trio_io.TrioTCPStream.read = _buffered_read  # type: ignore[method-assign]


# --- lean stream reads and writes ---------------------------------------------------------

_MAX_PAYLOAD = yamux_module.MAX_MESSAGE_SIZE - yamux_module.HEADER_SIZE
_original_write = yamux_module.YamuxStream.write
_original_stream_read = yamux_module.YamuxStream.read


def fits_window(stream: Any, size: int) -> bool:
    """Whether writing ``size`` bytes to ``stream`` (a Yamux stream, or a stream over
    one) needs no wait for the peer's credit: one frame within the send window."""
    muxed = getattr(stream, "muxed_stream", stream)
    window = getattr(muxed, "send_window", None)
    return isinstance(window, int) and 0 < size <= min(window, _MAX_PAYLOAD)


async def _lean_write(self: Any, data: bytes) -> None:
    """``YamuxStream.write``: one frame at once when it fits the window."""
    size = len(data)
    if self.send_closed or self.closed or not 0 < size <= min(self.send_window, _MAX_PAYLOAD):
        await _original_write(self, data)
        return
    self.send_window -= size
    header = struct.pack(
        yamux_module.YAMUX_HEADER_FORMAT, 0, yamux_module.TYPE_DATA, 0, self.stream_id, size
    )
    await self.conn._write_frame(header + data)


async def _lean_read(self: Any, n: int | None = -1) -> bytes:
    """``YamuxStream.read(n)``: what is buffered, or wait for it, while the stream is
    plainly open; py-libp2p's path for ``n = -1`` and every other state."""
    if n is None or n < 0:
        return await _original_stream_read(self, n)
    conn, sid = self.conn, self.stream_id
    while True:
        buffer = conn.stream_buffers.get(sid)
        event = conn.stream_events.get(sid)
        if (
            buffer is None
            or event is None
            or self.reset_received
            or self.closed
            or conn.event_shutting_down.is_set()
            or sid not in conn.streams
        ):
            return await _original_stream_read(self, n)
        if buffer:
            data = bytes(buffer[:n])
            del buffer[:n]
            await self._auto_tune_and_send_window_update(bytes_read=len(data))
            return data
        if self.recv_closed:
            return await _original_stream_read(self, n)
        await event.wait()
        if conn.stream_events.get(sid) is event:
            conn.stream_events[sid] = trio.Event()


def lean_stream_io() -> None:
    """Install :func:`_lean_write` and :func:`_lean_read` on every Yamux stream."""
    yamux_module.YamuxStream.write = _lean_write  # type: ignore[method-assign]
    yamux_module.YamuxStream.read = _lean_read  # type: ignore[method-assign]


def apply_all() -> None:
    """Apply every patch of this module (idempotent)."""
    batch_window_updates()
    coalesce_writes()
    buffer_tcp_reads()
    lean_stream_io()
