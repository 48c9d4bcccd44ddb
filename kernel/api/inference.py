"""OpenAI's inference endpoints: ``/completions``, ``/chat/completions`` and ``/embeddings``,
answered by a model's engine, in the shapes the official clients parse.

``stream: true`` answers with server-sent events (``data: {chunk}`` ... ``data: [DONE]``).
A request whose client disconnects is abandoned: dropped from its engine's queue, or stopped
at the next token when it is running (the engine's iterator is closed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import struct
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import structlog
from litestar import Controller, Request, Response, post
from litestar.params import JSONBody
from litestar.response import Stream

from kernel.api.deps import KernelDep
from kernel.api.errors import error_responses, to_api_error
from kernel.core import Kernel
from kernel.errors import Conflict, InvalidRequest, KernelError, NotFound
from kernel.types import ACTIVE, Piece, Sampling

__all__ = ["InferenceController"]

log = structlog.get_logger()

T = TypeVar("T")

MAX_N = 16  # choices per prompt (n): generated one after another
MAX_STOP = 4  # stop sequences, as OpenAI allows


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class _Wire(msgspec.Struct, kw_only=True):
    pass


class StreamOptions(_Request):
    include_usage: bool = False


Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]


class _Sampled(_Request):
    """The sampling fields both endpoints take."""

    model: str
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Count | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    seed: int | None = None
    user: str | None = None  # accepted; OpenAI uses it for abuse monitoring only


class CompletionRequest(_Sampled):
    # a string, a list of strings, a list of token ids, or a list of those (required)
    prompt: Any = msgspec.UNSET
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = 16
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    echo: bool | None = False
    best_of: Count | None = None
    suffix: str | None = None


class ChatRequest(_Sampled):
    messages: list[dict[str, Any]] = msgspec.field(default_factory=list)
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    # Accepted and ignored: they concern OpenAI's platform, not the answer.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class EmbeddingRequest(_Request):
    model: str
    input: Any = msgspec.UNSET  # like a completion's prompt (required)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Wire):
    text: str
    index: int
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class TextCompletion(_Wire):
    id: str
    object: str
    created: int  # seconds since the epoch, as OpenAI sends it
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatMessageOut(_Wire):
    role: str
    content: str | None


class ChatChoice(_Wire):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletion(_Wire):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class EmbeddingItem(_Wire):
    object: str
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(_Wire):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Wire):
    object: str
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


_ENCODER = msgspec.json.Encoder()


# --- checks ----------------------------------------------------------------------------------


def require_engine(kernel: Kernel, model_id: str) -> None:
    """404 for an unknown model; 409 for one whose download has not ended yet."""
    if kernel.engines.get(model_id) is not None:
        return
    rec = kernel.downloads.records.get(model_id)
    if rec is not None and rec.status in ACTIVE:
        if rec.status == "creating_engine":
            state = "its file is downloaded and its engine is being built"
        else:
            state = f"its download is {rec.status}"
            if rec.total_bytes > 0:
                state += f" ({rec.downloaded_bytes * 100 // rec.total_bytes}%)"
        then = (
            "It answers once the download completes and its engine is built"
            if rec.download_type == "startup"
            else "It is a regular download, which builds no engine: once it completes, add "
            "the file with POST /v1/models to serve it"
        )
        raise Conflict(
            f"Model {model_id} is still downloading: {state}. {then}; follow "
            f"GET /v1/downloads/{model_id}.",
            param="model",
            code="model_downloading",
        )
    raise NotFound(f"Model not found: {model_id}", param="model", code="model_not_found")


def _sampling(body: CompletionRequest | ChatRequest, max_tokens: int | None) -> Sampling:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or not all(stop):
        raise InvalidRequest(f"stop takes at most {MAX_STOP} non-empty strings.", param="stop")
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit():
            raise InvalidRequest(
                f"logit_bias keys are token ids; {key!r} is not.", param="logit_bias"
            )
        bias[int(key)] = value
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(stop),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias,
    )


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _inputs(value: Any, param: str) -> list[str] | list[list[int]]:
    """OpenAI's four input forms as a list of strings or a list of token-id lists."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif _is_tokens(value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        items = []
    if items and all(isinstance(i, str) and i for i in items):
        return items
    if items and all(_is_tokens(i) for i in items):
        return items
    raise InvalidRequest(
        f"{param} must be a non-empty string, a list of them, a list of token ids, or a list "
        "of such lists.",
        param=param,
    )


