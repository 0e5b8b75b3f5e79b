"""The gateway's API keys: who may spend its owner's key, and how much.

Every request the gateway serves is signed for, on chain, by the gateway owner's key; so a
gateway that others can reach needs keys. Keys come from

- ``--api-key KEY`` (named ``default``; visible in the process list, prefer the others),
- the ``LLOOM_GATEWAY_API_KEYS`` environment variable (``KEY`` or ``name=KEY``, comma
  separated), or
- a keys file (``--keys-file``, TOML, mode 0600), one table per named key with its limits::

      [keys.alice]
      key = "llm-…"                 # lloom keys new prints one
      requests_per_minute = 60     # optional
      tokens_per_day = 200000      # optional (prompt + completion, UTC day)

A presented key is compared with every known key in constant time (``hmac.compare_digest``
on SHA-256 digests, no early exit), so timing tells nothing about which bytes matched.
Limits are pure code with the clock passed in (:class:`Limiter`); usage per key and day is
kept in SQLite in the gateway's data dir, so a restart does not reset a daily limit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import tomllib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lloom.errors import ConfigError, RateLimited, Unauthorized
from lloom.paths import exposed_to_others
from lloom.sqlite import open_private_db

#: Environment variable holding keys (``KEY`` or ``name=KEY``, comma separated).
ENV_KEYS = "LLOOM_GATEWAY_API_KEYS"
#: Shortest key accepted: anything shorter can be guessed.
MIN_KEY_LENGTH = 16
#: Prefix of keys made by :func:`new_key`.
KEY_PREFIX = "llm-"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One named key and its limits (None: unlimited)."""

    name: str
    secret: str = field(repr=False)
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_LENGTH:
            raise ConfigError(
                f"API key {self.name!r} is shorter than {MIN_KEY_LENGTH} characters; "
                "make one with: lloom keys new"
            )


def new_key() -> str:
    """A fresh random key (192 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


class KeyRing:
    """The keys a gateway accepts."""

    def __init__(self, keys: list[ApiKey]) -> None:
        names = [k.name for k in keys]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"API key name {name!r} is given twice")
        self.keys = keys
        self._digests = [(hashlib.sha256(k.secret.encode()).digest(), k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey:
        """The key ``presented`` is; raises :class:`Unauthorized`."""
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).digest()
        found: ApiKey | None = None
        for known, key in self._digests:  # every key is compared: no early exit
            if hmac.compare_digest(digest, known):
                found = key
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an ``Authorization: Bearer …`` header; raises :class:`Unauthorized`."""
        if not authorization:
            raise Unauthorized(
                "missing API key: send it as 'Authorization: Bearer <key>' "
                "(the openai SDK's api_key)"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        return self.find(token.strip())


def _positive(table: Mapping[str, object], key: str, where: str) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}.{key}: must be a positive integer")
    return value


