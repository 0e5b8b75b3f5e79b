"""Readiness of the devnet's HTTP services, read from their ``GET /v1/models``."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from lloom.devnet.supervisor import Child
from lloom.errors import DevnetError

#: Pause between two looks at a service that is not ready yet.
POLL_SECS = 0.2


async def wait_for_models(
    base_url: str,
    *,
    timeout: float,
    child: Child | None = None,
    model: str | None = None,
    api_key: str | None = None,
) -> None:
    """Wait until ``GET {base_url}/models`` answers 200, and lists ``model`` if given.

    A model server is ready once it answers (its model is loaded); the gateway once it lists
    the model (it has found an executor). Fails early if ``child`` (the service) exits.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/models"
    last = ["no answer"]
    async with httpx.AsyncClient(timeout=5.0, headers=headers) as http:
        with trio.move_on_after(timeout) as scope:
            await _poll(http, url, child, model, last)
    if not scope.cancelled_caught:
        return
    wanted = f"listing {model}" if model else "ready"
    raise DevnetError(f"{url} not {wanted} within {timeout:.0f} s (last: {last[0]})")


async def _poll(
    http: httpx.AsyncClient, url: str, child: Child | None, model: str | None, last: list[str]
) -> None:
    """Return once ``url`` is ready; ``last[0]`` says what the latest look saw."""
    while True:
        if child is not None and child.returncode is not None:
            raise DevnetError(
                f"{child.name} exited (code {child.returncode}); its log "
                f"{child.log_path} ends with:\n{child.log_tail()}"
            )
        try:
            response = await http.get(url)
            last[0] = f"HTTP {response.status_code}"
            if response.status_code == 200 and (model is None or _lists(response, model)):
                return
        except httpx.HTTPError as exc:
            last[0] = type(exc).__name__
        await trio.sleep(POLL_SECS)


def _lists(response: httpx.Response, model: str) -> bool:
    try:
        data: Any = response.json().get("data", [])
    except (ValueError, AttributeError):
        return False
    return isinstance(data, list) and any(
        isinstance(m, dict) and m.get("id") == model for m in data
    )
