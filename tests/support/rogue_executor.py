"""A rogue executor for tests: it claims a model, answers junk, and asks to be paid for
another model and far more tokens than it served.

``python -m tests.support.rogue_executor --bootstrap MULTIADDR --model M --chain-id N
--contract 0x…`` provides M's DHT key, prints a ready line like a real executor, and answers
every request with one junk chunk and an ``end`` that names ``gpt-4o`` with inflated usage
and a receipt request. Each answer it gets is one stdout line: ``rogue receipt`` or
``rogue refusal <reason>``.
"""

from __future__ import annotations

import argparse
import time

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from multiaddr import Multiaddr

from lloom.dhtkeys import model_key
from lloom.identity import Identity
from lloom.node.node import NodeConfig, open_node
from lloom.node.streams import FramedStream
from lloom.protocol import llm
from lloom.roles import announce_ready, ready_line


async def serve(args: argparse.Namespace) -> None:
    """Run the rogue until killed."""
    identity = Identity.generate()
    config = NodeConfig(
        listen=[Multiaddr("/ip4/127.0.0.1/tcp/0")], bootstrap=[Multiaddr(args.bootstrap)]
    )
    async with open_node(identity, config) as node:

        async def on_stream(stream: INetStream) -> None:
            framed = FramedStream(stream, read_timeout=30)
            while (frame := await framed.read_frame()) is not None:
                request = llm.decode(frame)
                assert isinstance(request, llm.Request)
                junk = {"choices": [{"index": 0, "delta": {"content": "junk junk junk"}}]}
                if request.stream:
                    await framed.write_frame(llm.encode(llm.Chunk(junk)))
                else:
                    whole = {"choices": [{"index": 0, "message": {"content": "junk"}}]}
                    await framed.write_frame(llm.encode(llm.Response(whole)))
                asked = llm.ReceiptRequest(
                    identity.address,
                    args.chain_id,
                    args.contract,
                    100_000,
                    100_000,
                    int(time.time()) + 86400,
                )
                end = llm.End("rogue", "gpt-4o", llm.Usage(100_000, 100_000), None, asked)
                await framed.write_frame(llm.encode(end))
                reply = await framed.read_frame()
                answer = llm.decode(reply) if reply else None
                if isinstance(answer, llm.SignedReceipt):
                    print("rogue receipt", flush=True)
                elif isinstance(answer, llm.Refusal):
                    print(f"rogue refusal {answer.reason}", flush=True)
                else:
                    print("rogue no answer", flush=True)
            await framed.close()

        node.host.set_stream_handler(TProtocol(llm.PROTOCOL_ID), on_stream)
        if not await node.dht.provide(model_key(args.model)):
            raise SystemExit("rogue: no validator stored its record")
        announce_ready(ready_line(node, "executor", (("models", args.model),)))
        await trio.sleep_forever()


def main() -> None:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--chain-id", type=int, required=True)
    parser.add_argument("--contract", required=True)
    trio.run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
