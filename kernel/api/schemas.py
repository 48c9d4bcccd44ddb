"""Every wire Struct. Field names are exactly those of shared/API.md.

A field "present only when..." defaults to ``UNSET`` (omitted from the JSON); JSON null is
``None``. Request bodies forbid unknown fields. Records never go on the wire as they are:
``Download.from_record`` converts one.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from kernel.config import DownloadSettings, Rate
from kernel.types import DownloadRecord, EngineSpec, FileRecord, now_ms
from kernel.validation import redact_text, redact_url

__all__ = [
    "ActionResult",
    "BulkCancelResult",
    "BulkSummary",
    "CancelAll",
    "CancelResult",
    "CancelledDownload",
    "CreateDownload",
    "Download",
    "DownloadFile",
    "DownloadList",
    "EngineCreation",
    "EngineCreationRequest",
    "ErrorBody",
    "ErrorDetail",
    "FailedCancellation",
    "Health",
    "LimitRequest",
    "ListSummary",
    "PriorityRequest",
    "Progress",
    "PurgeResult",
    "Readiness",
    "RuntimeSettings",
    "Timing",
    "inline_schemas",
]


class _Wire(msgspec.Struct, kw_only=True):
    pass


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


# --- errors ---------------------------------------------------------------------------------


class ErrorDetail(_Wire):
    """All four keys are always sent (``param`` and ``code`` may be null), so none has a default."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(_Wire):
    error: ErrorDetail


# --- the download object --------------------------------------------------------------------


class Progress(_Wire):
    downloaded_bytes: int
    total_bytes: int
    percentage: float
    download_speed_bps: float


class Timing(_Wire):
    start_time: int
    elapsed_seconds: int
    estimated_remaining_seconds: int | UnsetType = UNSET
    end_time: int | UnsetType = UNSET


class EmbeddingFeatures(_Wire):
    normalization: bool = True
    supports_batching: bool = True
    optimized_for_retrieval: bool = True


class RecommendedUsage(_Wire):
    document_embedding: bool = True
    semantic_search: bool = True
    similarity_computation: bool = True


class LlmFeatures(_Wire):
    text_generation: bool = True
    chat_completion: bool = True
    instruction_following: bool = True


class EngineCreation(_Wire):
    model_id: str
    load_immediately: bool
    main_gpu_id: int
    # detail body only:
    model_type: str | UnsetType = UNSET
    inference_engine: str | UnsetType = UNSET
    embedding_features: EmbeddingFeatures | UnsetType = UNSET
    recommended_usage: RecommendedUsage | UnsetType = UNSET
    llm_features: LlmFeatures | UnsetType = UNSET

    @classmethod
    def from_record(
        cls, rec: DownloadRecord, *, detail: bool, chat: bool | None = None
    ) -> EngineCreation | UnsetType:
        """``chat``: whether the model's engine can chat (None: no engine yet, so not yet)."""
        spec = rec.engine
        if spec is None:
            return UNSET
        summary = cls(
            model_id=rec.model_id,
            load_immediately=spec.load_immediately,
            main_gpu_id=spec.main_gpu_id,
        )
        if not detail:
            return summary
        summary.model_type = rec.model_type
        summary.inference_engine = spec.inference_engine
        if rec.model_type == "embedding":
            summary.embedding_features = EmbeddingFeatures()
            summary.recommended_usage = RecommendedUsage()
        else:
            summary.llm_features = LlmFeatures(chat_completion=bool(chat))
        return summary


def percentage(downloaded: int, total: int) -> float:
    if total <= 0 or downloaded < 0:
        return 0.0
    value = downloaded / total * 100.0
    return min(value, 100.0) if math.isfinite(value) else 0.0


def speed_bps(rec: DownloadRecord, now: int) -> float:
    """Average speed of this run: bytes since the run began / seconds since it began."""
    if rec.status != "downloading" or rec.run_started_at <= 0:
        return 0.0
    seconds = (now - rec.run_started_at) / 1000.0
    moved = rec.downloaded_bytes - rec.run_start_bytes
    if seconds <= 0 or moved <= 0:
        return 0.0
    return moved / seconds


def eta_seconds(rec: DownloadRecord, speed: float) -> int | UnsetType:
    if rec.status != "downloading" or speed <= 0 or rec.total_bytes <= 0:
        return UNSET
    return max(0, math.ceil((rec.total_bytes - rec.downloaded_bytes) / speed))


class DownloadFile(_Wire):
    """One file of a multi-file download (ours, additive: the detail body's ``files``)."""

    path: str
    url: str
    local_path: str
    status: str
    downloaded_bytes: int
    total_bytes: int
    percentage: float
    sha256: str | UnsetType = UNSET

    @classmethod
    def from_record(cls, f: FileRecord) -> DownloadFile:
        return cls(
            path=f.path,
            url=redact_url(f.url),
            local_path=f.local_path,
            status=f.status,
            downloaded_bytes=f.downloaded_bytes,
            total_bytes=f.size,
            percentage=percentage(f.downloaded_bytes, f.size),
            sha256=f.sha256 if f.sha256 else UNSET,
        )


