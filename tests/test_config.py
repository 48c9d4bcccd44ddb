"""Settings: defaults from API.md, YAML and TOML files, env and dotted overrides, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.config import ConfigError, ModelEntry, Settings, load_settings

NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -------------------------------------------------------------------------------


def test_no_file_at_all_gives_the_defaults_of_api_md() -> None:
    s = load_settings(environ=NO_ENV)
    assert s.server.host == "127.0.0.1"
    assert s.server.port == 8080
    assert s.storage.models_dir == "./models"
    assert s.storage.state_dir == "./.modelkernel"
    assert s.downloads.max_concurrent == 4
    assert s.downloads.max_bytes_per_second == 0
    assert s.downloads.stall_timeout_s == 30
    assert s.downloads.retry.attempts == 5
    assert s.downloads.retry.backoff_seconds == 1.0
    assert s.auth.require_api_key is False
    assert s.auth.api_keys == []
    assert s.cors.allowed_origins == ["*"]
    assert s.plugins.disable == []
    assert s.models == []


def test_the_defaults_are_the_same_as_a_bare_settings_struct() -> None:
    assert load_settings(environ=NO_ENV) == Settings()


def test_mutable_defaults_are_not_shared_between_instances() -> None:
    a, b = Settings(), Settings()
    a.cors.allowed_origins.append("https://example.com")
    a.plugins.disable.append("http_source")
    assert b.cors.allowed_origins == ["*"]
    assert b.plugins.disable == []


# --- files ----------------------------------------------------------------------------------


def test_a_yaml_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "config.yaml",
        """
server: {host: 0.0.0.0, port: 9000}
storage: {models_dir: /srv/models}
downloads:
  max_concurrent: 2
  max_bytes_per_second: 1048576
  retry: {attempts: 7, backoff_seconds: 0.5}
auth: {require_api_key: true, api_keys: [k1, k2]}
cors: {allowed_origins: ["https://a.example"]}
plugins: {disable: [hf_source]}
""",
    )
    s = load_settings(path, environ=NO_ENV)
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9000)
    assert s.storage.models_dir == "/srv/models"
    assert s.storage.state_dir == "./.modelkernel"  # untouched keys keep their default
    assert s.downloads.max_concurrent == 2
    assert s.downloads.max_bytes_per_second == 1048576
    assert s.downloads.stall_timeout_s == 30
    assert (s.downloads.retry.attempts, s.downloads.retry.backoff_seconds) == (7, 0.5)
    assert s.auth.require_api_key is True
    assert s.auth.api_keys == ["k1", "k2"]
    assert s.cors.allowed_origins == ["https://a.example"]
    assert s.plugins.disable == ["hf_source"]


def test_a_yml_file_loads_as_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yml", "server:\n  port: 9001\n")
    assert load_settings(path, environ=NO_ENV).server.port == 9001


def test_a_toml_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "config.toml",
        """
[server]
host = "0.0.0.0"
port = 9100

[downloads]
max_concurrent = 3

[downloads.retry]
attempts = 2
backoff_seconds = 0.25

[auth]
require_api_key = true
api_keys = ["secret"]

