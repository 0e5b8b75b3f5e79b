"""Failover across executors (``request_with_failover``) with a fake network: what the
caller gets when an executor fails after the user already has the whole answer."""

from __future__ import annotations

from typing import Any, cast

import pytest
from libp2p.peer.peerinfo import PeerInfo

import lloom.client.session as session
from lloom.client.session import request_with_failover
from lloom.errors import NetworkError, PartialResponseError
from lloom.identity import Identity
from lloom.node.node import Node
from lloom.protocol import billing, llm

BODY: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


def cut_after(chunks: list[dict[str, Any]]) -> Any:
    """A fake ``send_request``: delivers ``chunks``, then the connection dies."""
    tried: list[str] = []

    async def send(
        node: Node, info: PeerInfo, request: llm.Request, on_chunk: Any, **_: Any
    ) -> Any:
        tried.append(str(info.peer_id))
        for c in chunks:
            await on_chunk(c)
        raise NetworkError("stream failed while reading: StreamReset")

    send.tried = tried  # type: ignore[attr-defined]
    return send


async def test_a_complete_answer_whose_end_frame_was_lost_ends_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cut fell after the finish_reason chunk and before the executor's End frame:
    the user has the whole answer, so it ends as one (with this client's own count),
    not as an error after it."""
    send = cut_after([chunk("Hello"), chunk(" there", "stop")])
    monkeypatch.setattr(session, "send_request", send)
    peers = [PeerInfo(Identity.generate().peer_id, []) for _ in range(2)]
    unreachable: list[Any] = []
    got: list[dict[str, Any]] = []

    async def on_chunk(c: dict[str, Any]) -> None:
        got.append(c)

    request = llm.Request(llm.RequestKind.CHAT, BODY)
    result = await request_with_failover(
        cast(Node, None), peers, request, on_chunk, on_unreachable=unreachable.append
    )
    assert len(got) == 2 and send.tried == [str(peers[0].peer_id)]
    assert result.executor == peers[0].peer_id and result.end.receipt is None
    assert result.end.request_id == "chatcmpl-1"
    assert result.end.usage == llm.Usage(
        billing.prompt_tokens(request.kind, request.body), billing.count("Hello there")
    )
    assert unreachable == [peers[0].peer_id]


async def test_an_unfinished_answer_that_cannot_resume_is_still_partial(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session, "send_request", cut_after([chunk("Hello")]))
    peers = [PeerInfo(Identity.generate().peer_id, []) for _ in range(2)]
    with pytest.raises(PartialResponseError, match="cannot be continued"):
        await request_with_failover(
            cast(Node, None), peers, llm.Request(llm.RequestKind.CHAT, BODY | {"n": 1})
        )


async def test_with_several_choices_one_finish_is_not_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session, "send_request", cut_after([chunk("a", "stop")]))
    peers = [PeerInfo(Identity.generate().peer_id, [])]
    with pytest.raises(PartialResponseError):
        await request_with_failover(
            cast(Node, None), peers, llm.Request(llm.RequestKind.CHAT, BODY | {"n": 2})
        )
