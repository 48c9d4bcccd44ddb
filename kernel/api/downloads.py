"""The downloads resource: Kolosal's Downloads API (Part 1) and our create (Part 2)."""

from __future__ import annotations

import weakref
from typing import Annotated, Any, TypeAlias

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.enums import RequestEncodingType
from litestar.openapi import ResponseSpec
from litestar.params import Body, FromPath, FromQuery, JSONBody

from kernel.api.deps import Downloads
from kernel.api.edge import is_slashed_collection
from kernel.api.errors import error_responses
from kernel.api.schemas import (
    ActionResult,
    BulkCancelResult,
    BulkSummary,
    CancelAll,
    CancelledDownload,
    CancelResult,
    CreateDownload,
    Download,
    DownloadList,
    EngineCreation,
    FailedCancellation,
    LimitRequest,
    ListSummary,
    PriorityRequest,
    PurgeResult,
    inline_schemas,
)
from kernel.downloads import DownloadManager
from kernel.errors import InvalidRequest
from kernel.types import ACTIVE, TERMINAL, DownloadRecord, now_ms
from kernel.validation import validate_model_id

__all__ = ["DownloadsController"]

ALL_STATUSES = ACTIVE | TERMINAL

# The create body is decoded by hand (it may also be {"action": "cancel_all"}), so its schema
# is given here: exactly one of CreateDownload and CancelAll.
CreateBody: TypeAlias = Annotated[
    dict[str, Any],
    Body(
        media_type=RequestEncodingType.JSON,
        description='A download to start (CreateDownload), or {"action": "cancel_all"}',
        schema_extra={
            "type": None,
            "additional_properties": None,
            "one_of": inline_schemas(CreateDownload, CancelAll),
        },
    ),
]
# Handlers that look a download up by its path id (and those that also take a body).
BY_ID = error_responses(400, 404)
BY_ID_WITH_BODY = error_responses(400, 404, 413)


def _path_id(model_id: str) -> str:
    validate_model_id(model_id, param="path", code="invalid_path_format")
    return model_id


def _statuses(value: str | None) -> frozenset[str] | None:
    if value is None or value == "":
        return None
    if value == "all":
        return ALL_STATUSES
    wanted = frozenset(s.strip() for s in value.split(","))
    unknown = wanted - ALL_STATUSES
    if unknown:
        raise InvalidRequest(
            f"Unknown status {sorted(unknown)[0]!r}; use 'all' or a comma list of "
            f"{', '.join(sorted(ALL_STATUSES))}.",
            param="status",
        )
    return wanted


def _view(
    downloads: DownloadManager,
    rec: DownloadRecord,
    *,
    detail: bool,
    now: int,
    positions: dict[str, int] | None = None,
) -> Download:
    """The wire object; ``positions`` (from one ``queue_positions()``) serves a whole list."""
    position = None
    if rec.status == "queued":
        position = (positions if positions is not None else downloads.queue_positions()).get(
            rec.model_id
        )
    chat = downloads.engines.supports_chat(rec.model_id) if detail else None
    return Download.from_record(rec, detail=detail, queue_position=position, now=now, chat=chat)


_ENCODER = msgspec.json.Encoder()


class _EncodedList(msgspec.Struct, kw_only=True):
    """DownloadList on the wire, with items already encoded (``msgspec.Raw``)."""

    active_downloads: list[msgspec.Raw]
    summary: ListSummary
    timestamp: int


def _encoded_item(
    downloads: DownloadManager, rec: DownloadRecord, now: int, positions: dict[str, int]
) -> msgspec.Raw:
    """One list item as JSON. An ended download's item never changes, so it is encoded once
    (keyed on what could replace it) and reused: listing 1,000 ended records is a join."""
    if rec.status not in TERMINAL:
        return msgspec.Raw(
            _ENCODER.encode(_view(downloads, rec, detail=False, now=now, positions=positions))
        )
    key = (rec.seq, rec.status, rec.end_time)
    views = _VIEWS.setdefault(downloads, {})
    cached = views.get(rec.model_id)
    if cached is None or cached[0] != key:
        cached = (key, msgspec.Raw(_ENCODER.encode(_view(downloads, rec, detail=False, now=now))))
        if len(views) > 2 * len(downloads.records) + 64:  # purged ids: drop the leftovers
            for gone in views.keys() - downloads.records.keys():
                del views[gone]
        views[rec.model_id] = cached
    return cached[1]


