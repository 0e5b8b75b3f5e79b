"""Executors' load announcements on gossipsub topic ``lloom/executors/v1`` (pure code).

An executor publishes, every few seconds and when its load changes, a JSON object::

    {"v": 1, "models": ["smollm2"], "active": 3, "max": 16, "ts": 1764000000.0}

The sender is not in the payload: the gossipsub message's signed source (``from``) is the
executor's PeerId, so an announcement cannot speak for another peer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from lloom.dhtkeys import validate_model_id
from lloom.errors import ProtocolError, UsageError
from lloom.protocol.safejson import safe_loads

TOPIC = "lloom/executors/v1"
MAX_MODELS = 256


@dataclass(frozen=True, slots=True)
class LoadAnnouncement:
    """What an executor serves and how busy it is."""

    models: tuple[str, ...]
    active: int
    max: int
    ts: float

    @property
    def load(self) -> float:
        """Fraction of capacity in use, 0..1."""
        return min(1.0, self.active / self.max) if self.max else 1.0

    def encode(self) -> bytes:
        """The message payload."""
        return json.dumps(
            {
                "v": 1,
                "models": list(self.models),
                "active": self.active,
                "max": self.max,
                "ts": self.ts,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> LoadAnnouncement:
        """Parse and validate a payload; raises :class:`ProtocolError`."""
        obj = safe_loads(data, "announcement")
        if not isinstance(obj, dict) or obj.get("v") != 1:
            raise ProtocolError("announcement is not a v1 object")
        models, active, cap, ts = (
            obj.get("models"),
            obj.get("active"),
            obj.get("max"),
            obj.get("ts"),
        )
        if not isinstance(models, list) or len(models) > MAX_MODELS:
            raise ProtocolError("announcement models must be a list")
        try:
            checked = tuple(validate_model_id(m) for m in models if isinstance(m, str))
        except UsageError as exc:
            raise ProtocolError(str(exc)) from None
        if len(checked) != len(models):
            raise ProtocolError("announcement models must be strings")
        for name, value in (("active", active), ("max", cap)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProtocolError(f"announcement {name} must be a non-negative integer")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
            raise ProtocolError("announcement ts must be a number")
        return cls(checked, active, cap, float(ts))  # type: ignore[arg-type]
