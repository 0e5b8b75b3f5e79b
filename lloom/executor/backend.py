"""Calling an OpenAI-compatible backend (llama.cpp, vLLM, Ollama, LM Studio, OpenAI).

The executor knows models by their *network* id; each backend maps them to its own ids.
Requests are rewritten on the way in and responses on the way out, so clients only ever
see network ids. Streams are read with httpx-sse and always closed, also when the
consumer stops early. httpx failures become :mod:`lloom.errors` backend errors.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from lloom.errors import BackendError, BackendHTTPError, BackendTimeout, BackendUnreachable


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend: where it is, its key, and which network models it serves."""

    name: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    #: network model id -> backend model id
    models: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 120.0


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return json.dumps(body)[:500]


class OpenAIBackend:
    """An OpenAI-compatible HTTP backend."""

    def __init__(self, spec: BackendSpec, client: httpx.AsyncClient) -> None:
        self.spec = spec
        self.client = client
        self.base = spec.base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self.timeout = httpx.Timeout(spec.timeout, connect=min(10.0, spec.timeout))

    def serves(self, model: str) -> bool:
        """Whether this backend serves network model ``model``."""
        return model in self.spec.models

    def _outgoing(self, body: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        out = dict(body)
        out["model"] = self.spec.models.get(str(body["model"]), str(body["model"]))
        out["stream"] = stream
        if stream:
            options = dict(out.get("stream_options") or {})
            options["include_usage"] = True
            out["stream_options"] = options
        else:
            out.pop("stream_options", None)
        return out

    @staticmethod
    def _incoming(data: dict[str, Any], network_model: str) -> dict[str, Any]:
        if "model" in data:
            data["model"] = network_model
        return data

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """httpx transport failures as lloom backend errors (local vs remote kept)."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"backend {self.spec.name} timed out: {exc!r}") from None
        except httpx.TransportError as exc:
            raise BackendUnreachable(f"backend {self.spec.name} unreachable: {exc!r}") from None

    async def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        with self._translated():
            response = await self.client.post(
                self.base + path,
                json=self._outgoing(body, stream=False),
                headers=self.headers,
                timeout=self.timeout,
            )
        if response.status_code >= 400:
            raise BackendHTTPError(response.status_code, _error_message(response))
        try:
            data = response.json()
        except ValueError:
            raise BackendError(f"backend {self.spec.name} answered non-JSON") from None
        if not isinstance(data, dict):
            raise BackendError(f"backend {self.spec.name} answered a non-object")
        return self._incoming(data, str(body["model"]))

    async def _stream(
        self, path: str, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        network_model = str(body["model"])
        try:
            with self._translated():
                async with aclosing(self._events(path, body)) as events:
                    async for data in events:
                        yield self._incoming(data, network_model)
        except SSEError as exc:
            raise BackendError(f"backend {self.spec.name} did not stream SSE: {exc}") from None

    async def _events(
        self, path: str, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The JSON objects of a backend's SSE stream, up to ``[DONE]``."""
        async with aconnect_sse(
            self.client,
            "POST",
            self.base + path,
            json=self._outgoing(body, stream=True),
            headers=self.headers,
            timeout=self.timeout,
        ) as source:
            response = source.response
            if response.status_code >= 400:
                await response.aread()
                raise BackendHTTPError(response.status_code, _error_message(response))
            done = False
            async with aclosing(source.aiter_sse()) as events:
                async for event in events:
                    # Read on after [DONE] to the end of the body, so the connection goes
                    # back to the pool cleanly.
                    if done or not event.data:
                        continue
                    if event.data.strip() == "[DONE]":
                        done = True
                        continue
                    yield self._event(event.data)

    def _event(self, text: str) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise BackendError(f"backend {self.spec.name} sent a malformed stream event") from None
        if not isinstance(data, dict):
            raise BackendError(f"backend {self.spec.name} sent a non-object event")
        if "error" in data and "choices" not in data:
            raise BackendHTTPError(502, str(data["error"])[:500])
        return data

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A complete chat completion."""
        return await self._post("/chat/completions", body)

    def chat_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Chat completion chunks (usage requested); close it to abort the request."""
        return self._stream("/chat/completions", body)

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """A complete legacy completion."""
        return await self._post("/completions", body)

    def completions_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Legacy completion chunks."""
        return self._stream("/completions", body)

    async def list_models(self) -> list[str]:
        """Model ids the backend itself reports (``GET /models``)."""
        with self._translated():
            response = await self.client.get(
                self.base + "/models", headers=self.headers, timeout=self.timeout
            )
        if response.status_code >= 400:
            raise BackendHTTPError(response.status_code, _error_message(response))
        data = response.json()
        return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]
