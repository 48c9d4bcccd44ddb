"""The ``modelkernel`` command.

``serve`` runs the server on a config file (or the embedded defaults). The other commands talk
to a running server over HTTP (``--server URL`` or MODELKERNEL_SERVER, ``--api-key K`` or
MODELKERNEL_API_KEY): ``pull``, ``ls``, ``show``, ``pause``, ``resume``, ``cancel``, ``rm``,
``models``.

Exit codes: 0 ok, 1 the API answered with an error (its message goes to stderr), 2 usage,
3 cannot connect to the server, 4 the download ended failed or cancelled (``pull`` without
``--detach``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

from kernel import __version__
from kernel.config import ConfigError, Settings, load_settings
from kernel.errors import KernelError
from kernel.log import configure_logging
from kernel.validation import MODEL_ID

if TYPE_CHECKING:
    from kernel.api.schemas import Download
    from kernel.client import Client

__all__ = ["main", "model_id_from_ref"]

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_CONNECT, EXIT_ENDED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

log = structlog.get_logger()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelkernel",
        description="Run a modelkernel server, or start, watch and control its downloads.",
        epilog="Exit codes: 0 ok, 1 API error, 2 usage, 3 cannot connect, "
        "4 download failed or cancelled (pull), 130 interrupted.",
        parents=[_common(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"modelkernel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", "-c", help="YAML or TOML config file (default: none)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--models-dir", help="where model files go (storage.models_dir)")
    serve.add_argument("--state-dir", help="where the state database lives (storage.state_dir)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    _add_client_commands(commands, _common(suppress=True))
    return parser


def _common(*, suppress: bool) -> argparse.ArgumentParser:
    """``--server`` and ``--api-key``, accepted before or after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    common.add_argument(
        "--server",
        default=default,
        metavar="URL",
        help="server URL (env MODELKERNEL_SERVER, default http://127.0.0.1:8080)",
    )
    common.add_argument(
        "--api-key",
        default=default,
        metavar="K",
        help="API key, sent as X-API-Key (env MODELKERNEL_API_KEY)",
    )
    return common


def _add_client_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    pull = commands.add_parser(
        "pull", parents=[common], help="start a download and follow it until it ends"
    )
    pull.add_argument("ref", metavar="REF", help="http(s)://..., hf://owner/repo/path[@rev]")
    pull.add_argument(
        "--id",
        dest="model_id",
        help="the model id to store it as (default: derived from REF, see `modelkernel pull -h`)",
    )
    follow = pull.add_mutually_exclusive_group()
    follow.add_argument(
        "--detach", action="store_true", help="return once the server has accepted it"
    )
    follow.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)  # the default now
    pull.add_argument("--sha256", help="expected SHA-256 of the file")
    pull.add_argument(
        "--filename",
        help="file name under the models directory; with hf://owner/repo, a pattern that "
        "picks the file (or the shards of one split model)",
    )
    pull.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="with hf://owner/repo: pull every file matching PATTERN as one model (repeatable)",
    )
    pull.add_argument("--type", dest="model_type", choices=["llm", "embedding"], help="model type")
    ls = commands.add_parser("ls", parents=[common], help="list downloads")
    ls.add_argument("--all", action="store_true", help="include ended downloads")
    ls.add_argument("--json", action="store_true", help="print the API's JSON")
    show = commands.add_parser("show", parents=[common], help="one download in detail")
    show.add_argument("model_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print the API's JSON")
    for name, text in (("pause", "pause a download"), ("resume", "resume a paused download")):
        action = commands.add_parser(name, parents=[common], help=text)
        action.add_argument("model_id", metavar="ID")
    cancel = commands.add_parser("cancel", parents=[common], help="cancel a download (or --all)")
    cancel.add_argument("model_id", metavar="ID", nargs="?")
    cancel.add_argument("--all", action="store_true", help="cancel every active download")
    rm = commands.add_parser(
        "rm", parents=[common], help="forget a download and delete its file (cancels it first)"
    )
    rm.add_argument("model_id", metavar="ID")
    rm.add_argument("--keep-file", action="store_true", help="forget the record, keep the file")
    commands.add_parser("models", parents=[common], help="list the models with engines")


def serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, json=args.log_json)
    try:
        settings = load_settings(
            args.config,
            overrides={
                "server.host": args.host,
                "server.port": args.port,
                "storage.models_dir": args.models_dir,
                "storage.state_dir": args.state_dir,
            },
        )
    except ConfigError as exc:
        print(f"modelkernel: {exc.message}", file=sys.stderr)  # noqa: T201
        return 2
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    from kernel.api.app import create_app
    from kernel.core import Kernel
    from kernel.serving import RateLimitedErrors, raise_nofile_limit, server_config

    # One repeated loop error (accept() failing with EMFILE) is logged once per interval.
    asyncio.get_running_loop().set_exception_handler(RateLimitedErrors())
    raise_nofile_limit()

    try:
        kernel = Kernel(settings)
        await kernel.start()  # before binding: a held lock or bad state is a clean exit 1
    except KernelError as exc:
        print(f"modelkernel: {exc.message}", file=sys.stderr)  # noqa: T201
        return 1
    app = create_app(kernel)
    config = server_config(
        app, settings.server, log_config=None, access_log=False, timeout_graceful_shutdown=1
    )
    server = _Server(config, on_exit=app.state.event_streams.close)
    log.info("server.listening", host=settings.server.host, port=settings.server.port)
    try:
        await server.serve()  # the app's lifespan stops the kernel on the way out
    finally:
        await kernel.stop()
    return 0


