"""Logging set-up shared by every lloom command.

py-libp2p's loggers have no handler and are noisy (an ERROR block per unsupported protocol,
a warning per closed DHT query); they are capped at WARNING (ERROR for the noisiest) unless
``--verbose`` is given twice. Diagnostics go to stderr; stdout is kept for results.
"""

from __future__ import annotations

import logging
import sys

#: py-libp2p loggers that report routine events (peers without a protocol, closed
#: queries, identify of short-lived peers) at WARNING or ERROR.
NOISY_LIBP2P_LOGGERS = (
    "libp2p.kad_dht",
    "libp2p.host.basic_host",
    "libp2p.network.swarm",
    "libp2p.identity.identify",
    "libp2p.pubsub",
    "libp2p.transport",
    "libp2p.stream_muxer",
    "libp2p.protocol_muxer",
    "libp2p.security",
    # Every failed punch or reservation attempt; lloom logs what it does about them.
    "libp2p.relay",
    "libp2p.host.autonat",
    "libp2p.discovery",
)


def configure_logging(verbosity: int = 0) -> None:
    """Configure logging: ``0`` INFO for lloom, ``1`` DEBUG, ``2`` DEBUG for libp2p too."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("lloom").setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    libp2p_level = logging.DEBUG if verbosity >= 2 else logging.WARNING
    libp2p = logging.getLogger("libp2p")
    libp2p.setLevel(libp2p_level)
    # py-libp2p's own set-up (at import, without $LIBP2P_DEBUG) detaches its logger from
    # the root: its records then reached only Python's last-resort handler, and -vv showed
    # no debug line of it. Through the root they get lloom's format and -vv works.
    libp2p.propagate = True
    for name in NOISY_LIBP2P_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.CRITICAL)
