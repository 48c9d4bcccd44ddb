"""LlamaCppBackend builds LlamaCppEngines: GGUF models served by llama-cpp-python.

``create`` reads the GGUF header first (a file that is not GGUF fails here, with a reason the
user can act on), settles the model type, maps the loading parameters, compiles the chat
template (the GGUF's ``tokenizer.chat_template`` or ``loading_parameters.chat_template``), and
then loads the model, or, with ``load_immediately: false``, leaves the load to the first
request. ``llama_cpp`` is imported only here, so the plugin imports without the extra.

Each engine has its own worker thread: its load and every llama.cpp call run there, one at a
time, in arrival order. Requests wait in that thread's queue without holding any shared
thread, so a busy model never slows another model, engine creation or file work. A request
whose caller goes away is dropped from the queue; a running generation stops at the next
token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import os
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

import msgspec
import structlog

from kernel.errors import EngineError, InvalidRequest
from kernel.types import EngineSpec, Piece, Sampling
from plugins.engine_llamacpp._gguf import GgufInfo, find_model_file, infer_model_type, read_gguf
from plugins.engine_llamacpp._params import check_parameters, llama_kwargs
from plugins.engine_llamacpp._split import check_gguf_header, check_split

__all__ = ["LlamaCppBackend", "LlamaCppEngine"]

log = structlog.get_logger()

NOT_INSTALLED = "llama-cpp-python is not installed: pip install 'modelkernel[llamacpp]'"
POOLING_MEAN = 1


def import_llama_cpp() -> Any:
    """``llama_cpp``, or EngineError saying how to install it. CUDA devices are numbered in
    PCI bus order, the order NVML (and so ``detect_gpus`` and ``main_gpu_id``) uses."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as exc:
        raise EngineError(NOT_INSTALLED) from exc


class LlamaCppBackend:
    name = "llama-cpp"
    aliases: tuple[str, ...] = ("llama-cpu", "llama-cuda", "llama-vulkan")
    description = "GGUF models on llama.cpp through llama-cpp-python (CPU, CUDA, Vulkan, Metal)"

    @property
    def available(self) -> bool:
        """Whether llama-cpp-python is installed (checked without importing it)."""
        return importlib.util.find_spec("llama_cpp") is not None

    @property
    def version(self) -> str | None:
        try:
            return importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            return None

    def check(self, spec: EngineSpec, *, prefix: str = "") -> None:
        """Reject bad ``loading_parameters`` when the request is made (InvalidRequest)."""
        check_parameters(spec.loading_parameters, prefix=prefix)

    def verify_file(self, path: str, name: str) -> None:
        """A downloaded ``.gguf`` must start like one (magic, known version); other files
        (a README, a tokenizer) pass. Blocking."""
        if name.lower().endswith(".gguf"):
            check_gguf_header(path)

    def model_file(self, paths: list[str]) -> str | None:
        """The first GGUF of a multi-file download (a split model's first shard)."""
        return next((p for p in paths if p.lower().endswith(".gguf")), None)

    def verify_set(self, paths: list[str]) -> None:
        """Several GGUFs in one download must be the shards of one split model, all of
        them, in order (their ``split.*`` header keys say so). Blocking."""
        ggufs = [p for p in paths if p.lower().endswith(".gguf")]
        if len(ggufs) > 1:
            check_split(ggufs)

    async def create(
        self, model_id: str, path: str, model_type: str, spec: EngineSpec
    ) -> LlamaCppEngine:
        """``model_type`` is ``llm`` or ``embedding``, or anything else (``auto``) to infer it
        from the GGUF metadata, then from the file name."""
        file = await asyncio.to_thread(find_model_file, path)
        info = await asyncio.to_thread(read_gguf, file)  # a bad file fails before the import
        llama_cpp = await asyncio.to_thread(import_llama_cpp)
        kind = infer_model_type(info, model_type, model_id)
        params = spec.loading_parameters
        kwargs = llama_kwargs(
            params,
            main_gpu=spec.main_gpu_id,
            embedding=kind == "embedding",
            context_length=info.context_length,
        )
        if (
            kind == "embedding"
            and "pooling_type" not in params
            and info.pooling_type in (None, "none")
        ):
            kwargs["pooling_type"] = POOLING_MEAN  # one vector per input, not one per token
        engine = LlamaCppEngine(
            model_id,
            kind,
            info,
            _supported(llama_cpp.Llama, kwargs),
            llama_cpp.Llama,
            normalize=params.get("embd_normalize", 2) != -1,
            chat=await asyncio.to_thread(
                _chat_formatter, model_id, kind, info, params.get("chat_template")
            ),
            is_eog=getattr(llama_cpp, "llama_vocab_is_eog", None),
        )
        log.info(
            "engine.registered",
            model_id=model_id,
            model_type=kind,
            path=file,
            architecture=info.architecture,
            quantization=info.quantization,
            parameters=info.parameter_count,
            load_immediately=spec.load_immediately,
        )
        if spec.load_immediately:
            await engine.load()
        return engine


