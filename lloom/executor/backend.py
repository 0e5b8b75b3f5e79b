"""Calling an OpenAI-compatible backend (llama.cpp, vLLM, Ollama, LM Studio, OpenAI).

The executor knows models by their *network* id; each backend maps them to its own ids.
Requests are rewritten on the way in and responses on the way out, so clients only ever
see network ids.

Streams are async generators read with httpx-sse. Always close one you stop reading
early, best with :func:`contextlib.aclosing`::

    async with aclosing(backend.chat_stream(body)) as chunks:
        async for chunk in chunks:
            ...

Closing the generator closes the HTTP response, which tells the backend to stop
generating. Failures become :mod:`lloom.errors` backend errors:

========================================  ======================
httpx timeout (connect, or between reads)  BackendTimeout
other transport failure (refused, reset)   BackendUnreachable
HTTP status >= 400                         BackendHTTPError
not JSON / not SSE / error event in SSE    BackendError (or BackendHTTPError)
========================================  ======================
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from lloom.errors import BackendError, BackendHTTPError, BackendTimeout, BackendUnreachable

#: Longest error text kept from a backend's answer.
MAX_MESSAGE = 500
#: The SSE data that ends an OpenAI stream.
DONE = "[DONE]"
#: Secrets a backend may echo in an error: bearer tokens and OpenAI-style keys.
_SECRETS = re.compile(r"(?i)(bearer\s+)[^\s\"',]+|\b(sk-)[A-Za-z0-9_\-]{6,}")


def redact(text: str, secret: str | None = None) -> str:
    """``text`` with ``secret`` and anything shaped like an API key replaced by ``***``.

    Backend error texts are only ever logged locally, and even there without keys.
    """
    if secret:
        text = text.replace(secret, "***")
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend: where it is, its key, and which network models it serves.

    ``base_url`` is an OpenAI-compatible ``/v1`` root such as ``http://127.0.0.1:8080/v1``.
    ``api_key`` is sent as ``Authorization: Bearer …`` and never appears in ``repr``.
    ``models`` maps network model ids to the backend's own ids. ``timeout`` (seconds)
    bounds connecting and each wait for the next piece of the answer.
    ``allow_remote_media`` lets requests name remote image or audio URLs, for backends that
    do not fetch them (or fetch them safely); off, only inline ``data:`` URLs pass.
    """

    name: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    models: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 120.0
    #: Let http(s) image and audio URLs reach this backend (off: only inline data: URLs).
    allow_remote_media: bool = False


#: Concurrent requests per ``httpx.AsyncClient`` of an executor (see :func:`client_shards`).
REQUESTS_PER_CLIENT = 8


