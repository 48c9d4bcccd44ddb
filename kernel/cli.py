"""``modelkernel serve``: run the server on a config file (or the embedded defaults)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from types import FrameType

import structlog
import uvicorn

from kernel import __version__
from kernel.config import ConfigError, Settings, load_settings
from kernel.errors import KernelError
from kernel.log import configure_logging

__all__ = ["main"]

log = structlog.get_logger()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelkernel", description=__doc__)
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
    return parser


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

    try:
        kernel = Kernel(settings)
        await kernel.start()  # before binding: a held lock or bad state is a clean exit 1
    except KernelError as exc:
        print(f"modelkernel: {exc.message}", file=sys.stderr)  # noqa: T201
        return 1
    config = uvicorn.Config(
        create_app(kernel),
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = _Server(config)
    log.info("server.listening", host=settings.server.host, port=settings.server.port)
    try:
        await server.serve()  # the app's lifespan stops the kernel on the way out
    finally:
        await kernel.stop()
    return 0


class _Server(uvicorn.Server):
    """uvicorn's Server, where a second SIGINT or SIGTERM exits at once."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            log.warning("server.forced_exit", signal=sig)
            os._exit(128 + sig)
        log.info("server.stopping", signal=sig)
        super().handle_exit(sig, frame)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
