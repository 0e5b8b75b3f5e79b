"""Strict reading of TOML config tables: typed fields, unknown fields refused, and one-line
errors naming the file and the field path (``config.toml: node.listen: expected a list``)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from lloom.errors import ConfigError


def load_toml(path: Path) -> dict[str, Any]:
    """Parse the TOML file at ``path``; :class:`ConfigError` naming the file otherwise."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    return parse_toml(text, str(path))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML ``text``; :class:`ConfigError` naming ``source`` otherwise."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None


class TableReader:
    """Typed access to one TOML table with field paths for errors; call :meth:`finish`
    at the end to refuse unknown fields."""

    def __init__(self, source: str, path: str, table: object) -> None:
        self.source = source
        self.path = path
        if not isinstance(table, dict):
            raise self.error("expected a table")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def error(self, message: str, key: str | None = None) -> ConfigError:
        """A :class:`ConfigError` about this table or one of its ``key``."""
        where = self.path if key is None else (f"{self.path}.{key}" if self.path else key)
        return ConfigError(f"{self.source}: {where or '(top level)'}: {message}")

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = ..., what: str = ""
    ) -> Any:
        """The value of ``key`` checked against ``kind`` (``default`` when absent;
        required when no default is given)."""
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.error("is required", key)
            return default
        value = self.table[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.error(f"expected {what or kind_name(kind)}", key)
        if not isinstance(value, kind):
            raise self.error(f"expected {what or kind_name(kind)}", key)
        return value

    def positive(self, key: str, default: float, integer: bool = False) -> Any:
        """A number (an integer when ``integer``) greater than zero."""
        kind: type | tuple[type, ...] = int if integer else (int, float)
        value = self.get(key, kind, default)
        if value <= 0:
            raise self.error("must be positive", key)
        return value

    def child(self, key: str) -> str:
        """The field path of the sub-table ``key``."""
        return f"{self.path}.{key}" if self.path else key

    def finish(self) -> None:
        """Refuse any field that was not read."""
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(f"unknown field '{unknown[0]}'")


def kind_name(kind: type | tuple[type, ...]) -> str:
    """How an error message names a TOML type."""
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a table",
        bool: "true or false",
    }
    if isinstance(kind, tuple):
        return "a number" if set(kind) == {int, float} else " or ".join(names[k] for k in kind)
    return names.get(kind, kind.__name__)


def strings(r: TableReader, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of strings."""
    values = r.get(key, list, list(default))
    if not all(isinstance(v, str) for v in values):
        raise r.error("expected a list of strings", key)
    return tuple(values)
