"""A JSON-RPC proxy in front of a node that loses replies, for settlement fault tests.

``python -m tests.support.rpc_proxy --upstream URL [--lose-send-replies N]`` prints
``ready url=http://127.0.0.1:PORT``. The first N ``eth_sendRawTransaction`` calls are
forwarded to the node (so the transaction IS sent and mined) but the caller gets an HTTP 502
instead of the node's answer, as when a reply is lost on the way back.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import httpx
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lloom.httpserver import start_http


def build_app(upstream: str, lose: int) -> Starlette:
    """The proxy app."""
    state = {"lost": 0}
    client = httpx.AsyncClient(timeout=30)

    async def rpc(request: Request) -> Response:
        body = await request.body()
        reply = await client.post(
            upstream, content=body, headers={"content-type": "application/json"}
        )
        try:
            methods = [json.loads(body).get("method")]
        except (ValueError, AttributeError):
            methods = []
        if "eth_sendRawTransaction" in methods and state["lost"] < lose:
            state["lost"] += 1
            print(f"lost reply {state['lost']}", flush=True)
            return JSONResponse({"error": "reply lost"}, status_code=502)
        return Response(reply.content, status_code=reply.status_code, media_type="application/json")

    return Starlette(routes=[Route("/", rpc, methods=["POST"])])


async def serve(upstream: str, lose: int) -> None:
    """Serve until SIGINT/SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await start_http(nursery, build_app(upstream, lose), "127.0.0.1", 0)
            print(f"ready url=http://{bound}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="rpc_proxy")
    p.add_argument("--upstream", required=True)
    p.add_argument("--lose-send-replies", type=int, default=1)
    a = p.parse_args(argv)
    trio.run(serve, a.upstream, a.lose_send_replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
