"""The OpenAI-compatible HTTP gateway: any app using the ``openai`` SDK, served by lloom."""
