"""Mid-stream resume, for real: an executor killed in the middle of a streamed answer at
temperature 0, and the openai SDK still gets one complete, uninterrupted answer through the
gateway, with each executor billing what it delivered (issue 10, item 4)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import openai
import pytest

from lloom.protocol import billing
from tests.support.network import (
    eventually,
    start_executor,
    start_gateway,
    start_mock,
    start_validator,
)
from tests.support.procs import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

REPLY = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
STALL_AFTER = 5
FAST_CHECKPOINTS = "[limits]\ncheckpoint_secs = 0.2\n"


def rows(data_dir: Path) -> list[tuple[str, int, int]]:
    """(state, prompt, completion) of every usage row in an executor's store."""
    db = sqlite3.connect(f"file:{data_dir / 'usage.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT state, prompt_tokens, completion_tokens FROM usage").fetchall()
    finally:
        db.close()


def test_an_executor_killed_mid_stream_is_continued_elsewhere(procs: Processes) -> None:
    _, stuck_url = start_mock(procs, "mock-stuck", "--reply", REPLY, "--stall-after", "5")
    _, good_url = start_mock(procs, "mock-good", "--reply", REPLY)
    _, v = start_validator(procs)
    boot = v.listen[0]
    first, _, first_dir = start_executor(
        procs, "first", boot, stuck_url, ["mock-a"], extra=FAST_CHECKPOINTS
    )
    _, base = start_gateway(procs, boot)
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="mock-a",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        temperature=0,
    )
    pieces: list[str] = []
    ids: set[str] = set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if len(pieces) == STALL_AFTER:
            break
    delivered = "".join(pieces)
    assert delivered == "one two three four five "

    # The first executor checkpointed what it delivered; a second one joins; the first dies.
    def checkpointed() -> bool:
        found = rows(first_dir)
        return len(found) == 1 and found[0][::2] == ("open", billing.count(delivered))

    eventually(checkpointed, what="the first executor's checkpoint of the delivered text")
    start_executor(procs, "second", boot, good_url, ["mock-a"])
    first.kill()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == REPLY  # one stream, nothing repeated, nothing missing
    assert len(ids) == 1  # every chunk carries the first executor's id
    [(state, prompt_first, completion_first)] = rows(first_dir)
    assert state == "open"  # a killed executor's row; its next start marks it partial
    second_dir = procs.root / "second" / "state"
    eventually(lambda: len(rows(second_dir)) == 1, what="the second executor's usage row")
    [(state, prompt_second, completion_second)] = rows(second_dir)
    assert state == "complete" and prompt_second == prompt_first
    assert completion_first + completion_second == billing.count(REPLY)


def test_a_sampled_answer_is_not_continued_and_says_why(procs: Processes) -> None:
    _, stuck_url = start_mock(procs, "mock-stuck", "--reply", REPLY, "--stall-after", "5")
    _, good_url = start_mock(procs, "mock-good", "--reply", REPLY)
    _, v = start_validator(procs)
    boot = v.listen[0]
    first, _, _ = start_executor(procs, "first", boot, stuck_url, ["mock-a"])
    _, base = start_gateway(procs, boot)
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="mock-a", messages=[{"role": "user", "content": "x"}], stream=True
    )
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if len(pieces) == STALL_AFTER:
            break
    start_executor(procs, "second", boot, good_url, ["mock-a"])  # it could, but must not
    first.kill()
    with pytest.raises(openai.APIError, match="temperature 0 or a seed"):
        for _ in stream:
            pass