class _Chat:
    """A compiled chat template and where it came from (``gguf`` or ``loading_parameters``)."""

    def __init__(self, formatter: Any, source: str) -> None:
        self.formatter = formatter
        self.source = source


def _chat_formatter(model_id: str, kind: str, info: GgufInfo, configured: Any) -> _Chat | None:
    """The model's chat template compiled with llama-cpp-python's Jinja2 formatter: the
    configured one first, else the GGUF's; None when there is none (or the GGUF's does not
    compile: logged). A configured template that does not compile is a 400."""
    if kind != "llm":
        return None
    template, source = (
        (configured, "loading_parameters") if configured else (info.chat_template, "gguf")
    )
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        formatter = Jinja2ChatFormatter(
            template=template, eos_token=info.eos_token, bos_token=info.bos_token
        )
    except Exception as exc:  # jinja2 raises TemplateSyntaxError and others
        if source == "gguf":
            log.warning("engine.chat_template_unusable", model_id=model_id, error=str(exc))
            return None
        raise InvalidRequest(
            f"loading_parameters.chat_template does not compile: {exc}",
            param="loading_parameters.chat_template",
        ) from exc
    return _Chat(formatter, source)


def _supported(llama_cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop keywords this llama-cpp-python version does not take (logged, not fatal)."""
    accepted = inspect.signature(llama_cls.__init__).parameters
    dropped = sorted(k for k in kwargs if k not in accepted)
    if dropped:
        log.info("engine.parameters_unsupported", parameters=dropped)
    return {k: v for k, v in kwargs.items() if k in accepted}


class LlamaCppEngine:
    """One GGUF model. Loads on ``load()`` or on first use; its own thread runs its calls."""

    def __init__(
        self,
        model_id: str,
        model_type: str,
        info: GgufInfo,
        kwargs: dict[str, Any],
        llama_cls: Callable[..., Any],
        *,
        normalize: bool = True,
        chat: _Chat | None = None,
        is_eog: Callable[[Any, int], bool] | None = None,
    ) -> None:
        self.model_id = model_id
        self.model_type = model_type
        self.info = info
        self.kwargs = kwargs
        self.normalize = normalize
        self.load_seconds: float | None = None
        self._llama_cls = llama_cls
        self._llama: Any = None
        self._chat = chat
        self._is_eog = is_eog
        self._load_task: asyncio.Future[Any] | None = None
        self._lock = asyncio.Lock()  # one loader at a time (lazy engines load on first use)
        # The engine's own worker: a llama.cpp context is not thread-safe, and requests
        # queue here (not in a shared pool), so a busy model blocks nothing else.
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"engine-{model_id}"
        )
        self._closed = False
        # Counted in the event loop: waiting in the queue now, and how requests ended
        # (answered, dropped from the queue, or stopped mid-way because the caller left).
        self.requests = {"queued": 0, "completed": 0, "dropped": 0, "stopped": 0}
        self.busy = False  # whether the worker is running a request (set by the worker)
        self.last_stop_seconds: float | None = None  # caller left -> work ended (worker)
        self._active: set[threading.Event] = set()  # the cancel flags of requests under way

    @property
    def state(self) -> str:
        if self._llama is not None:
            return "loaded"
        if self._load_task is not None and not self._load_task.done():
            return "loading"
        return "unloaded"

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    @property
    def supports_chat(self) -> bool:
        """Whether ``/v1/chat/completions`` works: an llm with a usable chat template."""
        return self._chat is not None

    @property
    def details(self) -> dict[str, Any]:
        """What ``GET /v1/models/{id}`` shows: the GGUF facts and how it was loaded."""
        facts: dict[str, Any] = msgspec.to_builtins(self.info)
        for private in ("chat_template", "bos_token", "eos_token"):
            facts.pop(private, None)
        facts["chat_template"] = self._chat.source if self._chat is not None else None
        facts["n_ctx"] = self.kwargs.get("n_ctx")
        facts["n_gpu_layers"] = self.kwargs.get("n_gpu_layers")
        facts["main_gpu"] = self.kwargs.get("main_gpu")
        facts["logits_all"] = bool(self.kwargs.get("logits_all", False))
        facts["load_seconds"] = self.load_seconds
        facts["requests"] = {
            **self.requests,
            "running": self.busy,
            "last_stop_seconds": self.last_stop_seconds,
        }
        return facts

    async def load(self) -> Any:
        """Load the model now (in the engine's thread) unless it is loaded; returns the Llama.
        A cancelled caller does not cancel the load: the next caller gets its result."""
        async with self._lock:
            if self._closed:
                raise EngineError(f"Model {self.model_id} has been unloaded.")
            if self._llama is None:
                if self._load_task is None:
                    self._load_task = asyncio.wrap_future(self._worker.submit(self._construct))
                try:
                    self._llama = await asyncio.shield(self._load_task)
                except EngineError:
                    self._load_task = None
                    raise
            return self._llama

    def _construct(self) -> Any:
        started = time.perf_counter()
        try:
            llama = self._llama_cls(model_path=self.info.path, **self.kwargs)
        except Exception as exc:  # llama-cpp-python reports failures as assorted errors
            raise EngineError(
                f"llama.cpp could not load {os.path.basename(self.info.path)}: {exc}"
            ) from exc
        self.load_seconds = round(time.perf_counter() - started, 4)
        log.info("engine.loaded", model_id=self.model_id, seconds=self.load_seconds)
        return llama

    # --- the worker ---------------------------------------------------------------------

    async def _run(
        self, work: Callable[..., Iterator[Any]], *args: Any
    ) -> AsyncGenerator[Any, None]:
        """Run ``work(llama, cancelled, *args)`` in the engine's thread and yield what it
        yields. Closing this iterator (or cancelling its reader) sets ``cancelled``, which
        the work checks at every token, and drops the job if it has not started."""
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()
        cancelled_at = [0.0]  # when the reader went away (perf_counter)

        def put(kind: str, item: Any = None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody reads
                loop.call_soon_threadsafe(results.put_nowait, (kind, item))

        def job() -> None:
            self.busy = True  # written by this thread only
            try:
                if self._closed or self._llama is None:
                    raise EngineError(f"Model {self.model_id} has been unloaded.")
                if cancelled.is_set():
                    return
                put("start")
                items = work(self._llama, cancelled, *args)
                try:
                    for item in items:
                        if cancelled.is_set():
                            break
                        put("item", item)
                finally:
                    getattr(items, "close", lambda: None)()  # a generator: finish it here
                if cancelled.is_set() and self._closed:
                    raise EngineError(f"Model {self.model_id} was unloaded meanwhile.")
            except Exception as exc:  # noqa: BLE001 - the reader raises it in its own task
                put("error", exc)
            finally:
                if cancelled.is_set() and cancelled_at[0]:
                    # how long the work ran on after its caller left: at most one token
                    self.last_stop_seconds = time.perf_counter() - cancelled_at[0]
                self.busy = False
                put("end")

        stats = self.requests
        stats["queued"] += 1
        started = ended = False
        future = self._worker.submit(job)
        self._active.add(cancelled)
        try:
            while True:
                kind, item = await results.get()
                if kind == "start":
                    started = True
                    stats["queued"] -= 1
                elif kind == "end":
                    ended = True
                    return
                elif kind == "error":
                    ended = True
                    raise item
                else:
                    yield item
        finally:
            self._active.discard(cancelled)
            cancelled_at[0] = time.perf_counter()
            cancelled.set()
            if not started:
                stats["queued"] -= 1
            if future.cancel():  # still queued: it never runs
                stats["dropped"] += 1
            elif not ended:
                stats["stopped"] += 1  # running: it ends at its next token
            else:
                stats["completed"] += 1

    async def _one(self, work: Callable[..., Iterator[Any]], *args: Any) -> Any:
        """The single result of ``work`` (see ``_run``)."""
        async with contextlib.aclosing(self._run(work, *args)) as results:
            async for item in results:
                return item
        raise EngineError(f"Model {self.model_id} returned nothing.")

    # --- generation -----------------------------------------------------------------------

    def _require(self, kind: str, endpoint: str) -> None:
        if self.model_type != kind:
            raise InvalidRequest(
                f"Model {self.model_id} is an {self.model_type} model; {endpoint} needs an "
                f"{kind} model.",
                param="model",
            )

    async def generate(
        self, prompt: str | list[int], sampling: Sampling
    ) -> AsyncGenerator[Piece, None]:
        """Complete ``prompt`` (text or token ids), one piece per token or so; the last piece
        carries ``finish_reason`` and the token counts."""
        self._require("llm", "/v1/completions")
        self._check_logprobs(sampling)
        await self.load()
        async with contextlib.aclosing(self._run(self._generate_sync, prompt, sampling)) as it:
            async for piece in it:
                yield piece

    async def chat(
        self, messages: list[dict[str, Any]], sampling: Sampling
    ) -> AsyncGenerator[Piece, None]:
        """Answer ``messages`` (OpenAI chat messages with text content) through the model's
        chat template."""
        self._require("llm", "/v1/chat/completions")
        if self._chat is None:
            raise InvalidRequest(
                f"Model {self.model_id} has no chat template (its GGUF has no "
                "tokenizer.chat_template): use /v1/completions, or add the model again with "
                "loading_parameters.chat_template.",
                param="model",
            )
        self._check_logprobs(sampling)
        await self.load()
        async with contextlib.aclosing(self._run(self._chat_sync, messages, sampling)) as it:
            async for piece in it:
                yield piece

    def _check_logprobs(self, sampling: Sampling) -> None:
        if sampling.logprobs is not None and not self.kwargs.get("logits_all"):
            raise InvalidRequest(
                f"Model {self.model_id} was loaded without logits_all, which logprobs need; "
                "add it again with loading_parameters.logits_all: true.",
                param="logprobs",
            )

    def _n_ctx(self, llama: Any) -> int:
        # llama.cpp may pad the context (to 256); llama-cpp-python's buffers keep the size
        # asked for, so the smaller of the two is what fits.
        return min(int(llama.n_ctx()), int(getattr(llama.context_params, "n_ctx", 0)) or 1 << 30)

    def _chat_sync(
        self,
        llama: Any,
        cancelled: threading.Event,
        messages: list[dict[str, Any]],
        sampling: Sampling,
    ) -> Iterator[Piece]:
        assert self._chat is not None
        try:
            formatted = self._chat.formatter(messages=messages)
        except Exception as exc:  # the template's raise_exception, or a jinja2 error
            raise InvalidRequest(
                f"Model {self.model_id}'s chat template cannot format these messages: {exc}",
                param="messages",
            ) from exc
        tokens = llama.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop]
        stop = tuple(sampling.stop) + tuple(s for s in stops if s)
        chat_sampling = msgspec.structs.replace(sampling, stop=stop, echo=False)
        yield from self._generate_sync(llama, cancelled, tokens, chat_sampling)

    def _generate_sync(
        self,
        llama: Any,
        cancelled: threading.Event,
        prompt: str | list[int],
        sampling: Sampling,
    ) -> Iterator[Piece]:
        if isinstance(prompt, str):
            n_prompt = len(llama.tokenize(prompt.encode("utf-8"), add_bos=True))
        else:
            n_vocab = int(llama.n_vocab())
            if not prompt or not all(0 <= t < n_vocab for t in prompt):
                raise InvalidRequest(
                    f"prompt token ids must be between 0 and {n_vocab - 1}.", param="prompt"
                )
            n_prompt = len(prompt)
        n_ctx = self._n_ctx(llama)
        if n_prompt >= n_ctx - 1:
            raise InvalidRequest(
                f"The prompt is {n_prompt} tokens; model {self.model_id} has a context of "
                f"{n_ctx} tokens (loading_parameters.n_ctx).",
                param="prompt" if isinstance(prompt, str) else "messages",
            )
        # Stop one token short of the context's end (llama-cpp-python 0.3 fails on the very
        # last slot); a clipped completion ends with finish_reason "length".
        room = n_ctx - n_prompt - 1
        max_tokens = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
        # A fresh seed per request unless one is given (llama-cpp-python would otherwise
        # derive the same one every time); 0xFFFFFFFF means "random" to llama.cpp.
        seed = secrets.randbelow(0xFFFFFFFF) if sampling.seed is None else sampling.seed
        sampled: list[int] = []

        def generate(*args: Any, **kwargs: Any) -> Iterator[int]:
            # Llama.generate, counting the tokens and stopping once the caller has gone.
            for token in type(llama).generate(llama, *args, **kwargs):
                if cancelled.is_set():
                    return
                sampled.append(token)
                yield token

        llama.generate = generate  # an instance attribute: _create_completion calls it
        finish = "length"
        try:
            if sampling.echo and isinstance(prompt, str):
                yield Piece(text=prompt)
            chunks = llama.create_completion(
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,  # OpenAI semantics: no top-k or min-p cut unless asked
                min_p=0.0,
                repeat_penalty=1.0,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                logit_bias=dict(sampling.logit_bias) or None,
                logprobs=sampling.logprobs,
                stop=list(sampling.stop),
                seed=seed % 0xFFFFFFFF,
                stream=True,
            )
            for chunk in chunks:
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason") or finish
                if choice.get("text") or choice.get("logprobs"):
                    yield Piece(text=choice.get("text") or "", logprobs=choice.get("logprobs"))
                if cancelled.is_set():
                    return
        finally:
            with contextlib.suppress(AttributeError):
                del llama.generate
        is_eog = self._is_eog
        model = getattr(llama, "_model", None)
        vocab = getattr(model, "vocab", None)
        if is_eog is not None and vocab is not None:
            generated = sum(1 for t in sampled if not is_eog(vocab, t))
        else:
            generated = len(sampled) - (1 if finish == "stop" and sampled else 0)
        yield Piece(finish_reason=finish, prompt_tokens=n_prompt, completion_tokens=generated)

    async def complete_detailed(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """``{text, finish_reason, prompt_tokens, completion_tokens}`` for one prompt
        (greedy, as the engine answered before sampling fields existed)."""
        text: list[str] = []
        last = Piece()
        sampling = Sampling(max_tokens=max_tokens, temperature=0.0)
        async with contextlib.aclosing(self.generate(prompt, sampling)) as pieces:
            async for piece in pieces:
                text.append(piece.text)
                last = piece
        return {
            "text": "".join(text),
            "finish_reason": last.finish_reason or "stop",
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
        }

    async def complete(self, prompt: str, max_tokens: int) -> str:
        return str((await self.complete_detailed(prompt, max_tokens))["text"])

    # --- embeddings -----------------------------------------------------------------------

    def _embed_sync(
        self, llama: Any, cancelled: threading.Event, inputs: list[str] | list[list[int]]
    ) -> Iterator[Any]:
        if all(isinstance(i, str) for i in inputs):
            yield llama.embed(inputs, normalize=self.normalize, truncate=True, return_count=True)
            return
        # Token ids: Llama.embed tokenizes its inputs itself, so it is handed placeholders
        # whose "tokens" are the ids given.
        n_vocab = int(llama.n_vocab())
        ids = [[int(t) for t in i] for i in inputs]
        if not all(ids_ and all(0 <= t < n_vocab for t in ids_) for ids_ in ids):
            raise InvalidRequest(
                f"input token ids must be between 0 and {n_vocab - 1}.", param="input"
            )
        by_key = {f"\x00{n}".encode(): ids_ for n, ids_ in enumerate(ids)}

        def tokenize(text: bytes, *args: Any, **kwargs: Any) -> list[int]:
            return by_key[text]

        llama.tokenize = tokenize
        try:
            yield llama.embed(
                [key.decode() for key in by_key],
                normalize=self.normalize,
                truncate=True,
                return_count=True,
            )
        finally:
            del llama.tokenize

    async def embed_detailed(
        self, texts: list[str] | list[list[int]]
    ) -> tuple[list[list[float]], int]:
        """One vector per text (or list of token ids), mean-pooled if the model gives one per
        token, and the number of prompt tokens."""
        self._require("embedding", "/v1/embeddings")
        await self.load()
        vectors, tokens = await self._one(self._embed_sync, texts)
        return [_pooled(v, self.normalize) for v in vectors], int(tokens)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return (await self.embed_detailed(texts))[0]

    async def close(self) -> None:
        """Free the model (a generation under way stops at its next token); later calls
        fail cleanly."""
        self._closed = True
        for cancelled in list(self._active):
            cancelled.set()
        task = self._load_task
        if task is not None and not task.done():
            await asyncio.wait({task})
        llama = self._llama
        if llama is None and task is not None and task.done() and not task.cancelled():
            llama = task.result() if task.exception() is None else None
        self._llama = None
        if llama is not None:
            await asyncio.wrap_future(self._worker.submit(self._free, llama))
            log.info("engine.unloaded", model_id=self.model_id)
        self._worker.shutdown(wait=False)

    def _free(self, llama: Any) -> None:
        close = getattr(llama, "close", None)
        if close is not None:
            close()


def _pooled(vector: list[Any], normalize: bool) -> list[float]:
    """A per-token embedding (a list of vectors) mean-pooled into one vector."""
    if not vector or not isinstance(vector[0], list):
        return [float(x) for x in vector]
    width = len(vector[0])
    mean = [sum(tok[i] for tok in vector) / len(vector) for i in range(width)]
    if normalize:
        norm = math.sqrt(sum(x * x for x in mean)) or 1.0
        mean = [x / norm for x in mean]
    return mean
