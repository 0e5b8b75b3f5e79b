"""The executor role: serve LLM requests from peers with OpenAI-compatible backends."""
