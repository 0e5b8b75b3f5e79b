"""The executor's libp2p side: the stream handler for ``/lloom/llm/1.0.0`` and its
announcements (DHT keys for its role and models, load on gossipsub)."""

from __future__ import annotations

import contextlib
import logging
import time

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from lloom.dhtkeys import executor_role_key, model_key
from lloom.errors import IdentityError
from lloom.executor.handler import RequestHandler
from lloom.identity import address_from_peer_id
from lloom.node.node import Node
from lloom.node.streams import FramedStream
from lloom.protocol import llm
from lloom.protocol.announce import TOPIC, LoadAnnouncement

logger = logging.getLogger(__name__)

#: Largest frame an executor writes (a complete non-streamed answer).
MAX_RESPONSE_FRAME = 16 * 1024 * 1024


def install(node: Node, handler: RequestHandler) -> None:
    """Serve ``handler`` on ``node`` for every incoming request stream."""

    async def on_stream(stream: INetStream) -> None:
        # py-libp2p runs stream handlers in the node's task group: an exception escaping
        # here would stop the executor. The handler has its own boundaries; this is the last.
        try:
            await _serve(stream)
        except Exception as exc:
            logger.error("stream handler failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            with contextlib.suppress(Exception):
                await stream.reset()

    async def _serve(stream: INetStream) -> None:
        framed = FramedStream(
            stream,
            max_frame=handler.limits.max_request_bytes,
            max_write_frame=MAX_RESPONSE_FRAME,
            read_timeout=handler.limits.request_timeout_secs,
        )
        try:
            client = address_from_peer_id(stream.muxed_conn.peer_id)
        except IdentityError:
            # Only secp256k1 peers have an EVM address to account usage to.
            await framed.write_frame(
                llm.encode(
                    llm.Error(llm.ErrorCode.BAD_REQUEST, "client peer id is not a secp256k1 key")
                )
            )
            await framed.close()
            return
        await handler.handle(framed, client)

    node.host.set_stream_handler(TProtocol(llm.PROTOCOL_ID), on_stream)


async def announce_keys(node: Node, models: list[str], attempts: int = 4) -> int:
    """Provide the role key and every model's key; return how many were confirmed.

    A key whose announcement no validator confirmed is announced again, up to ``attempts``
    times with a growing pause (1, 2, 4 s): a validator busy with a crowd of joining
    executors answers late, not never.
    """
    pending = [executor_role_key(), *(model_key(m) for m in models)]
    confirmed = 0
    for attempt in range(attempts):
        if attempt:
            await trio.sleep(2 ** (attempt - 1))
        left = []
        for key in pending:
            if await node.dht.provide(key):
                confirmed += 1
            else:
                left.append(key)
        if not left:
            break
        logger.info("%d announcement(s) not confirmed yet; trying again", len(left))
        pending = left
    return confirmed


async def keep_announcing(
    node: Node,
    handler: RequestHandler,
    *,
    reprovide_interval: float = 30.0,
    load_interval: float = 5.0,
) -> None:
    """Re-provide the DHT keys and publish load until cancelled."""

    async def reprovide() -> None:
        if not node.config.bootstrap:
            return  # LAN only (mDNS): no DHT to announce to
        keys = 1 + len(handler.models)
        while True:
            # Every interval, and at once when the relayed addresses changed.
            with trio.move_on_after(reprovide_interval):
                await node.addrs_changed.wait()
            await node.bootstrap()
            if node.reservations is not None and not node.reservations.held:
                # Nobody could reach it: advertising its models would only send clients
                # to a dead end. Announced again once a reservation is back.
                logger.warning("no relay reservation: not announcing until one is made")
                continue
            done = await announce_keys(node, handler.models, attempts=1)
            if done < keys:
                # A connection can look alive here and be gone at the validator, which
                # then forgot this executor's records: lookups missed it until restart.
                logger.info("re-announcing over fresh connections to the validators")
                await node.reconnect_bootstrap()
                done = await announce_keys(node, handler.models, attempts=3)
            logger.debug("re-provided %d of %d keys", done, keys)

    async def publish_load() -> None:
        if node.pubsub is None:
            return
        last: tuple[int, int] | None = None
        next_at = 0.0
        while True:
            state = (handler.active, handler.served)
            now = trio.current_time()
            if state != last or now >= next_at:
                msg = LoadAnnouncement(
                    tuple(handler.models),
                    handler.active,
                    handler.limits.max_concurrent_requests,
                    time.time(),
                )
                try:
                    await node.pubsub.publish(TOPIC, msg.encode())
                except Exception as exc:  # publishing is best effort
                    logger.debug("load announcement failed: %s", exc)
                last, next_at = state, now + load_interval
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reprovide)
        nursery.start_soon(publish_load)
