"""The node layer: a thin, hardened wrapper over py-libp2p 0.8.1 that every role uses."""