# Presentation state, kept by the API: each manager's encoded views of ended downloads (they
# never change), by model id, keyed on what could replace them (a new download with the id).
_VIEWS: weakref.WeakKeyDictionary[DownloadManager, dict[str, tuple[object, msgspec.Raw]]] = (
    weakref.WeakKeyDictionary()
)


def _cancel_all(downloads_result: Any) -> BulkCancelResult:
    cancelled, failed = downloads_result
    now = now_ms()
    rows = [
        CancelledDownload(
            model_id=rec.model_id,
            previous_status=previous,
            download_type=rec.download_type,
            cancelled_at=rec.end_time or now,
            engine_creation=EngineCreation.from_record(rec, detail=False),
        )
        for rec, previous in cancelled
    ]
    startup = sum(1 for rec, _ in cancelled if rec.download_type == "startup")
    return BulkCancelResult(
        success=True,
        message="Bulk download cancellation completed",
        summary=BulkSummary(
            total_downloads=len(cancelled) + len(failed),
            successful_cancellations=len(cancelled),
            failed_cancellations=len(failed),
            startup_cancellations=startup,
            regular_cancellations=len(cancelled) - startup,
        ),
        cancelled_downloads=rows,
        failed_cancellations=[
            FailedCancellation(model_id=m, status=s, reason=r) for m, s, r in failed
        ],
        timestamp=now,
    )


