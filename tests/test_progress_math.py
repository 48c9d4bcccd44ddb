"""Progress, speed, ETA and the Download object built from a record (API.md, "Download object")."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from kernel.api.schemas import Download, eta_seconds, percentage, speed_bps
from kernel.types import STATUSES, TERMINAL, DownloadRecord, EngineSpec

NOW = 1_700_000_100_000  # ms since the epoch; fixed so every number below is exact
START = NOW - 100_000  # the download began 100 s ago


def record(**fields: Any) -> DownloadRecord:
    base: dict[str, Any] = {
        "model_id": "m",
        "url": "http://127.0.0.1:1/m.gguf",
        "local_path": "/models/m/m.gguf",
        "status": "downloading",
        "start_time": START,
        "created_at": START,
    }
    return DownloadRecord(**(base | fields))


def wire(rec: DownloadRecord, **kwargs: Any) -> dict[str, Any]:
    """The JSON a client sees, decoded back to plain dicts."""
    out = msgspec.json.decode(msgspec.json.encode(Download.from_record(rec, now=NOW, **kwargs)))
    assert isinstance(out, dict)
    return out


# --- percentage -----------------------------------------------------------------------------


def test_percentage_is_zero_when_the_total_is_unknown() -> None:
    assert percentage(0, 0) == 0.0
    assert percentage(500, 0) == 0.0


def test_percentage_is_zero_when_the_total_or_downloaded_is_negative() -> None:
    assert percentage(10, -1) == 0.0
    assert percentage(-10, 100) == 0.0


@pytest.mark.parametrize(
    ("downloaded", "total", "expected"),
    [(0, 100, 0.0), (25, 100, 25.0), (1, 3, 100 / 3), (100, 100, 100.0), (1, 10**12, 1e-10)],
)
def test_percentage_is_downloaded_over_total_times_100(
    downloaded: int, total: int, expected: float
) -> None:
    assert percentage(downloaded, total) == pytest.approx(expected)
    assert isinstance(percentage(downloaded, total), float)


@pytest.mark.parametrize(("downloaded", "total"), [(101, 100), (10**18, 1), (2**62, 2**61)])
def test_percentage_never_exceeds_100_even_when_more_than_the_total_arrived(
    downloaded: int, total: int
) -> None:
    assert percentage(downloaded, total) == 100.0


@pytest.mark.parametrize(
    ("downloaded", "total"),
    [(0, 0), (1, 0), (-1, 0), (0, -1), (2**63 - 1, 1), (1, 2**63 - 1), (2**63 - 1, 2**63 - 1)],
)
def test_percentage_is_never_nan_or_infinite(downloaded: int, total: int) -> None:
    value = percentage(downloaded, total)
    assert math.isfinite(value)
    assert 0.0 <= value <= 100.0


# --- speed ----------------------------------------------------------------------------------


def test_speed_is_zero_when_no_time_has_elapsed() -> None:
    rec = record(run_started_at=NOW, downloaded_bytes=1000)
    assert speed_bps(rec, NOW) == 0.0


def test_speed_is_zero_when_the_clock_reads_before_the_run_started() -> None:
    rec = record(run_started_at=NOW + 5000, downloaded_bytes=1000)
    assert speed_bps(rec, NOW) == 0.0


def test_speed_is_zero_when_the_run_has_not_started() -> None:
    rec = record(run_started_at=0, downloaded_bytes=1000)
    assert speed_bps(rec, NOW) == 0.0


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "downloading"])
def test_speed_is_zero_unless_downloading(status: str) -> None:
    rec = record(status=status, run_started_at=NOW - 10_000, downloaded_bytes=10_000)
    assert speed_bps(rec, NOW) == 0.0


def test_speed_is_the_average_over_the_run() -> None:
    rec = record(run_started_at=NOW - 4000, downloaded_bytes=8000)
    assert speed_bps(rec, NOW) == pytest.approx(2000.0)


def test_a_resumed_download_counts_only_the_bytes_of_this_run() -> None:
    # 1 MB came in an earlier run; this run began 2 s ago at byte 1_000_000 and added 500 kB.
    rec = record(
        run_started_at=NOW - 2000, run_start_bytes=1_000_000, downloaded_bytes=1_500_000
    )
    assert speed_bps(rec, NOW) == pytest.approx(250_000.0)


def test_speed_is_measured_from_the_run_start_not_the_download_start() -> None:
    rec = record(start_time=NOW - 3_600_000, run_started_at=NOW - 1000, downloaded_bytes=1000)
    assert speed_bps(rec, NOW) == pytest.approx(1000.0)


def test_speed_is_never_negative_after_a_restart_from_byte_zero() -> None:
    rec = record(run_started_at=NOW - 1000, run_start_bytes=5000, downloaded_bytes=100)
    assert speed_bps(rec, NOW) == 0.0


# --- estimated remaining seconds ------------------------------------------------------------


def test_eta_is_remaining_bytes_over_speed_rounded_up() -> None:
    rec = record(total_bytes=10_000, downloaded_bytes=2_500)
    assert eta_seconds(rec, 1000.0) == 8  # 7.5 s -> 8


def test_eta_is_zero_not_negative_when_more_than_the_total_arrived() -> None:
    rec = record(total_bytes=100, downloaded_bytes=150)
    assert eta_seconds(rec, 10.0) == 0


@pytest.mark.parametrize("speed", [0.0, -1.0])
def test_eta_is_absent_without_speed(speed: float) -> None:
    rec = record(total_bytes=10_000, downloaded_bytes=2_500)
    assert eta_seconds(rec, speed) is msgspec.UNSET


def test_eta_is_absent_when_the_total_is_unknown() -> None:
    rec = record(total_bytes=0, downloaded_bytes=2_500)
    assert eta_seconds(rec, 1000.0) is msgspec.UNSET


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "downloading"])
def test_eta_is_absent_unless_downloading(status: str) -> None:
    rec = record(status=status, total_bytes=10_000, downloaded_bytes=2_500)
    assert eta_seconds(rec, 1000.0) is msgspec.UNSET


def test_eta_appears_in_timing_while_downloading_with_speed_and_total() -> None:
    rec = record(run_started_at=NOW - 2000, downloaded_bytes=2000, total_bytes=10_000)
    body = wire(rec)
    assert body["progress"]["download_speed_bps"] == pytest.approx(1000.0)
    assert body["timing"]["estimated_remaining_seconds"] == 8


def test_eta_is_omitted_from_timing_when_the_total_is_unknown() -> None:
    rec = record(run_started_at=NOW - 2000, downloaded_bytes=2000, total_bytes=0)
    body = wire(rec)
    assert body["progress"]["download_speed_bps"] > 0
    assert body["progress"]["percentage"] == 0.0
    assert "estimated_remaining_seconds" not in body["timing"]


def test_eta_is_omitted_from_timing_before_the_first_byte() -> None:
    rec = record(run_started_at=NOW - 2000, downloaded_bytes=0, total_bytes=10_000)
    assert "estimated_remaining_seconds" not in wire(rec)["timing"]


# --- the Download object --------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_end_time_is_present_in_a_terminal_status(status: str) -> None:
    body = wire(record(status=status, end_time=NOW - 1000))
    assert body["timing"]["end_time"] == NOW - 1000


@pytest.mark.parametrize("status", [s for s in STATUSES if s not in TERMINAL])
def test_end_time_is_absent_in_a_non_terminal_status(status: str) -> None:
    # Even a stale end_time left on the record must not leak out while the download is live.
    assert "end_time" not in wire(record(status=status))["timing"]
    assert "end_time" not in wire(record(status=status, end_time=NOW - 1000))["timing"]


def test_elapsed_seconds_stops_at_end_time_in_a_terminal_status() -> None:
    body = wire(record(status="completed", end_time=START + 42_999))
    assert body["timing"]["elapsed_seconds"] == 42
    assert body["timing"]["start_time"] == START


def test_elapsed_seconds_is_an_integer_counted_to_now_while_live() -> None:
    body = wire(record(start_time=NOW - 12_345))
    assert body["timing"]["elapsed_seconds"] == 12
    assert type(body["timing"]["elapsed_seconds"]) is int


def test_elapsed_seconds_is_never_negative() -> None:
    body = wire(record(start_time=NOW + 60_000))
    assert body["timing"]["elapsed_seconds"] == 0


def test_times_are_integer_milliseconds() -> None:
    body = wire(record(status="failed", end_time=NOW, error_message="boom"))
    assert type(body["timing"]["start_time"]) is int
    assert type(body["timing"]["end_time"]) is int


def test_error_message_is_omitted_when_there_is_none() -> None:
    assert "error_message" not in wire(record())
    assert "error_message" not in wire(record(status="failed", end_time=NOW))


def test_error_message_is_present_when_there_is_one() -> None:
    body = wire(record(status="failed", end_time=NOW, error_message="HTTP 404 from origin."))
    assert body["error_message"] == "HTTP 404 from origin."


def test_engine_creation_is_omitted_for_a_regular_download() -> None:
    body = wire(record())
    assert body["download_type"] == "regular"
    assert "engine_creation" not in body
    assert "engine_creation" not in wire(record(), detail=False)


def _startup(model_type: str) -> DownloadRecord:
    return record(
        download_type="startup",
        model_type=model_type,
        engine=EngineSpec(load_immediately=False, main_gpu_id=1, inference_engine="llama-cpp"),
    )


@pytest.mark.parametrize("model_type", ["llm", "embedding"])
def test_engine_creation_in_the_list_holds_only_the_summary_fields(model_type: str) -> None:
    body = wire(_startup(model_type), detail=False)
    assert body["engine_creation"] == {"model_id": "m", "load_immediately": False, "main_gpu_id": 1}


@pytest.mark.parametrize(("chat", "expected"), [(True, True), (False, False), (None, False)])
def test_engine_creation_in_the_detail_of_an_llm_has_llm_features(
    chat: bool | None, expected: bool
) -> None:
    """chat_completion is true only when the model's engine exists and can chat."""
    body = wire(_startup("llm"), detail=True, chat=chat)
    assert body["engine_creation"] == {
        "model_id": "m",
        "load_immediately": False,
        "main_gpu_id": 1,
        "model_type": "llm",
        "inference_engine": "llama-cpp",
        "llm_features": {
            "text_generation": True,
            "chat_completion": expected,
            "instruction_following": True,
        },
    }