[[models]]
id = "qwen"
path = "https://example.com/qwen.gguf"
""",
    )
    s = load_settings(str(path), environ=NO_ENV)
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9100)
    assert s.downloads.max_concurrent == 3
    assert (s.downloads.retry.attempts, s.downloads.retry.backoff_seconds) == (2, 0.25)
    assert s.auth.api_keys == ["secret"]
    assert [m.id for m in s.models] == ["qwen"]


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_an_empty_yaml_file_is_valid_and_gives_the_defaults(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "config.yaml", text)
    assert load_settings(path, environ=NO_ENV) == Settings()


def test_an_empty_toml_file_is_valid_and_gives_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "config.toml", "")
    assert load_settings(path, environ=NO_ENV) == Settings()


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_a_file_that_is_not_a_mapping_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "config.yaml", text)
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(path, environ=NO_ENV)


def test_a_missing_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "config.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV)
    assert str(path) in info.value.message


def test_invalid_yaml_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "server: {host: [\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV)
    assert str(path) in info.value.message


def test_invalid_toml_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "config.toml", "[server\nport = \n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV)
    assert str(path) in info.value.message


# --- errors name the key --------------------------------------------------------------------


def test_an_unknown_key_names_the_key_and_its_section(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "server: {hots: 0.0.0.0}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV)
    assert "hots" in info.value.message
    assert "$.server" in info.value.message


def test_an_unknown_nested_key_names_the_nested_section(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "downloads: {retry: {atempts: 3}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV)
    assert "atempts" in info.value.message
    assert "$.downloads.retry" in info.value.message


def test_an_unknown_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "sever: {port: 1}\n")
    with pytest.raises(ConfigError, match="sever"):
        load_settings(path, environ=NO_ENV)


def test_an_unknown_key_in_a_models_entry_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "models:\n  - {id: a, path: /m.gguf, gpu: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV)
    assert "gpu" in info.value.message
    assert "$.models[0]" in info.value.message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("server: {port: eighty}\n", "$.server.port"),
        ("downloads: {max_concurrent: many}\n", "$.downloads.max_concurrent"),
        ("auth: {require_api_key: [yes]}\n", "$.auth.require_api_key"),
        ("cors: {allowed_origins: '*'}\n", "$.cors.allowed_origins"),
        ("server: 8080\n", "$.server"),
    ],
)
def test_a_wrong_type_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, "config.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV)
    assert field in info.value.message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("server: {port: 70000}\n", "$.server.port"),
        ("downloads: {max_concurrent: 0}\n", "$.downloads.max_concurrent"),
        ("downloads: {max_bytes_per_second: -1}\n", "$.downloads.max_bytes_per_second"),
        ("downloads: {stall_timeout_s: 0}\n", "$.downloads.stall_timeout_s"),
        ("downloads: {retry: {attempts: -1}}\n", "$.downloads.retry.attempts"),
    ],
)
def test_an_out_of_range_value_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, "config.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV)
    assert field in info.value.message


# --- env and overrides ----------------------------------------------------------------------


def test_an_env_var_overrides_a_nested_key_with_its_yaml_type() -> None:
    s = load_settings(environ={"MODELKERNEL_DOWNLOADS__RETRY__ATTEMPTS": "3"})
    assert s.downloads.retry.attempts == 3
    assert type(s.downloads.retry.attempts) is int


def test_env_vars_keep_booleans_floats_and_lists() -> None:
    s = load_settings(
        environ={
            "MODELKERNEL_AUTH__REQUIRE_API_KEY": "true",
            "MODELKERNEL_AUTH__API_KEYS": "[k1, k2]",
            "MODELKERNEL_DOWNLOADS__STALL_TIMEOUT_S": "2.5",
            "MODELKERNEL_SERVER__HOST": "0.0.0.0",
        }
    )
    assert s.auth.require_api_key is True
    assert s.auth.api_keys == ["k1", "k2"]
    assert s.downloads.stall_timeout_s == 2.5
    assert s.server.host == "0.0.0.0"


def test_an_env_var_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "server: {host: 10.0.0.1, port: 9000}\n")
    s = load_settings(path, environ={"MODELKERNEL_SERVER__PORT": "9500"})
    assert s.server.port == 9500
    assert s.server.host == "10.0.0.1"


def test_unrelated_env_vars_are_ignored() -> None:
    s = load_settings(environ={"PATH": "/bin", "HOME": "/root", "MODELKERNEL_LOG": "debug"})
    assert s == Settings()


def test_an_env_var_for_an_unknown_key_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="prot"):
        load_settings(environ={"MODELKERNEL_SERVER__PROT": "1"})


def test_an_env_var_with_a_wrong_type_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\$\.server\.port"):
        load_settings(environ={"MODELKERNEL_SERVER__PORT": "eighty"})


def test_an_env_var_into_a_non_section_key_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "server: 5\n")
    with pytest.raises(ConfigError):
        load_settings(path, environ={"MODELKERNEL_SERVER__PORT": "1"})


def test_an_env_var_for_a_string_field_keeps_a_numeric_looking_value_as_text() -> None:
    s = load_settings(environ={"MODELKERNEL_STORAGE__MODELS_DIR": "2024"})
    assert s.storage.models_dir == "2024"


def test_dotted_overrides_win_over_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "server: {host: 10.0.0.1, port: 9000}\n")
    s = load_settings(
        path,
        environ={"MODELKERNEL_SERVER__PORT": "9500", "MODELKERNEL_SERVER__HOST": "10.0.0.2"},
        overrides={"server.port": 9999, "storage.models_dir": "/tmp/m"},
    )
    assert s.server.port == 9999
    assert s.server.host == "10.0.0.2"  # env still wins over the file where no override is given
    assert s.storage.models_dir == "/tmp/m"


def test_a_nested_dotted_override_is_applied() -> None:
    s = load_settings(environ=NO_ENV, overrides={"downloads.retry.attempts": 9})
    assert s.downloads.retry.attempts == 9
    assert s.downloads.retry.backoff_seconds == 1.0


def test_a_none_override_leaves_the_value_alone() -> None:
    # CLI flags that were not given arrive as None.
    s = load_settings(environ={"MODELKERNEL_SERVER__PORT": "9500"}, overrides={"server.port": None})
    assert s.server.port == 9500


def test_a_bad_override_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\$\.server\.port"):
        load_settings(environ=NO_ENV, overrides={"server.port": "eighty"})


def test_a_dotted_override_into_a_non_section_key_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "server: 5\n")
    with pytest.raises(ConfigError):
        load_settings(path, environ=NO_ENV, overrides={"server.port": 1})


# --- the Kolosal models list ----------------------------------------------------------------


KOLOSAL_MODELS = """
models:
  - id: qwen-0.5b
    path: https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/qwen.gguf
    type: llm
    load_immediately: true
    main_gpu_id: 0
    inference_engine: llama-cpp
    load_params:
      n_ctx: 4096
      n_keep: 2048
      use_mlock: true
      use_mmap: true
      cont_batching: true
      warmup: false
      n_parallel: 1
      n_gpu_layers: 100
      n_batch: 2048
  - id: embed
    path: ./models/embed.gguf
    type: embedding
    load_immediately: false
    main_gpu_id: 1