class DownloadsController(Controller):
    path = "/downloads"
    tags = ["downloads"]  # noqa: RUF012 - Litestar declares Controller.tags as a plain attribute

    @get(
        "/",
        summary="List downloads (active ones unless ?status= widens the list)",
        responses={
            200: ResponseSpec(DownloadList, description="The downloads", generate_examples=False),
            **error_responses(400),
        },
    )
    async def list_downloads(
        self,
        downloads: Downloads,
        status: FromQuery[str | None] = None,
    ) -> Response[bytes]:
        records = downloads.list(_statuses(status))
        now = now_ms()
        positions = downloads.queue_positions()
        active = [r for r in records if r.status not in TERMINAL]
        body = _EncodedList(
            active_downloads=[_encoded_item(downloads, r, now, positions) for r in records],
            summary=ListSummary(
                total_active=len(active),
                startup_downloads=sum(r.download_type == "startup" for r in active),
                regular_downloads=sum(r.download_type == "regular" for r in active),
                embedding_model_downloads=sum(r.model_type == "embedding" for r in active),
                llm_model_downloads=sum(r.model_type == "llm" for r in active),
            ),
            timestamp=now,
        )
        return Response(_ENCODER.encode(body), media_type="application/json")

    @post(
        "/",
        status_code=202,
        summary='Start a download, or cancel all with {"action": "cancel_all"}',
        responses={
            202: ResponseSpec(Download, description="The download was created (detail body)"),
            200: ResponseSpec(BulkCancelResult, description='{"action": "cancel_all"}: bulk body'),
            **error_responses(400, 409, 413),
        },
    )
    async def create(
        self, request: Request[Any, Any, Any], data: CreateBody, downloads: Downloads
    ) -> Response[Download | BulkCancelResult]:
        if "action" in data:
            if data["action"] != "cancel_all" or len(data) != 1:
                raise InvalidRequest('The only action is "cancel_all".', param="action")
            if is_slashed_collection(request.scope):  # only the exact bulk paths cancel all
                raise InvalidRequest(
                    "Cannot extract model ID from request path: the id segment is empty.",
                    param="path",
                    code="invalid_path_format",
                )
            return Response(_cancel_all(await downloads.cancel_all()), status_code=200)
        body = msgspec.convert(data, CreateDownload)
        rec = await downloads.create(
            model_id=body.model_id,
            url=body.url,
            model_type=body.model_type,
            sha256=body.sha256,
            filename=body.filename,
            priority=body.priority,
            max_bytes_per_second=body.max_bytes_per_second,
            engine=body.engine_creation.to_spec() if body.engine_creation else None,
            include=body.include,
        )
        return Response(_view(downloads, rec, detail=True, now=now_ms()), status_code=202)

    @delete("/", status_code=200, summary="Cancel all downloads", responses=error_responses())
    async def cancel_all(self, downloads: Downloads) -> BulkCancelResult:
        return _cancel_all(await downloads.cancel_all())

    @post("/cancel", status_code=200, summary="Cancel all downloads", responses=error_responses())
    async def cancel_all_post(self, downloads: Downloads) -> BulkCancelResult:
        return _cancel_all(await downloads.cancel_all())

    @get("/{model_id:str}", summary="One download in detail", responses=BY_ID)
    async def detail(self, model_id: FromPath[str], downloads: Downloads) -> Download:
        rec = downloads.get(_path_id(model_id))
        return _view(downloads, rec, detail=True, now=now_ms())

    @delete(
        "/{model_id:str}",
        status_code=200,
        summary="Cancel one download; ?purge=true forgets an ended one (&delete_file=true too)",
        responses=BY_ID,
    )
    async def cancel(
        self,
        model_id: FromPath[str],
        downloads: Downloads,
        purge: FromQuery[bool] = False,
        delete_file: FromQuery[bool] = False,
    ) -> CancelResult | PurgeResult:
        if not purge:
            return await self._cancel(model_id, downloads)
        previous = downloads.get(_path_id(model_id)).status
        rec, deleted = await downloads.purge(model_id, delete_file=delete_file)
        return PurgeResult(
            success=True,
            message="Download record purged",
            model_id=rec.model_id,
            previous_status=previous,
            file_deleted=deleted,
            timestamp=now_ms(),
        )

    @post("/{model_id:str}/cancel", status_code=200, summary="Cancel one download", responses=BY_ID)
    async def cancel_post(self, model_id: FromPath[str], downloads: Downloads) -> CancelResult:
        return await self._cancel(model_id, downloads)

    @post("/{model_id:str}/pause", status_code=200, summary="Pause a download", responses=BY_ID)
    async def pause(self, model_id: FromPath[str], downloads: Downloads) -> ActionResult:
        await downloads.pause(_path_id(model_id))
        return ActionResult(success=True, message="Download paused successfully", model_id=model_id)

    @post(
        "/{model_id:str}/resume",
        status_code=200,
        summary="Resume a paused download",
        responses=BY_ID,
    )
    async def resume(self, model_id: FromPath[str], downloads: Downloads) -> ActionResult:
        await downloads.resume(_path_id(model_id))
        return ActionResult(
            success=True, message="Download resumed successfully", model_id=model_id
        )

    @post(
        "/{model_id:str}/priority",
        status_code=200,
        summary="Reorder the queue",
        responses=BY_ID_WITH_BODY,
    )
    async def priority(
        self, model_id: FromPath[str], data: JSONBody[PriorityRequest], downloads: Downloads
    ) -> Download:
        rec = await downloads.set_priority(_path_id(model_id), data.priority)
        return _view(downloads, rec, detail=True, now=now_ms())

    @post(
        "/{model_id:str}/limit",
        status_code=200,
        summary="Cap one download's bandwidth",
        responses=BY_ID_WITH_BODY,
    )
    async def limit(
        self, model_id: FromPath[str], data: JSONBody[LimitRequest], downloads: Downloads
    ) -> Download:
        rec = await downloads.set_limit(_path_id(model_id), data.max_bytes_per_second)
        return _view(downloads, rec, detail=True, now=now_ms())

    @staticmethod
    async def _cancel(model_id: FromPath[str], downloads: Downloads) -> CancelResult:
        rec, previous = await downloads.cancel(_path_id(model_id))
        return CancelResult(
            success=True,
            message="Download cancelled successfully",
            model_id=rec.model_id,
            previous_status=previous,
            download_type=rec.download_type,
            timestamp=now_ms(),
            engine_creation=EngineCreation.from_record(rec, detail=False),
        )