def test_engine_creation_in_the_detail_of_an_embedding_has_features_and_usage() -> None:
    body = wire(_startup("embedding"), detail=True)
    assert body["type"] == "embedding"
    assert body["engine_creation"] == {
        "model_id": "m",
        "load_immediately": False,
        "main_gpu_id": 1,
        "model_type": "embedding",
        "inference_engine": "llama-cpp",
        "embedding_features": {
            "normalization": True,
            "supports_batching": True,
            "optimized_for_retrieval": True,
        },
        "recommended_usage": {
            "document_embedding": True,
            "semantic_search": True,
            "similarity_computation": True,
        },
    }


def test_the_download_object_has_the_kolosal_keys() -> None:
    body = wire(record(run_started_at=NOW - 1000, downloaded_bytes=500, total_bytes=1000))
    assert {"model_id", "status", "download_type", "type", "url", "local_path"} <= body.keys()
    assert body["progress"] == {
        "downloaded_bytes": 500,
        "total_bytes": 1000,
        "percentage": 50.0,
        "download_speed_bps": 500.0,
    }
    assert set(body["timing"]) == {"start_time", "elapsed_seconds", "estimated_remaining_seconds"}


def test_the_progress_percentage_in_the_object_is_capped_at_100() -> None:
    body = wire(record(status="completed", end_time=NOW, downloaded_bytes=200, total_bytes=100))
    assert body["progress"]["percentage"] == 100.0


