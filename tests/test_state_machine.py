"""The download state machine and the validators that guard model ids and file names."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

import pytest

from kernel.lifecycle import TRANSITIONS, check_transition
from kernel.validation import validate_filename, validate_model_id
from kernel.errors import InvalidRequest
from kernel.types import STATUSES, TERMINAL

LEGAL: dict[str, set[str]] = {
    "queued": {"downloading", "paused", "cancelled", "failed"},
    "downloading": {"queued", "paused", "creating_engine", "completed", "failed", "cancelled"},
    "paused": {"queued", "downloading", "cancelled"},
    "creating_engine": {"completed", "failed", "cancelled"},
    "completed": set(),
    "failed": set(),
    "cancelled": set(),
}

ALL_PAIRS = list(itertools.product(STATUSES, repeat=2))
LEGAL_PAIRS = [(old, new) for old, new in ALL_PAIRS if new in LEGAL[old]]
ILLEGAL_PAIRS = [(old, new) for old, new in ALL_PAIRS if new not in LEGAL[old]]


# --- transitions ----------------------------------------------------------------------------


def test_the_seven_statuses_are_the_ones_the_architecture_names() -> None:
    assert set(STATUSES) == set(LEGAL)
    assert len(STATUSES) == 7
    assert set(TRANSITIONS) == set(LEGAL)


def test_the_transition_table_matches_the_architecture() -> None:
    assert {old: set(news) for old, news in TRANSITIONS.items()} == LEGAL


@pytest.mark.parametrize(("old", "new"), LEGAL_PAIRS, ids=[f"{o}->{n}" for o, n in LEGAL_PAIRS])
def test_a_legal_transition_passes(old: str, new: str) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"), ILLEGAL_PAIRS, ids=[f"{o}->{n}" for o, n in ILLEGAL_PAIRS]
)
def test_an_illegal_transition_raises_and_names_both_statuses(old: str, new: str) -> None:
    with pytest.raises(Exception, match=f"{old} -> {new}"):
        check_transition(old, new)


def test_every_pair_is_either_legal_or_illegal() -> None:
    assert len(LEGAL_PAIRS) + len(ILLEGAL_PAIRS) == 49
    assert len(LEGAL_PAIRS) == 16


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_a_terminal_status_leads_nowhere_not_even_to_itself(terminal: str) -> None:
    for new in STATUSES:
        with pytest.raises(Exception, match=f"{terminal} -> {new}"):
            check_transition(terminal, new)


def test_no_status_transitions_to_itself() -> None:
    for status in STATUSES:
        assert status not in TRANSITIONS[status]


def test_every_non_terminal_status_can_be_cancelled() -> None:
    for status in STATUSES:
        if status not in TERMINAL:
            check_transition(status, "cancelled")


# --- model ids ------------------------------------------------------------------------------

VALID_IDS = [
    "a",
    "Z",
    "0",
    "Qwen2.5-0.5B:q4@main+x",
    "a" * 128,
    "model_name.v2",
]

INVALID_IDS = [
    pytest.param("", id="empty"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("-dash", id="leading-dash"),
    pytest.param("../etc", id="parent-dir"),
    pytest.param("a/b", id="slash"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("a b", id="space"),
    pytest.param("a\x00", id="nul"),
    pytest.param("a" * 129, id="129-chars"),
    pytest.param("é", id="non-ascii"),
    pytest.param("aé", id="non-ascii-after-first"),
]


@pytest.mark.parametrize("model_id", VALID_IDS, ids=lambda v: v[:20])
def test_a_valid_model_id_is_accepted(model_id: str) -> None:
    assert validate_model_id(model_id) is None


@pytest.mark.parametrize("model_id", INVALID_IDS)
def test_an_invalid_model_id_is_rejected_with_param_model_id(model_id: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_model_id(model_id)
    assert info.value.param == "model_id"
    assert info.value.code is None
    assert info.value.message


@pytest.mark.parametrize("model_id", INVALID_IDS)
def test_an_invalid_path_id_carries_the_given_param_and_code(model_id: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_model_id(model_id, param="path", code="invalid_path_format")
    assert info.value.param == "path"
    assert info.value.code == "invalid_path_format"


def test_the_rejection_message_quotes_a_long_id_only_partly() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_model_id("x" * 10_000 + "/")
    assert len(info.value.message) < 400


@pytest.mark.parametrize("model_id", ["a\n", "Qwen2.5\n"])
def test_a_model_id_with_a_trailing_newline_is_rejected(model_id: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_model_id(model_id)


# --- file names -----------------------------------------------------------------------------

BAD_FILENAMES = [
    pytest.param("", id="empty"),
    pytest.param(".", id="dot"),
    pytest.param("..", id="dot-dot"),
    pytest.param("a/b", id="slash"),
    pytest.param("../model.gguf", id="parent-dir"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("model.gguf\n", id="trailing-newline"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a\x7fb", id="del"),
    pytest.param("a\u200bb", id="zero-width-space"),
    pytest.param("a" * 256, id="256-bytes"),
    pytest.param("a" * 251, id="251-bytes-the-part-file-would-not-fit"),
    pytest.param("é" * 128, id="256-bytes-in-128-chars"),
]


@pytest.mark.parametrize("name", BAD_FILENAMES)
def test_a_dangerous_file_name_is_rejected_with_param_filename(name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_filename(name)
    assert info.value.param == "filename"


@pytest.mark.parametrize(
    "name", ["model.Q4_K_M.gguf", "a" * 250, "é" * 124 + "ab", "..model", "a..b", "modèle.gguf"]
)
def test_a_safe_file_name_is_returned_unchanged(name: str) -> None:
    assert validate_filename(name) == name


def test_a_rejected_file_name_names_the_given_param() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_filename("a/b", param="path")
    assert info.value.param == "path"


# --- progress events: at most 4 a second, and the last bytes are never held back ----------


def _progress_lifecycle() -> tuple[Any, Any, Any]:
    from kernel.events import EventBus
    from kernel.lifecycle import Lifecycle
    from kernel.types import DownloadRecord
    from tests.helpers.fakes import MemoryStore

    bus = EventBus()
    rec = DownloadRecord(model_id="m", url="https://example.com/m.bin", local_path="/x/m.bin")
    rec.status = "downloading"
    return Lifecycle(MemoryStore(), bus), bus, rec


async def _progress_seen(sub: Any, wanted: int, seconds: float) -> list[int]:
    """downloaded_bytes of every progress event until one shows ``wanted`` (or the deadline)."""
    from kernel.types import DownloadProgress

    seen: list[int] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while not seen or seen[-1] != wanted:
                envelope = await sub.get()
                if isinstance(envelope.event, DownloadProgress):
                    seen.append(envelope.event.record.downloaded_bytes)
    return seen


async def test_progress_held_back_by_the_interval_is_published_when_it_ends() -> None:
    """Two reports inside one interval, then silence (a stall, a retry's backoff): the first is
    published at once, the second when the interval ends, not never."""
    lifecycle, bus, rec = _progress_lifecycle()
    with bus.subscribe() as sub:
        rec.downloaded_bytes = 100
        lifecycle.progress(rec)
        rec.downloaded_bytes = 200
        lifecycle.progress(rec)
        began = time.monotonic()
        seen = await _progress_seen(sub, 200, seconds=2)
    assert seen == [100, 200]
    assert time.monotonic() - began >= 0.2  # it waited for the interval to end


async def test_progress_stays_at_most_four_a_second_with_a_report_every_millisecond() -> None:
    lifecycle, bus, rec = _progress_lifecycle()
    with bus.subscribe() as sub:
        began = time.monotonic()
        while time.monotonic() - began < 1.0:
            rec.downloaded_bytes += 1
            lifecycle.progress(rec)
            await asyncio.sleep(0.001)  # paces the reports: this is the load, not a wait
        last = rec.downloaded_bytes
        seen = await _progress_seen(sub, last, seconds=2)
    assert seen[-1] == last
    assert len(seen) <= 6  # 1 s of reports (at most 5 intervals begun) plus the trailing one
    assert seen == sorted(seen)


async def test_nothing_held_back_is_published_after_the_run_ended() -> None:
    lifecycle, bus, rec = _progress_lifecycle()
    with bus.subscribe() as sub:
        rec.downloaded_bytes = 100
        lifecycle.progress(rec)
        rec.downloaded_bytes = 200
        lifecycle.progress(rec)
        rec.status = "paused"  # the status event carries the last numbers
        lifecycle.run_ended(rec.model_id)
        seen = await _progress_seen(sub, 200, seconds=0.6)
    assert seen == [100]