class Download(_Wire):
    model_id: str
    status: str
    download_type: str
    type: str
    url: str
    local_path: str
    progress: Progress
    timing: Timing
    error_message: str | UnsetType = UNSET
    engine_creation: EngineCreation | UnsetType = UNSET
    priority: int = 0
    queue_position: int | UnsetType = UNSET
    attempts: int | UnsetType = UNSET
    last_error: str | UnsetType = UNSET
    sha256: str | UnsetType = UNSET
    max_bytes_per_second: int | UnsetType = UNSET
    files: list[DownloadFile] | UnsetType = UNSET  # detail body of a multi-file download

    @classmethod
    def from_record(
        cls,
        rec: DownloadRecord,
        *,
        detail: bool = True,
        queue_position: int | None = None,
        now: int | None = None,
        chat: bool | None = None,
    ) -> Download:
        now = now_ms() if now is None else now
        speed = speed_bps(rec, now)
        ended = rec.end_time if rec.end_time is not None else now
        retrying = rec.status == "downloading" and rec.attempts > 0
        return cls(
            model_id=rec.model_id,
            status=rec.status,
            download_type=rec.download_type,
            type=rec.model_type,
            url=redact_url(rec.url),
            local_path=rec.local_path,
            progress=Progress(
                downloaded_bytes=rec.downloaded_bytes,
                total_bytes=rec.total_bytes,
                percentage=percentage(rec.downloaded_bytes, rec.total_bytes),
                download_speed_bps=speed,
            ),
            timing=Timing(
                start_time=rec.start_time,
                elapsed_seconds=max(0, (ended - rec.start_time) // 1000),
                estimated_remaining_seconds=eta_seconds(rec, speed),
                end_time=rec.end_time
                if rec.status in ("completed", "failed", "cancelled") and rec.end_time is not None
                else UNSET,
            ),
            error_message=redact_text(rec.error_message) if rec.error_message else UNSET,
            engine_creation=EngineCreation.from_record(rec, detail=detail, chat=chat),
            priority=rec.priority,
            queue_position=queue_position if queue_position is not None else UNSET,
            attempts=rec.attempts if retrying else UNSET,
            last_error=redact_text(rec.last_error) if retrying and rec.last_error else UNSET,
            sha256=rec.sha256 if rec.sha256 else UNSET,
            max_bytes_per_second=rec.max_bytes_per_second or UNSET,
            files=[DownloadFile.from_record(f) for f in rec.files]
            if detail and rec.files is not None
            else UNSET,
        )


class ListSummary(_Wire):
    total_active: int
    startup_downloads: int
    regular_downloads: int
    embedding_model_downloads: int
    llm_model_downloads: int


class DownloadList(_Wire):
    active_downloads: list[Download]
    summary: ListSummary
    timestamp: int


# --- action results -------------------------------------------------------------------------


class ActionResult(_Wire):
    success: bool
    message: str
    model_id: str


class CancelResult(_Wire):
    success: bool
    message: str
    model_id: str
    previous_status: str
    download_type: str
    timestamp: int
    engine_creation: EngineCreation | UnsetType = UNSET


class PurgeResult(_Wire):
    success: bool
    message: str
    model_id: str
    previous_status: str
    file_deleted: bool
    timestamp: int


class CancelledDownload(_Wire):
    model_id: str
    previous_status: str
    download_type: str
    cancelled_at: int
    engine_creation: EngineCreation | UnsetType = UNSET


class FailedCancellation(_Wire):
    model_id: str
    status: str
    reason: str


class BulkSummary(_Wire):
    total_downloads: int
    successful_cancellations: int
    failed_cancellations: int
    startup_cancellations: int
    regular_cancellations: int


class BulkCancelResult(_Wire):
    success: bool
    message: str
    summary: BulkSummary
    cancelled_downloads: list[CancelledDownload]
    failed_cancellations: list[FailedCancellation]
    timestamp: int


class Health(_Wire):
    status: str
    version: str


# --- requests -------------------------------------------------------------------------------


class EngineCreationRequest(_Request):
    load_immediately: bool = True
    main_gpu_id: int = 0
    inference_engine: str | None = None  # None: the default engine
    loading_parameters: dict[str, Any] = msgspec.field(default_factory=dict)

    def to_spec(self) -> EngineSpec:
        return EngineSpec(
            load_immediately=self.load_immediately,
            main_gpu_id=self.main_gpu_id,
            inference_engine=self.inference_engine or "",
            loading_parameters=self.loading_parameters,
        )


class PriorityRequest(_Request):
    priority: int


class LimitRequest(_Request):
    max_bytes_per_second: Rate


class Readiness(_Wire):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


class CreateDownload(_Request):
    model_id: str
    url: str
    model_type: Literal["llm", "embedding"] = "llm"
    sha256: str | None = None
    filename: str | None = None
    priority: int = 0
    max_bytes_per_second: Rate = 0
    engine_creation: EngineCreationRequest | None = None
    include: list[str] | None = None  # ours: file patterns of a repository to pull as one model


class CancelAll(_Request):
    """``POST /v1/downloads`` with this body is Kolosal's bulk cancel."""

    action: Literal["cancel_all"]


class RuntimeSettings(_Wire):
    """``GET``/``PATCH /v1/settings``: the settings that can change at run time."""

    downloads: DownloadSettings


# --- OpenAPI helpers ------------------------------------------------------------------------


def inline_schemas(*types: type) -> list[dict[str, Any]]:
    """msgspec's JSON Schema of each type with every ``$ref`` inlined, for a body whose
    handler decodes it by hand (so Litestar has no component to point at)."""
    schemas, defs = msgspec.json.schema_components(types, ref_template="{name}")

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return [inline(schema) for schema in schemas]