class _Server(uvicorn.Server):
    """uvicorn's Server, where a second SIGINT or SIGTERM exits at once, and the first one
    also calls ``on_exit`` in the loop (ending event streams, which would hold shutdown)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            log.warning("server.forced_exit", signal=sig)
            os._exit(128 + sig)
        log.info("server.stopping", signal=sig)
        super().handle_exit(sig, frame)
        if self.on_exit is not None:
            try:
                asyncio.get_running_loop().call_soon_threadsafe(self.on_exit)
            except RuntimeError:  # no loop running here
                self.on_exit()


# --- the client commands ----------------------------------------------------------------------


def _out(text: str = "") -> None:
    print(text)  # noqa: T201 - this is the CLI's output


def _err(text: str) -> None:
    print(f"modelkernel: {text}", file=sys.stderr)  # noqa: T201


def _client(args: argparse.Namespace) -> Client:
    from kernel.client import DEFAULT_SERVER, Client

    server = getattr(args, "server", None) or os.environ.get("MODELKERNEL_SERVER") or DEFAULT_SERVER
    key = getattr(args, "api_key", None) or os.environ.get("MODELKERNEL_API_KEY") or None
    return Client(server, api_key=key, timeout=30.0)


def run_client_command(args: argparse.Namespace) -> int:
    """Run one client command; map failures to the documented exit codes."""
    from kernel.client import ApiConnectionError, ApiError

    commands: dict[str, Callable[[Client, argparse.Namespace], int]] = {
        "pull": _pull, "ls": _ls, "show": _show, "pause": _pause, "resume": _resume,
        "cancel": _cancel, "rm": _rm, "models": _models,
    }  # fmt: skip
    try:
        with _client(args) as client:
            return commands[args.command](client, args)
    except ApiConnectionError as exc:
        _err(exc.message)
        return EXIT_CONNECT
    except ApiError as exc:
        _err(exc.message)
        return EXIT_API
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_GLOB = re.compile(r"[*?\[]")


def model_id_from_ref(ref: str) -> str | None:
    """The model id ``pull`` uses when ``--id`` is absent, or None when none can be made.

    The last path component of the reference (an ``hf://`` revision, a URL's query and
    fragment dropped), or the repository name when that component is a pattern; then the
    file extension and a shard suffix (``-00001-of-00003``) removed, lower-cased, every run
    of characters a model id cannot hold turned into one ``-``, cut to 128 characters.
    ``hf://Qwen/Qwen2.5-0.5B-Instruct/qwen2.5-0.5b-instruct-q4_k_m.bin`` gives
    ``qwen2.5-0.5b-instruct-q4_k_m``.
    """
    path = ref.split("://", 1)[-1].split("#", 1)[0].split("?", 1)[0]
    if ref.startswith("hf://"):
        path = path.split("@", 1)[0]
    parts = [p for p in path.split("/") if p]
    if ref.startswith(("http://", "https://")):
        parts = parts[1:]  # the host is not a name
    while parts and _GLOB.search(parts[-1]):
        parts.pop()  # a pattern names no one file: fall back to the repository
    if not parts:
        return None
    name = parts[-1]
    stem, dot, ext = name.rpartition(".")
    if dot and stem and ext.isalnum() and len(ext) <= 12:
        name = stem
    name = _SHARD.sub("", name).lower()
    name = re.sub(r"[^a-z0-9._+-]+", "-", name).lstrip("._+-")[:128].rstrip("-")
    return name if MODEL_ID.fullmatch(name) else None


def _pull(client: Client, args: argparse.Namespace) -> int:
    from kernel.client import ApiError

    model_id = args.model_id or model_id_from_ref(args.ref)
    if model_id is None:
        _err(f"cannot make a model id from {args.ref!r}: pass --id ID")
        return EXIT_USAGE
    if not args.model_id:
        clash = _taken_by_another(client, model_id, args.ref)
        if clash is not None:
            _err(
                f"the model id {model_id!r} (derived from REF) is already used by {clash}; "
                "choose another with --id ID"
            )
            return EXIT_API
    wait = not args.detach
    opts = {
        "sha256": args.sha256, "filename": args.filename, "model_type": args.model_type,
        "include": args.include,
    }  # fmt: skip
    try:
        created = client.create(model_id, args.ref, **opts)
    except ApiError as exc:
        if not (wait and exc.code == "download_exists"):
            raise
        _err(f"{model_id} is already downloading; following it")
    else:
        if not wait:
            _out(f"{created.model_id}: {created.status} -> {created.local_path}")
            return EXIT_OK
    try:
        final = _follow(client, model_id)
    except KeyboardInterrupt:
        _err(
            f"stopped following; {model_id} goes on on the server "
            f"(modelkernel cancel {model_id} stops it)"
        )
        return EXIT_INTERRUPTED
    if final.status == "completed":
        _out(f"{final.model_id}: completed -> {final.local_path}")
        return EXIT_OK
    reason = final.error_message if isinstance(final.error_message, str) else final.status
    _err(f"{final.model_id} {final.status}: {reason}")
    return EXIT_ENDED


def _taken_by_another(client: Client, model_id: str, ref: str) -> str | None:
    """The URL of another file already stored under ``model_id``, or None when the id is
    free or holds this same reference (then pulling again resumes or re-checks it)."""
    from kernel.client import ApiError

    try:
        existing = client.get(model_id)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    return None if existing.url == ref else existing.url


def _follow(client: Client, model_id: str) -> Download:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
        DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    final = None
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(model_id, total=None)
        shards: dict[str, Any] = {}  # a multi-file download: one bar per file under the total
        for final in client.follow(model_id):
            total = final.progress.total_bytes or None
            label = model_id if final.status == "downloading" else f"{model_id} ({final.status})"
            bar.update(
                task, completed=final.progress.downloaded_bytes, total=total, description=label
            )
            for f in final.files if isinstance(final.files, list) else []:
                if f.path not in shards:
                    shards[f.path] = bar.add_task(f"  {f.path}", total=None)
                size = f.total_bytes or None
                bar.update(shards[f.path], completed=f.downloaded_bytes, total=size)
    assert final is not None
    return final


def _ls(client: Client, args: argparse.Namespace) -> int:
    import msgspec

    listing = client.list(all=args.all)
    if args.json:
        _out(msgspec.json.encode(listing).decode())
        return EXIT_OK
    if not listing.active_downloads:
        _out("No downloads." if args.all else "No active downloads.")
        return EXIT_OK
    rows = [("MODEL ID", "STATUS", "PROGRESS", "DOWNLOADED", "SPEED", "ETA")]
    for d in listing.active_downloads:
        p = d.progress
        eta = d.timing.estimated_remaining_seconds
        rows.append((
            d.model_id, d.status, f"{p.percentage:.1f}%",
            f"{_size(p.downloaded_bytes)} / {_size(p.total_bytes) if p.total_bytes else '?'}",
            f"{_size(p.download_speed_bps)}/s" if p.download_speed_bps else "-",
            _duration(eta) if isinstance(eta, int) else "-",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _show(client: Client, args: argparse.Namespace) -> int:
    import msgspec

    d = client.get(args.model_id)
    if args.json:
        _out(msgspec.json.encode(d).decode())
        return EXIT_OK
    p, t = d.progress, d.timing
    total = _size(p.total_bytes) if p.total_bytes else "unknown size"
    lines = [
        ("model_id", d.model_id), ("status", d.status),
        ("type", f"{d.type} ({d.download_type} download)"), ("url", d.url),
        ("local_path", d.local_path),
        ("progress", f"{p.percentage:.1f}% ({_size(p.downloaded_bytes)} of {total})"),
        ("elapsed", _duration(t.elapsed_seconds)),
    ]  # fmt: skip
    if p.download_speed_bps > 0:
        lines.append(("speed", f"{_size(p.download_speed_bps)}/s"))
    if isinstance(t.estimated_remaining_seconds, int):
        lines.append(("remaining", _duration(t.estimated_remaining_seconds)))
    optional: list[tuple[str, Any]] = [
        ("error", d.error_message), ("last_error", d.last_error), ("attempts", d.attempts),
        ("sha256", d.sha256), ("queue_position", d.queue_position),
    ]  # fmt: skip
    lines += [(label, str(value)) for label, value in optional if isinstance(value, str | int)]
    engine = d.engine_creation
    if not isinstance(engine, msgspec.UnsetType):
        how = "at once" if engine.load_immediately else "on first use"
        name = engine.inference_engine if isinstance(engine.inference_engine, str) else "engine"
        lines.append(("engine", f"{name} on GPU {engine.main_gpu_id}, loads {how}"))
    for f in d.files if isinstance(d.files, list) else []:
        size = _size(f.total_bytes) if f.total_bytes else "?"
        lines.append(("file", f"{f.path} {f.status} {f.percentage:.1f}% of {size}"))
    width = max(len(label) for label, _ in lines) + 1
    for label, value in lines:
        _out(f"{(label + ':').ljust(width)} {value}")
    return EXIT_OK


def _pause(client: Client, args: argparse.Namespace) -> int:
    _out(f"{client.pause(args.model_id).message}: {args.model_id}")
    return EXIT_OK


def _resume(client: Client, args: argparse.Namespace) -> int:
    _out(f"{client.resume(args.model_id).message}: {args.model_id}")
    return EXIT_OK


def _cancel(client: Client, args: argparse.Namespace) -> int:
    if not args.all:
        result = client.cancel(args.model_id)
        _out(f"{result.message}: {args.model_id} (was {result.previous_status})")
        return EXIT_OK
    bulk = client.cancel_all()
    _out(f"Cancelled {bulk.summary.successful_cancellations} download(s)")
    for row in bulk.cancelled_downloads:
        _out(f"  {row.model_id} (was {row.previous_status})")
    for failed in bulk.failed_cancellations:
        _err(f"could not cancel {failed.model_id} ({failed.status}): {failed.reason}")
    return EXIT_OK if not bulk.failed_cancellations else EXIT_API


def _rm(client: Client, args: argparse.Namespace) -> int:
    result = client.purge(args.model_id, delete_file=not args.keep_file)
    if result.file_deleted:
        _out(f"Removed {args.model_id} and its file")
    else:
        _out(f"Removed {args.model_id} (no file deleted)")
    return EXIT_OK


def _models(client: Client, args: argparse.Namespace) -> int:
    models = client.models()
    if not models:
        _out("No models.")
        return EXIT_OK
    rows = [("MODEL ID", "STATUS", "TYPE", "ENGINE", "PATH")]
    rows += [(m.model_id, m.status, m.model_type, m.inference_engine, m.model_path) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _size(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def _duration(seconds: int) -> str:
    minutes, secs = divmod(max(0, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "serve":
        return serve(args)
    if args.command == "cancel" and bool(args.model_id) == bool(args.all):
        _err("cancel takes one ID or --all")
        return EXIT_USAGE
    return run_client_command(args)


if __name__ == "__main__":
    sys.exit(main())