def parse_keys_file(text: str, source: str) -> list[ApiKey]:
    """The keys of a keys file's text (see the module doc)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    tables = doc.get("keys")
    if set(doc) - {"keys"} or not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{source}: expected one or more [keys.<name>] tables and nothing else")
    out = []
    for name, table in tables.items():
        where = f"{source}: keys.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(table) - {"key", "requests_per_minute", "tokens_per_day"}
        if unknown:
            raise ConfigError(f"{where}: unknown field '{sorted(unknown)[0]}'")
        secret = table.get("key")
        if not isinstance(secret, str):
            raise ConfigError(f"{where}.key: expected a string")
        out.append(
            ApiKey(
                name,
                secret,
                _positive(table, "requests_per_minute", where),
                _positive(table, "tokens_per_day", where),
            )
        )
    return out


def load_keys(flag: str | None, keys_file: Path | None, env: Mapping[str, str]) -> KeyRing:
    """Every key given by flag, environment and keys file (see the module doc)."""
    keys: list[ApiKey] = []
    if flag:
        keys.append(ApiKey("default", flag))
    for i, item in enumerate(p.strip() for p in env.get(ENV_KEYS, "").split(",")):
        if item:
            name, sep, secret = item.partition("=")
            keys.append(ApiKey(name, secret) if sep else ApiKey(f"env{i + 1}", item))
    if keys_file is not None:
        exposed = exposed_to_others(keys_file)
        if exposed is not None:
            raise ConfigError(f"keys file {exposed}")
        try:
            text = keys_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read keys file {keys_file}: {exc}") from None
        keys.extend(parse_keys_file(text, str(keys_file)))
    return KeyRing(keys)


@dataclass(frozen=True, slots=True)
class Quota:
    """Where a key stands against its limits, as OpenAI's ``x-ratelimit-*`` headers."""

    requests_limit: int | None
    requests_remaining: int | None
    requests_reset_secs: float
    tokens_limit: int | None
    tokens_remaining: int | None
    tokens_reset_secs: float

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers (only for limits the key has)."""
        out: dict[str, str] = {}
        if self.requests_limit is not None:
            out["x-ratelimit-limit-requests"] = str(self.requests_limit)
            out["x-ratelimit-remaining-requests"] = str(self.requests_remaining)
            out["x-ratelimit-reset-requests"] = f"{self.requests_reset_secs:.3f}s"
        if self.tokens_limit is not None:
            out["x-ratelimit-limit-tokens"] = str(self.tokens_limit)
            out["x-ratelimit-remaining-tokens"] = str(self.tokens_remaining)
            out["x-ratelimit-reset-tokens"] = f"{self.tokens_reset_secs:.0f}s"
        return out


def utc_day(now: float) -> int:
    """Days since the epoch, in UTC."""
    return int(now // 86400)


class Limiter:
    """Requests per minute (a sliding window) and tokens per UTC day, per key.

    Pure: every call takes ``now`` (Unix seconds). The token count of a request is known
    only at its end, so a key can pass its daily limit by one request, never by two.
    """

    def __init__(self) -> None:
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, tuple[int, int]] = {}  # name -> (day, tokens)

    def tokens_today(self, name: str, now: float) -> int:
        """Tokens ``name`` used on the current UTC day."""
        day, used = self._tokens.get(name, (utc_day(now), 0))
        return used if day == utc_day(now) else 0

    def set_tokens(self, name: str, now: float, used: int) -> None:
        """Start from ``used`` tokens today (what the usage database holds)."""
        self._tokens[name] = (utc_day(now), used)

    def add_tokens(self, name: str, now: float, tokens: int) -> None:
        """Count ``tokens`` of a finished request."""
        self._tokens[name] = (utc_day(now), self.tokens_today(name, now) + tokens)

    def admit(self, key: ApiKey, now: float) -> Quota:
        """Let one request of ``key`` in, or raise :class:`RateLimited`."""
        window = self._requests.setdefault(key.name, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        tokens = self.tokens_today(key.name, now)
        day_ends = (utc_day(now) + 1) * 86400 - now
        if key.tokens_per_day is not None and tokens >= key.tokens_per_day:
            raise RateLimited(
                f"API key {key.name!r} used its {key.tokens_per_day} tokens for today (UTC)",
                retry_after=day_ends,
            )
        if key.requests_per_minute is not None and len(window) >= key.requests_per_minute:
            raise RateLimited(
                f"API key {key.name!r} is over {key.requests_per_minute} requests per minute",
                retry_after=window[0] + 60 - now,
            )
        window.append(now)
        return Quota(
            key.requests_per_minute,
            None if key.requests_per_minute is None else key.requests_per_minute - len(window),
            window[0] + 60 - now,
            key.tokens_per_day,
            None if key.tokens_per_day is None else max(0, key.tokens_per_day - tokens),
            day_ends,
        )


class KeyUsage:
    """Requests and tokens per key and UTC day, in SQLite (thread-safe; file mode 0600)."""

    def __init__(self, path: Path) -> None:
        self._db = open_private_db(
            path,
            "CREATE TABLE IF NOT EXISTS key_usage (key TEXT NOT NULL, day INTEGER NOT NULL, "
            "requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, "
            "completion_tokens INTEGER NOT NULL, PRIMARY KEY (key, day));",
        )
        self._lock = threading.Lock()

    def add(self, name: str, now: float, prompt: int, completion: int) -> None:
        """Count one finished request of key ``name``."""
        with self._lock:
            self._db.execute(
                "INSERT INTO key_usage VALUES (?, ?, 1, ?, ?) ON CONFLICT (key, day) DO UPDATE "
                "SET requests = requests + 1, "
                "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens",
                (name, utc_day(now), prompt, completion),
            )

    def today(self, now: float) -> dict[str, int]:
        """Tokens per key on the current UTC day."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, prompt_tokens + completion_tokens FROM key_usage WHERE day = ?",
                (utc_day(now),),
            ).fetchall()
        return {str(k): int(t) for k, t in rows}

    def rows(self, since_day: int = 0) -> list[tuple[str, int, int, int, int]]:
        """(key, day, requests, prompt tokens, completion tokens), newest day first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, day, requests, prompt_tokens, completion_tokens FROM key_usage "
                "WHERE day >= ? ORDER BY day DESC, key",
                (since_day,),
            ).fetchall()
        return [(str(k), int(d), int(r), int(p), int(c)) for k, d, r, p, c in rows]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


def now() -> float:
    """Wall-clock seconds (the limits' clock)."""
    return time.time()
