"""``modelkernel serve``: run the server on a config file (or the embedded defaults)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import structlog

from kernel import __version__
from kernel.config import ConfigError, load_settings
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
    import uvicorn

    from kernel.api.app import create_app
    from kernel.core import Kernel

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
        kernel = Kernel(settings)
    except ConfigError as exc:
        print(f"modelkernel: {exc.message}", file=sys.stderr)  # noqa: T201
        return 2
    app = create_app(kernel)
    log.info("server.listening", host=settings.server.host, port=settings.server.port)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
