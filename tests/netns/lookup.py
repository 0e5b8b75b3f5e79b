"""``python -m tests.netns.lookup BOOTSTRAP MODEL``: look the executors of MODEL up the
way a client does and print one JSON object, PeerId → the addresses found for it."""

from __future__ import annotations

import json
import sys

import trio
from multiaddr import Multiaddr

from lloom.client.discovery import find_executors
from lloom.identity import Identity
from lloom.node.node import NodeConfig, open_node


async def lookup(bootstrap: str, model: str) -> dict[str, list[str]]:
    """PeerId → addresses of the providers of ``model``."""
    config = NodeConfig(bootstrap=[Multiaddr(bootstrap)])
    with trio.fail_after(30):
        async with open_node(Identity.generate(), config) as node:
            found = await find_executors(node, model)
    return {str(info.peer_id): [str(a) for a in info.addrs] for info in found}


def main() -> None:
    """Print the lookup's result."""
    bootstrap, model = sys.argv[1:3]
    print(json.dumps(trio.run(lookup, bootstrap, model)))


if __name__ == "__main__":
    main()
