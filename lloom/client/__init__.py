"""The client role: find executors for a model, send requests, fail over."""