def test_a_paused_download_reports_zero_speed_and_no_eta() -> None:
    rec = record(status="paused", run_started_at=NOW - 1000, downloaded_bytes=500, total_bytes=1000)
    body = wire(rec)
    assert body["progress"]["download_speed_bps"] == 0.0
    assert body["progress"]["percentage"] == 50.0
    assert "estimated_remaining_seconds" not in body["timing"]


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("detail", [True, False])
@pytest.mark.parametrize("startup", [True, False])
def test_the_encoded_object_never_contains_an_unset_or_null_value(
    status: str, detail: bool, startup: bool
) -> None:
    rec = _startup("embedding") if startup else record()
    rec.status = status  # type: ignore[assignment]
    if status in TERMINAL:
        rec.end_time = NOW
    raw = Download.from_record(rec, detail=detail, now=NOW)
    body = msgspec.json.decode(msgspec.json.encode(raw))

    def check(value: Any, path: str) -> None:
        assert value is not None, f"{path} is null"
        assert value is not msgspec.UNSET, f"{path} is UNSET"
        if isinstance(value, dict):
            for key, item in value.items():
                check(item, f"{path}.{key}")

    check(body, "$")
    # And every UNSET attribute of the Struct is absent from the JSON.
    for name in raw.__struct_fields__:
        if getattr(raw, name) is msgspec.UNSET:
            assert name not in body
    for name in raw.timing.__struct_fields__:
        if getattr(raw.timing, name) is msgspec.UNSET:
            assert name not in body["timing"]
    assert "UNSET" not in msgspec.json.encode(raw).decode()


def test_the_extra_fields_appear_only_when_they_apply() -> None:
    body = wire(record(status="queued"))
    for key in ("queue_position", "attempts", "last_error", "sha256", "max_bytes_per_second"):
        assert key not in body
    body = wire(record(status="queued"), queue_position=2)
    assert body["queue_position"] == 2
    body = wire(record(attempts=2, last_error="connection reset"))
    assert body["attempts"] == 2
    assert body["last_error"] == "connection reset"
    body = wire(record(status="paused", attempts=2, last_error="connection reset"))
    assert "attempts" not in body
    assert "last_error" not in body
