"""lloom: a decentralized peer-to-peer network for LLM inference.

Three roles share one libp2p network: validators (Kademlia DHT servers that keep the
network healthy), executors (serve OpenAI-format requests by proxying to backends) and
clients (find executors for a model and send requests to them). Usage is settled on an
EVM ``Accounting`` contract. One secp256k1 key is a node's whole identity.
"""

__version__ = "0.1.0"
