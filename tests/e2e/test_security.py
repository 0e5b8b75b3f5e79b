"""Only Noise is spoken: a dialer offering plaintext alone is refused by a validator."""

from __future__ import annotations

import pytest
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from multiaddr import Multiaddr

from lloom.identity import Identity
from lloom.node.host import apply_dial_fix, build_host
from tests.support.procs import Processes, start_validator

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

LISTEN = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


async def test_plaintext_only_dialer_is_refused(procs: Processes) -> None:
    _, ready = start_validator(procs)
    target = info_from_p2p_addr(Multiaddr(ready.listen[0]))
    apply_dial_fix()
    ident = Identity.generate()
    plaintext = new_host(
        key_pair=ident.keypair,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(ident.keypair)},
    )
    async with plaintext.run(LISTEN):
        with pytest.raises(Exception) as info, trio.fail_after(20):
            await plaintext.connect(target)
        assert not plaintext.get_network().get_connections(target.peer_id)
    chain = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    assert any("secur" in c.lower() for c in chain), chain

    # The same validator accepts a Noise dialer: the refusal above is about security.
    noise = build_host(Identity.generate(), LISTEN)
    async with noise.run(LISTEN):
        with trio.fail_after(20):
            await noise.connect(target)
        assert noise.get_network().get_connections(target.peer_id)