def client_shards(max_requests: int) -> list[httpx.AsyncClient]:
    """The HTTP clients an executor calls its backends with, for ``max_requests`` requests
    at once: one per ``REQUESTS_PER_CLIENT``, at most 16, each with its own pool.

    One client for everything costs time that grows with the square of the open
    connections: httpcore 1.0 walks every connection of its pool, and for each idle one
    every connection again, each time a request starts or ends (its
    ``_assign_requests_to_connections``); with 64 answers streaming that was ~9 % of the
    executor's CPU. Requests are spread over the shards in turn.
    """
    count = max(1, min(16, -(-max_requests // REQUESTS_PER_CLIENT)))
    per_client = -(-2 * max_requests // count)
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    return [httpx.AsyncClient(limits=limits) for _ in range(count)]


class OpenAIBackend:
    """An OpenAI-compatible HTTP backend, called through shared HTTP clients
    (one, or the shards of :func:`client_shards`, used in turn)."""

    def __init__(
        self, spec: BackendSpec, client: httpx.AsyncClient | Sequence[httpx.AsyncClient]
    ) -> None:
        self.spec = spec
        self._clients = [client] if isinstance(client, httpx.AsyncClient) else list(client)
        if not self._clients:
            raise ValueError("an OpenAIBackend needs at least one HTTP client")
        self._turn = 0
        self._base = spec.base_url.rstrip("/")
        self._timeout = httpx.Timeout(spec.timeout)

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client of the next request (the shards in turn)."""
        self._turn = (self._turn + 1) % len(self._clients)
        return self._clients[self._turn]

    def serves(self, model: str) -> bool:
        """Whether this backend serves network model ``model``."""
        return model in self.spec.models

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A complete chat completion (``POST {base}/chat/completions``, not streamed)."""
        return await self._post("/chat/completions", body)

    def chat_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Chat completion chunks, up to ``[DONE]``, with a usage chunk requested.

        An async generator: close it (``aclose``/``aclosing``) to abort the request.
        """
        return self._stream("/chat/completions", body)

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """A complete legacy completion (``POST {base}/completions``, not streamed)."""
        return await self._post("/completions", body)

    def completions_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Legacy completion chunks; an async generator like :meth:`chat_stream`."""
        return self._stream("/completions", body)

    async def list_models(self) -> list[str]:
        """The model ids the backend itself reports (``GET {base}/models``)."""
        with self._translated():
            response = await self.client.get(
                self._base + "/models", headers=self._headers(), timeout=self._timeout
            )
        listing = self._json_object(response).get("data")
        if not isinstance(listing, list):
            raise BackendError(f"backend {self.spec.name} listed models without a 'data' list")
        return [str(m["id"]) for m in listing if isinstance(m, dict) and "id" in m]

    def _headers(self) -> dict[str, str]:
        # A fresh dict per request: httpx-sse adds its own headers to the one it is given.
        return {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}

    def _outgoing(self, body: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        """The body to send: backend model id, ``stream`` set, usage asked for streams."""
        out = dict(body)
        out["model"] = self.spec.models.get(str(body["model"]), str(body["model"]))
        out["stream"] = stream
        if stream:
            given = out.get("stream_options")
            out["stream_options"] = {
                **(given if isinstance(given, Mapping) else {}),
                "include_usage": True,
            }
        else:
            out.pop("stream_options", None)
        return out

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """httpx failures as lloom backend errors."""
        name = self.spec.name
        try:
            yield
        except SSEError as exc:  # an httpx.TransportError, but the backend did answer
            raise BackendError(f"backend {name} did not stream SSE: {exc}") from None
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"backend {name} timed out: {exc!r}") from None
        except httpx.TransportError as exc:
            raise BackendUnreachable(f"backend {name} unreachable: {exc!r}") from None
        except httpx.HTTPError as exc:  # undecodable body, redirect loop
            raise BackendError(f"backend {name} failed: {exc!r}") from None

    def _json_object(self, response: httpx.Response) -> dict[str, Any]:
        """A read response's JSON object; HTTP errors and non-objects raise."""
        if response.status_code >= 400:
            raise BackendHTTPError(response.status_code, self._message(response))
        try:
            data = response.json()
        except ValueError:
            raise BackendError(f"backend {self.spec.name} answered non-JSON") from None
        if not isinstance(data, dict):
            raise BackendError(f"backend {self.spec.name} answered JSON that is not an object")
        return data

    async def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        with self._translated():
            response = await self.client.post(
                self._base + path,
                json=self._outgoing(body, stream=False),
                headers=self._headers(),
                timeout=self._timeout,
            )
        data = self._json_object(response)
        data["model"] = str(body["model"])
        return data

    async def _stream(
        self, path: str, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        network_model = str(body["model"])
        with self._translated():
            async with aclosing(self._events(path, body)) as events:
                async for data in events:
                    data["model"] = network_model
                    yield data

    async def _events(
        self, path: str, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The JSON objects of a backend's SSE stream, up to ``[DONE]``."""
        async with aconnect_sse(
            self.client,
            "POST",
            self._base + path,
            json=self._outgoing(body, stream=True),
            headers=self._headers(),
            timeout=self._timeout,
        ) as source:
            response = source.response
            if response.status_code >= 400:
                await response.aread()
                raise BackendHTTPError(response.status_code, self._message(response))
            done = False
            async with aclosing(source.aiter_sse()) as events:
                async for event in events:
                    # Read on after [DONE] to the end of the body, so the connection goes
                    # back to the pool cleanly.
                    if done or not event.data:
                        continue
                    if event.data.strip() == DONE:
                        done = True
                        continue
                    yield self._event(event.data)

    def _event(self, text: str) -> dict[str, Any]:
        """One SSE ``data:`` payload as a chunk object; error events raise."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise BackendError(
                f"backend {self.spec.name} sent a malformed stream event: {text[:80]!r}"
            ) from None
        if not isinstance(data, dict):
            raise BackendError(f"backend {self.spec.name} sent a non-object stream event")
        if "error" in data and "choices" not in data:
            # vLLM and OpenAI report failures after the headers as an error event.
            message = _openai_error(data) or json.dumps(data)[:MAX_MESSAGE]
            raise BackendHTTPError(502, redact(message[:MAX_MESSAGE], self.spec.api_key))
        return data

    def _message(self, response: httpx.Response) -> str:
        return redact(_error_message(response)[:MAX_MESSAGE], self.spec.api_key)


def _openai_error(body: object) -> str | None:
    """``error.message`` of an OpenAI error object (or a bare ``error`` string)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return None


def _error_message(response: httpx.Response) -> str:
    """What went wrong, from a read HTTP error response."""
    try:
        message = _openai_error(response.json())
    except ValueError:
        message = None
    return message or response.text[:MAX_MESSAGE] or response.reason_phrase
