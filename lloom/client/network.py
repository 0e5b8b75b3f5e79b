"""The client library: discovery, ranking, spreading, pooling, failover and resume in one
place, used by ``lloom-client`` and by the gateway alike.

A :class:`NetworkClient` keeps libp2p connections and idle request streams to executors
(:class:`~lloom.client.session.StreamPool`), the load announcements it follows, the last
executors found per model (refreshed in the background), spreads requests over them by two
random choices, fails over and continues broken-off answers
(:func:`~lloom.client.session.request_with_failover`), and signs receipts.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from lloom.client.discovery import Choice, find_executors, measure
from lloom.client.loads import LoadTable
from lloom.client.observed import ExecutorBook
from lloom.client.ranking import UNRELIABLE, rank
from lloom.client.receipts import ReceiptSigner
from lloom.client.session import Result, StreamPool, request_with_failover
from lloom.client.spread import spread
from lloom.errors import AllExecutorsFailed, LloomError, NoExecutorError
from lloom.node.node import Node
from lloom.node.relay import is_circuit
from lloom.protocol import llm

ChunkCallback = Callable[[dict[str, Any]], Awaitable[None]]
logger = logging.getLogger(__name__)

#: Most models ``/v1/models`` looks up in the DHT at once.
MAX_LISTED_MODELS = 64
#: Announced load a relayed executor is considered to carry on top of its own when two
#: drawn executors are compared: with as many of this client's requests outstanding, a
#: direct one wins unless it is more than half busier.
RELAYED_LOAD = 0.5
#: Seconds an executor that failed at the network level (dial, timeout, a connection
#: that died) is not drawn for new requests: a cut cable otherwise cost one stalled
#: request after another until the next lookup dropped it.
UNREACHABLE_SECS = 30.0
#: Seconds an executor that refused a request as busy is not drawn for new requests.
BUSY_SECS = 1.0


@dataclass(frozen=True, slots=True)
class Listing:
    """A model's executors as this client found them."""

    executors: int
    #: How many of them it reaches only through a validator's relay.
    relayed: int

    def to_json(self) -> dict[str, int]:
        """``{"direct": …, "relayed": …}``."""
        return {"direct": self.executors - self.relayed, "relayed": self.relayed}


