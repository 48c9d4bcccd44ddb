"""Settings: a YAML or TOML file decoded into msgspec Structs, then env and CLI overrides.

Every key has a default, so no file at all is valid. Unknown keys are an error naming the key.
``MODELKERNEL_SECTION__KEY=value`` overrides one key (``MODELKERNEL_DOWNLOADS__RETRY__ATTEMPTS=3``);
the value is parsed as YAML, so numbers and booleans keep their type.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from kernel.errors import KernelError

__all__ = [
    "MAX_RATE",
    "AuthSettings",
    "CacheSettings",
    "ConfigError",
    "CorsSettings",
    "DownloadSettings",
    "FleetSettings",
    "HubSettings",
    "ModelEntry",
    "NetworkSettings",
    "PluginSettings",
    "Rate",
    "RateLimitSettings",
    "RetrySettings",
    "S3CacheSettings",
    "ServerSettings",
    "Settings",
    "SourcesSettings",
    "StorageSettings",
    "StoreSettings",
    "load_settings",
]

ENV_PREFIX = "MODELKERNEL_"


class ConfigError(KernelError):
    """The configuration file or an override is invalid; the message names the key."""


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    # Host header names accepted besides loopback ones while bound to loopback (DNS rebinding);
    # ".example.com" also matches its subdomains, "*" turns the check off.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    # Open connections at most (a new one past it closes the longest-idle one; kernel/serving.py)
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    # Seconds a new connection has to send its request head before it is closed
    header_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0


class StorageSettings(_Section):
    models_dir: str = "./models"
    state_dir: str = "./.modelkernel"


NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
MAX_RATE = 1 << 40  # 1 TiB/s: a bandwidth cap above this is a typo, not a limit
Rate = Annotated[int, msgspec.Meta(ge=0, le=MAX_RATE)]  # bytes per second, 0 = unlimited
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class RetrySettings(_Section):
    attempts: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    backoff_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 1.0


class DownloadSettings(_Section):
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 4
    max_bytes_per_second: Rate = 0  # 0 = unlimited
    stall_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    retry: RetrySettings = msgspec.field(default_factory=RetrySettings)
    retention_days: Annotated[int, msgspec.Meta(ge=0, le=36_500)] = 0  # 0 = keep forever
    connections: Annotated[int, msgspec.Meta(ge=1, le=32)] = 4  # per large download
    segment_min_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 50)] = 64 << 20


class RateLimitSettings(_Section):
    max_requests: Annotated[int, msgspec.Meta(ge=1)] = 600
    window_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0


class AuthSettings(_Section):
    require_api_key: bool = False
    api_keys: list[str] = msgspec.field(default_factory=list)
    metrics_public: bool = False  # serve /metrics without a key
    rate_limit: RateLimitSettings | None = None  # per client address; None = no limit
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1 << 20


class CorsSettings(_Section):
    allowed_origins: list[str] = msgspec.field(default_factory=lambda: ["*"])


class HubSettings(_Section):
    endpoint: str | None = None  # None: HF_ENDPOINT, else https://huggingface.co
    token: str | None = None  # None: HF_TOKEN, else the huggingface_hub token file


class SourcesSettings(_Section):
    huggingface: HubSettings = msgspec.field(default_factory=HubSettings)


class NetworkSettings(_Section):
    """How the downloader reaches origins. ``ca_bundle``: a PEM file (or a directory of hashed
    certificates) trusted instead of the system store; see kernel/tls.py for the order."""

    ca_bundle: str | None = None
    # Destination policy (kernel/netpolicy.py): CIDRs and host names; allow wins over deny
    allow: list[str] = msgspec.field(default_factory=list)
    deny: list[str] = msgspec.field(default_factory=list)
    deny_private: bool = False  # also refuse loopback and private ranges (multi-tenant)


class PluginSettings(_Section):
    disable: list[str] = msgspec.field(default_factory=list)


class ModelEntry(_Section):
    """One entry of Kolosal's ``models:`` list."""

    id: str
    path: str
    type: str = "llm"
    load_immediately: bool = True
    main_gpu_id: int = 0
    inference_engine: str | None = None  # None: the default engine
    load_params: dict[str, Any] = msgspec.field(default_factory=dict)


class StoreSettings(_Section):
    """Where download records live: ``sqlite`` (embedded, the default) or ``postgres`` (shared
    by a fleet; needs the ``[fleet]`` extra). The DSN may also come from ``MODELKERNEL_STORE_DSN``;
    libpq's own variables (``PGPASSWORD``, ``PGSSLMODE``...) apply as usual."""

    kind: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str | None = None


class FleetSettings(_Section):
    """This node in a fleet: its id in the shared store, and the timing of the fleet's leases."""

    node_id: str | None = None  # None: the host name
    api_url: str | None = None  # how other nodes and operators reach this node (shown only)
    lease_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 15.0
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 3.0
    poll_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 1.0
    listen: bool = True  # LISTEN/NOTIFY; false behind poolers that drop it (PgBouncer)


class S3CacheSettings(_Section):
    """An S3-compatible bucket (AWS S3, MinIO, Ceph RGW, SeaweedFS) as the fleet's cache."""

    endpoint: str  # https://s3.eu-west-1.amazonaws.com, http://minio:9000 ...
    bucket: str
    region: str = "us-east-1"
    prefix: str = "modelkernel/"
    access_key_env: str = "AWS_ACCESS_KEY_ID"  # names of env vars, never the keys themselves
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 (a variable name)
    part_size: Annotated[int, msgspec.Meta(ge=5 << 20, le=5 << 30)] = 16 << 20


class CacheSettings(_Section):
    s3: S3CacheSettings | None = None


class Settings(_Section):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    downloads: DownloadSettings = msgspec.field(default_factory=DownloadSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    cors: CorsSettings = msgspec.field(default_factory=CorsSettings)
    sources: SourcesSettings = msgspec.field(default_factory=SourcesSettings)
    network: NetworkSettings = msgspec.field(default_factory=NetworkSettings)
    plugins: PluginSettings = msgspec.field(default_factory=PluginSettings)
    models: list[ModelEntry] = msgspec.field(default_factory=list)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    fleet: FleetSettings = msgspec.field(default_factory=FleetSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc.strerror}.") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"Config file {path} is not valid: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    return data


def _env_value(raw: str) -> Any:
    """Lists and mappings are parsed as YAML; scalars stay text and are converted to the
    field's type by the lax conversion, so ``models_dir=2024`` stays the string "2024"."""
    try:
        parsed = yaml.safe_load(raw) if raw else raw
    except yaml.YAMLError:
        return raw
    return parsed if isinstance(parsed, (dict, list)) else raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"Environment variable {name} overrides a non-section key.")
            node = child
        node[keys[-1]] = _env_value(raw)


def settings_from_dict(data: Mapping[str, Any]) -> Settings:
    try:
        return msgspec.convert(dict(data), Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"Invalid configuration: {exc}") from exc


def load_settings(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load settings from ``path`` (YAML or TOML), then env vars, then ``overrides``
    (dotted keys such as ``"server.port"``, used by CLI flags)."""
    data = _read_file(Path(path)) if path is not None else {}
    _apply_env(data, os.environ if environ is None else environ)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"Cannot set {dotted}: {key!r} is not a section in the config.")
            node = child
        node[last] = value
    return settings_from_dict(data)
