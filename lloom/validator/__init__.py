"""The validator role: a stable bootstrap node and Kademlia DHT server."""