class NetworkClient:
    """A node's way to run requests on the network (see the module docstring)."""

    def __init__(
        self,
        node: Node,
        signer: ReceiptSigner | None,
        *,
        discovery_ttl: float = 10.0,
        timeout: float = 300.0,
        choice: Choice | None = None,
    ) -> None:
        self.node = node
        self.signer = signer
        #: Which executors may be used, and what was observed of them.
        self.choice = choice or Choice(book=ExecutorBook())
        self.discovery_ttl = discovery_ttl
        self.timeout = timeout
        self.pool = StreamPool(node, max_idle_per_peer=64)
        self.loads = LoadTable()
        self._found: dict[str, tuple[float, list[PeerInfo], dict[Any, float]]] = {}
        self._refreshing: dict[str, trio.Event] = {}
        self._failures: dict[str, LloomError] = {}
        #: Requests running per executor (the first one tried), for spreading.
        self._outstanding: collections.Counter[ID] = collections.Counter()
        #: Until when executors are not drawn for new requests (busy, unreachable).
        self._benched: dict[ID, float] = {}
        #: Where streamed requests run (set by whoever serves the gateway).
        self.nursery: trio.Nursery | None = None

    async def executors(self, model: str) -> list[PeerInfo]:
        """Executors for ``model``, best first.

        The last executors found are kept with their age: older than ``discovery_ttl`` they
        are still used while one lookup refreshes them in the background, and a failed
        lookup keeps them. Requests never each start their own lookup of one model: the
        first waits for it, the others wait for the same one. Without anything known,
        :class:`NoExecutorError` (404) only when the DHT itself found none.
        """
        cached = self._found.get(model)
        if cached is None:
            cached = await self._lookup(model)
        elif (
            time.monotonic() - cached[0] > self.discovery_ttl
            and self.nursery is not None
            and model not in self._refreshing
        ):
            self.nursery.start_soon(self._refresh, model)
        _, found, rtts = cached
        by_id = {info.peer_id: info for info in found}
        seen = self.choice.seen(list(by_id))
        relayed = {info.peer_id for info in found if self.path_of(info) == "relayed"}
        order = rank(list(by_id), rtts, self.loads.current(), seen, relayed)
        return [by_id[p] for p in order]

    def path_of(self, info: PeerInfo) -> str:
        """How requests reach executor ``info``: "direct" or "relayed" (the connection
        in use when connected, else the addresses it advertises)."""
        path = self.node.path_to(info.peer_id)
        if path is not None:
            return path
        relayed_only = bool(info.addrs) and all(is_circuit(a) for a in info.addrs)
        return "relayed" if relayed_only else "direct"

    async def _lookup(self, model: str) -> tuple[float, list[PeerInfo], dict[Any, float]]:
        """One lookup of ``model`` at a time: callers that come while it runs wait for it
        and share its answer, or its error."""
        while (running := self._refreshing.get(model)) is not None:
            await running.wait()
            cached = self._found.get(model)
            if cached is not None and cached[0] > 0:
                return cached
            if model in self._failures:
                raise self._failures[model]
        done = self._refreshing[model] = trio.Event()
        self._failures.pop(model, None)
        try:
            found = self.choice.permitted(await find_executors(self.node, model))
            if not found:
                raise NoExecutorError(f"no executor this client may use serves {model!r}")
            failures: dict[ID, str] = {}
            rtts = await measure(self.node, found, failures=failures)
            for peer in failures:
                self._note_unreachable(peer)
            if not rtts:
                # Found, but nobody answered: say so now rather than after a dial timeout
                # per executor on every request.
                raise AllExecutorsFailed([(str(p), why) for p, why in failures.items()])
            cached = (time.monotonic(), found, rtts)
            self._found[model] = cached
            return cached
        except LloomError as exc:
            self._failures[model] = exc  # for the callers waiting on this lookup
            raise
        finally:
            del self._refreshing[model]
            done.set()

    async def _refresh(self, model: str) -> None:
        """Refresh ``model``'s executors in the background; keep the old ones on failure."""
        try:
            await self._lookup(model)
        except NoExecutorError:
            self._found.pop(model, None)  # the DHT says nobody serves it any more
        except LloomError as exc:
            logger.info(
                "refreshing the executors of %s failed (kept the last ones): %s", model, exc
            )

    def forget(self, model: str) -> None:
        """Mark the known executors of ``model`` as due for a refresh (after they all
        failed): they are still used until a lookup finds others."""
        cached = self._found.get(model)
        if cached is not None:
            self._found[model] = (0.0, cached[1], cached[2])

    def _note_busy(self, peer: ID) -> None:
        self._bench(peer, BUSY_SECS)

    def _note_unreachable(self, peer: ID) -> None:
        self._bench(peer, UNREACHABLE_SECS)

    def _bench(self, peer: ID, seconds: float) -> None:
        """Do not draw ``peer`` for the next ``seconds`` (it stays last-resort failover)."""
        now = trio.current_time()
        self._benched[peer] = max(self._benched.get(peer, now), now + seconds)
        if len(self._benched) > 4 * MAX_LISTED_MODELS * 20:  # bounded: drop the stale ones
            self._benched = {p: t for p, t in self._benched.items() if t > now}

    async def _fresh(self, model: str) -> list[PeerInfo]:
        """Executors of ``model`` from a new lookup (for a request whose candidates all
        failed): none when the lookup fails."""
        try:
            await self._lookup(model)
            return await self.executors(model)
        except LloomError as exc:
            logger.info("looking up %s again found nothing new: %s", model, exc)
            return []

    def _spread(self, ranked: list[PeerInfo]) -> list[PeerInfo]:
        """``ranked`` with this request's executor first, by two random choices over the
        executors not seen mostly failing (:mod:`lloom.client.spread`)."""
        by_id = {info.peer_id: info for info in ranked}
        seen = self.choice.seen(list(by_id))
        loads = self.loads.current()

        now = trio.current_time()

        def usable(peer: ID) -> bool:
            if self._benched.get(peer, now) > now:
                return False  # it just turned a request away, or could not be reached
            mine = seen.get(peer)
            return mine is None or not (mine.bad and mine.unreliability >= UNRELIABLE)

        def load(peer: ID) -> float:
            announced = loads.get(peer)
            extra = RELAYED_LOAD if self.path_of(by_id[peer]) == "relayed" else 0.0
            return (announced.load if announced is not None else 0.0) + extra

        order = spread(list(by_id), self._outstanding, usable=usable, load=load)
        return [by_id[peer] for peer in order]

    async def run(self, request: llm.Request, on_chunk: ChunkCallback | None = None) -> Result:
        """Run ``request`` with failover; raises the client errors of :mod:`lloom.errors`."""
        candidates = self._spread(await self.executors(request.model))
        first = candidates[0].peer_id
        self._outstanding[first] += 1
        try:
            return await request_with_failover(
                self.node,
                candidates,
                request,
                on_chunk,
                total_timeout=self.timeout,
                pool=self.pool,
                signer=self.signer,
                book=self.choice.book,
                more=partial(self._fresh, request.model),
                on_busy=self._note_busy,
                on_unreachable=self._note_unreachable,
            )
        except Exception:
            self.forget(request.model)
            raise
        finally:
            self._outstanding[first] -= 1
            if not self._outstanding[first]:
                del self._outstanding[first]

    async def models(self, limit: int = MAX_LISTED_MODELS) -> dict[str, Listing]:
        """Models announced on the network that have a provider in the DHT this gateway
        may use, with the executors it found for each and how it reaches them.

        Announcements alone are any gossip peer's word; a model is listed only once a DHT
        lookup (cached like requests' lookups) found an executor for it. At most ``limit``
        models are looked up, the most announced first.
        """
        counts = dict(self.loads.models())
        if self.node.lan is not None:  # executors on the LAN advertise their models by mDNS
            for peer in self.node.lan.lan_peers():
                if peer.properties.get("role") == "executor":
                    for model in peer.list_property("models"):
                        counts[model] = counts.get(model, 0) + 1
        announced = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        listed: dict[str, Listing] = {}

        async def one(model: str) -> None:
            with contextlib.suppress(LloomError):
                found = await self.executors(model)
                relayed = sum(1 for info in found if self.path_of(info) == "relayed")
                listed[model] = Listing(len(found), relayed)

        async with trio.open_nursery() as nursery:
            for model, _ in announced[:limit]:
                nursery.start_soon(one, model)
        return dict(sorted(listed.items()))