def _text_content(content: Any) -> str | None:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(
                    f"Only text content parts are supported, not {kind!r}.", param="messages"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise InvalidRequest(
        "A message's content must be a string or a list of parts.", param="messages"
    )


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages the chat template receives: roles checked, content as text, ``developer``
    as ``system`` (what OpenAI's newer clients send to older models)."""
    if not messages:
        raise InvalidRequest("messages must not be empty.", param="messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}.",
                param=f"messages[{i}].role",
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise InvalidRequest(
                "Tool calls are not supported by this server.", param=f"messages[{i}]"
            )
        entry: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": _text_content(message.get("content")) or "",
        }
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        out.append(entry)
    return out


def _check_chat_options(body: ChatRequest) -> None:
    if (
        body.tools
        or body.functions
        or body.tool_choice not in (None, "none")
        or (body.function_call not in (None, "none"))
    ):
        raise InvalidRequest("Tools and function calling are not supported.", param="tools")
    fmt = (body.response_format or {}).get("type", "text")
    if fmt != "text":
        raise InvalidRequest(
            f"response_format {fmt!r} is not supported; only 'text'.", param="response_format"
        )
    if body.modalities not in (None, ["text"]):
        raise InvalidRequest("Only the 'text' modality is supported.", param="modalities")


# --- client disconnects ---------------------------------------------------------------------


class _ClientGone(Exception):
    pass


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Return once the client has gone (the body has been read: the server then reports
    nothing but the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_gone(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """``await work``, cancelling it (so the engine drops or stops it) if the client
    disconnects first; _ClientGone then."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise _ClientGone
    return task.result()


def _gone_response() -> Response[Any]:
    log.info("inference.client_gone")
    return Response(b"", status_code=499)


# --- running generations ---------------------------------------------------------------------


class _Choice:
    """One generation being collected: its text, logprobs and end."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.logprobs: dict[str, list[Any]] | None = None
        self.last = Piece()

    def add(self, piece: Piece) -> None:
        self.text.append(piece.text)
        if piece.logprobs:
            if self.logprobs is None:
                self.logprobs = {k: [] for k in piece.logprobs}
            for key, values in piece.logprobs.items():
                self.logprobs.setdefault(key, []).extend(values or [])
        if piece.finish_reason is not None:
            self.last = piece


def _plan(n_prompts: int, n: int) -> list[tuple[int, int]]:
    """(prompt index, choice index) in OpenAI's order: each prompt's n choices together."""
    return [(p, p * n + j) for p in range(n_prompts) for j in range(n)]


def _seeded(sampling: Sampling, j: int) -> Sampling:
    """The j-th of n choices: a given seed moves on by j, so n choices are not n copies."""
    if sampling.seed is None or j == 0:
        return sampling
    return msgspec.structs.replace(sampling, seed=sampling.seed + j)


async def _collect(pieces: AsyncGenerator[Piece, None], choice: _Choice) -> _Choice:
    async with contextlib.aclosing(pieces) as it:
        async for piece in it:
            choice.add(piece)
    return choice


async def _run_plan(
    request: Request[Any, Any, Any],
    plan: list[tuple[int, int]],
    pieces: Callable[[int, int], AsyncGenerator[Piece, None]],
) -> list[_Choice] | None:
    """Every (prompt, choice) of ``plan`` collected in turn; None if the client went away."""

    async def run() -> list[_Choice]:
        return [await _collect(pieces(p, index), _Choice(index)) for p, index in plan]

    try:
        return await _unless_gone(request, run())
    except _ClientGone:
        return None


@dataclass(frozen=True, slots=True)
class _Envelope:
    """What every chunk of one streamed answer repeats around its choice."""

    ident: str
    kind: str
    created: int
    model: str
    include_usage: bool

    def wrap(self, choice: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        """A chunk carrying ``choice`` (none: the closing usage chunk's empty list)."""
        out: dict[str, Any] = {
            "id": self.ident,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            **extra,
            "choices": [] if choice is None else [choice],
        }
        if self.include_usage and choice is not None:
            out["usage"] = None
        return out


def _usage(choices: list[_Choice], n: int) -> Usage:
    """Prompt tokens once per prompt (the first of its n choices), completion tokens all."""
    prompt = sum(c.last.prompt_tokens for i, c in enumerate(choices) if i % n == 0)
    completion = sum(c.last.completion_tokens for c in choices)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _chat_logprobs(raw: dict[str, Any] | None, top: int) -> dict[str, Any] | None:
    """Completions-style logprobs as chat's ``{content: [{token, logprob, bytes,
    top_logprobs}]}``."""
    if raw is None:
        return None
    content = []
    for token, logprob, alternatives in zip(
        raw.get("tokens") or [],
        raw.get("token_logprobs") or [],
        raw.get("top_logprobs") or [],
        strict=False,
    ):
        ranked = sorted((alternatives or {}).items(), key=lambda kv: -kv[1])[:top]
        content.append(
            {
                "token": token,
                "logprob": _finite(logprob),
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [
                    {"token": t, "logprob": _finite(lp), "bytes": list(t.encode("utf-8"))}
                    for t, lp in ranked
                ],
            }
        )
    return {"content": content, "refusal": None}


def _finite(value: Any) -> float:
    number = float(value) if value is not None else -9999.0
    return number if math.isfinite(number) else -9999.0


def _sse(data: Any) -> bytes:
    return b"data: " + _ENCODER.encode(data) + b"\n\n"


async def _event_stream(
    first: Piece | None,
    pieces: AsyncGenerator[Piece, None],
    chunk: Callable[[Piece], Any | None],
) -> AsyncGenerator[bytes, None]:
    """An event per piece (``first`` already read), closing ``pieces`` when the client goes
    away."""
    async with contextlib.aclosing(pieces) as it:
        if first is not None:
            out = chunk(first)
            if out is not None:
                yield _sse(out)
        async for piece in it:
            out = chunk(piece)
            if out is not None:
                yield _sse(out)


async def _first(pieces: AsyncGenerator[Piece, None]) -> Piece | None:
    return await anext(pieces, None)


def _error_event(request: Request[Any, Any, Any], exc: Exception) -> bytes:
    """An error after the stream began: one ``data: {"error": ...}`` event, which the OpenAI
    clients raise as an APIError."""
    _, detail, _ = to_api_error(request, exc)
    return _sse({"error": msgspec.to_builtins(detail)})


# --- the controller -------------------------------------------------------------------------


class InferenceController(Controller):
    """Mounted under ``/v1`` and ``/`` like the others."""

    path = "/"

    @post(
        "/completions",
        status_code=200,
        tags=["inference"],
        summary="OpenAI text completion from an llm model (stream: true for server-sent events)",
        responses=error_responses(400, 404, 409, 413, 422),
    )
    async def completions(
        self, data: JSONBody[dict[str, Any]], kernel: KernelDep, request: Request[Any, Any, Any]
    ) -> Response[Any]:
        body = msgspec.convert(data, CompletionRequest)
        prompts: list[str] | list[list[int]] = _inputs(body.prompt, "prompt")
        n = body.n or 1
        if body.best_of not in (None, n):
            raise InvalidRequest(
                "best_of is supported only equal to n (every choice is returned).",
                param="best_of",
            )
        if body.suffix:
            raise InvalidRequest("suffix (insertion) is not supported.", param="suffix")
        sampling = msgspec.structs.replace(
            _sampling(body, body.max_tokens), logprobs=body.logprobs, echo=bool(body.echo)
        )
        require_engine(kernel, body.model)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        plan = _plan(len(prompts), n)

        def pieces(p: int, index: int) -> AsyncGenerator[Piece, None]:
            return kernel.engines.generate(body.model, prompts[p], _seeded(sampling, index % n))

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            envelope = _Envelope(ident, "text_completion", created, body.model, include_usage)

            def chunk(index: int, piece: Piece) -> dict[str, Any]:
                return envelope.wrap(
                    {
                        "text": piece.text,
                        "index": index,
                        "logprobs": piece.logprobs,
                        "finish_reason": piece.finish_reason,
                    }
                )

            return await _stream_plan(request, plan, pieces, chunk, envelope, n)

        choices = await _run_plan(request, plan, pieces)
        if choices is None:
            return _gone_response()
        return Response(
            TextCompletion(
                id=ident,
                object="text_completion",
                created=created,
                model=body.model,
                choices=[
                    CompletionChoice(
                        text="".join(c.text),
                        index=c.index,
                        logprobs=c.logprobs if body.logprobs is not None else None,
                        finish_reason=c.last.finish_reason or "stop",
                    )
                    for c in choices
                ],
                usage=_usage(choices, n),
            )
        )

    @post(
        "/chat/completions",
        status_code=200,
        tags=["inference"],
        summary="OpenAI chat completion through the model's chat template (stream: true for SSE)",
        responses=error_responses(400, 404, 409, 413, 422),
    )
    async def chat_completions(
        self, data: JSONBody[dict[str, Any]], kernel: KernelDep, request: Request[Any, Any, Any]
    ) -> Response[Any]:
        body = msgspec.convert(data, ChatRequest)
        messages = _messages(body.messages)
        _check_chat_options(body)
        n = body.n or 1
        top = body.top_logprobs or 0
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = msgspec.structs.replace(
            _sampling(body, max_tokens), logprobs=top if body.logprobs else None
        )
        require_engine(kernel, body.model)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        plan = _plan(1, n)

        def pieces(p: int, index: int) -> AsyncGenerator[Piece, None]:
            return kernel.engines.chat(body.model, messages, _seeded(sampling, index))

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            envelope = _Envelope(ident, "chat.completion.chunk", created, body.model, include_usage)
            started: set[int] = set()

            def chunk(index: int, piece: Piece) -> dict[str, Any] | None:
                delta: dict[str, Any] = {}
                if index not in started:
                    started.add(index)
                    delta["role"] = "assistant"
                if piece.text or "role" in delta:
                    delta["content"] = piece.text
                if not delta and piece.finish_reason is None:
                    return None
                return envelope.wrap(
                    {
                        "index": index,
                        "delta": delta,
                        "logprobs": _chat_logprobs(piece.logprobs, top) if body.logprobs else None,
                        "finish_reason": piece.finish_reason,
                    },
                    system_fingerprint=None,
                )

            return await _stream_plan(request, plan, pieces, chunk, envelope, n)

        choices = await _run_plan(request, plan, pieces)
        if choices is None:
            return _gone_response()
        return Response(
            ChatCompletion(
                id=ident,
                object="chat.completion",
                created=created,
                model=body.model,
                choices=[
                    ChatChoice(
                        index=c.index,
                        message=ChatMessageOut(role="assistant", content="".join(c.text)),
                        logprobs=_chat_logprobs(c.logprobs, top) if body.logprobs else None,
                        finish_reason=c.last.finish_reason or "stop",
                    )
                    for c in choices
                ],
                usage=_usage(choices, n),
            )
        )

    @post(
        "/embeddings",
        status_code=200,
        tags=["inference"],
        summary="OpenAI embeddings from an embedding model",
        responses=error_responses(400, 404, 409, 413, 422),
    )
    async def embeddings(
        self, data: JSONBody[dict[str, Any]], kernel: KernelDep, request: Request[Any, Any, Any]
    ) -> Response[Any]:
        body = msgspec.convert(data, EmbeddingRequest)
        inputs = _inputs(body.input, "input")
        require_engine(kernel, body.model)
        try:
            vectors, tokens = await _unless_gone(request, kernel.engines.embed(body.model, inputs))
        except _ClientGone:
            return _gone_response()
        if body.dimensions is not None:
            width = len(vectors[0]) if vectors else 0
            if body.dimensions > width:
                raise InvalidRequest(
                    f"dimensions must be at most {width}, the model's embedding size.",
                    param="dimensions",
                )
            vectors = [_shortened(v, body.dimensions) for v in vectors]
        encode = _float32_base64 if body.encoding_format == "base64" else list
        return Response(
            EmbeddingList(
                object="list",
                data=[
                    EmbeddingItem(object="embedding", index=i, embedding=encode(v))
                    for i, v in enumerate(vectors)
                ],
                model=body.model,
                usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
            )
        )


async def _stream_plan(
    request: Request[Any, Any, Any],
    plan: list[tuple[int, int]],
    pieces: Callable[[int, int], AsyncGenerator[Piece, None]],
    chunk: Callable[[int, Piece], Any | None],
    envelope: _Envelope,
    n: int,
) -> Response[Any]:
    """The SSE response for every (prompt, choice) of ``plan``, one after another. The first
    piece is awaited before answering, so an error before any output (a bad template, a
    prompt longer than the context) is an HTTP error, not an event."""
    p0, index0 = plan[0]
    first_iter = pieces(p0, index0)
    try:
        first = await _unless_gone(request, _first(first_iter))
    except _ClientGone:
        return _gone_response()
    except BaseException:
        await first_iter.aclose()
        raise

    async def events() -> AsyncGenerator[bytes, None]:
        ends: list[Piece] = []

        def tracked(index: int) -> Callable[[Piece], Any | None]:
            def one(piece: Piece) -> Any | None:
                if piece.finish_reason is not None:
                    ends.append(piece)
                return chunk(index, piece)

            return one

        try:
            async for data in _event_stream(first, first_iter, tracked(index0)):
                yield data
            for p, index in plan[1:]:
                async for data in _event_stream(None, pieces(p, index), tracked(index)):
                    yield data
        except (KernelError, msgspec.ValidationError) as exc:
            yield _error_event(request, exc)
            return
        if envelope.include_usage:
            prompt = sum(e.prompt_tokens for i, e in enumerate(ends) if i % n == 0)
            completion = sum(e.completion_tokens for e in ends)
            usage = Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            )
            yield _sse({**envelope.wrap(None), "usage": msgspec.to_builtins(usage)})
        yield b"data: [DONE]\n\n"

    return Stream(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _shortened(vector: list[float], dimensions: int) -> list[float]:
    """The first ``dimensions`` values, scaled back to unit length (OpenAI's ``dimensions``
    for Matryoshka-style models; for others it is a plain truncation)."""
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head))
    return [x / norm for x in head] if norm > 0 else head


def _float32_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