"""


def test_a_kolosal_models_list_parses(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", KOLOSAL_MODELS)
    s = load_settings(path, environ=NO_ENV)
    assert len(s.models) == 2
    qwen, embed = s.models
    assert isinstance(qwen, ModelEntry)
    assert qwen.id == "qwen-0.5b"
    assert qwen.path.startswith("https://huggingface.co/")
    assert qwen.type == "llm"
    assert qwen.load_immediately is True
    assert qwen.main_gpu_id == 0
    assert qwen.inference_engine == "llama-cpp"
    assert qwen.load_params["n_ctx"] == 4096
    assert qwen.load_params["use_mlock"] is True
    assert qwen.load_params["n_gpu_layers"] == 100
    assert len(qwen.load_params) == 9
    assert embed.id == "embed"
    assert embed.type == "embedding"
    assert embed.load_immediately is False
    assert embed.main_gpu_id == 1
    assert embed.inference_engine is None  # the default engine, chosen when the kernel starts
    assert embed.load_params == {}


@pytest.mark.parametrize("missing", ["id", "path"])
def test_a_models_entry_without_id_or_path_is_a_config_error(tmp_path: Path, missing: str) -> None:
    entry = {"id": "a", "path": "/m.gguf"}
    del entry[missing]
    body = ", ".join(f"{k}: {v}" for k, v in entry.items())
    path = write(tmp_path, "config.yaml", f"models:\n  - {{{body}}}\n")
    with pytest.raises(ConfigError, match=missing):
        load_settings(path, environ=NO_ENV)
