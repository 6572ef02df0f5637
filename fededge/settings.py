"""Configuration of every fededge process: arguments > FEDEDGE_* env > TOML file > defaults."""

from __future__ import annotations

import contextvars
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fededge.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fededge.protocol.vocab import check_name

# The TOML file of the Settings being built; a context variable so that no global state leaks
# between two Settings built in one process (tests build many).
_TOML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("toml", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BrokerSettings(_Section):
    """How to reach the MQTT broker."""

    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port")
    protocol: Literal["3.1.1", "5"] = "5"
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = Field(False, description="skip hostname verification (testing only)")
    keepalive: int = Field(30, ge=5, le=3600)
    session_expiry: int = Field(7 * 24 * 3600, ge=0, description="MQTT 5 session expiry, s")
    connect_timeout: float = Field(15.0, gt=0)
    reconnect_min_delay: float = Field(0.5, gt=0)
    reconnect_max_delay: float = Field(30.0, gt=0)
    # Chunked transfer (protocol.md "Chunked transfer"): the broker's limit on one message
    # (AWS IoT Core 131072, EMQX 1048576 by default, Mosquitto max_packet_size); None: no limit.
    max_message_bytes: int | None = Field(
        None, ge=4096, description="broker's largest MQTT packet; larger messages are chunked"
    )
    chunk_timeout: float = Field(120.0, gt=0, description="s a partial transfer may stall")
    chunk_max_bytes: int = Field(
        300 * 1024 * 1024, ge=1 << 20, description="bytes all partial transfers may reserve"
    )
    chunk_max_transfers: int = Field(32, ge=1, le=100_000, description="partial transfers held")
    inbox_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1 << 20,
        description="payload bytes received and not yet processed, per client; past it the "
        "client stops reading and the broker holds the rest",
    )  # fmt: skip

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"expected mqtt://host[:port] or mqtts://host[:port], got {v!r}")
        try:
            _ = parts.port
        except ValueError as e:
            raise ValueError(f"bad port in {v!r}: {e}") from None
        if parts.path not in ("", "/"):
            raise ValueError(f"broker URL takes no path, got {v!r}")
        return v

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "client_id")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


class AggregatorSettings(_Section):
    """Operational settings of the aggregator service (learning parameters live in the plan)."""

    max_update_bytes: int | None = Field(
        None,
        ge=1024,
        description="largest update payload; default: what the model's size implies "
        "(2x the model message + 64 KiB); when set, that is capped at this",
    )
    versions_kept: int = Field(10, ge=1, description="model versions kept on disk")
    checkpoint_every: int = Field(32, ge=1, description="accumulator checkpoint every N updates")
    checkpoint_min_bytes: int = Field(
        4 << 20, ge=0, description="...once the WAL since the last one holds this many bytes"
    )
    fsync: bool = Field(True, description="fsync the write-ahead log before acknowledging")
    direct_io: bool = Field(
        True, description="write large checkpoints with O_DIRECT (off by itself where refused)"
    )
    group_commit_max: int = Field(500, ge=1, le=1000, description="updates per WAL group commit")
    commit_delay: float = Field(
        0.02, ge=0, le=5,
        description="s a group commit may wait for more updates while they keep arriving",
    )  # fmt: skip
    parallel_kernels: bool = Field(False, description="use the multi-threaded accumulate kernel")
    unmask_threads: int | None = Field(
        None,
        ge=1,
        description="threads removing masks at secure-aggregation unmasking; default: one per CPU",
    )
    metrics: bool = Field(True, description="serve Prometheus metrics over HTTP")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535, description="0 picks a free port")
    recent_update_ids: int = Field(100_000, ge=100, description="update ids remembered for dedup")
    status_interval: float = Field(10.0, gt=0, description="seconds between status publications")
    fleet_max_devices: int = Field(
        100_000, ge=1, description="devices the fleet gauges keep state for (oldest forgotten)"
    )
    standby: bool = Field(
        False, description="wait as a standby while another instance holds the task's lease"
    )
    lease_settle: float = Field(
        1.0, gt=0, le=60, description="s to wait for rival claims after claiming the lease"
    )
    shards: int = Field(0, ge=0, le=256, description="shard workers of a sharded task (0: none)")
    shard_id: int | None = Field(None, ge=0, description="run as this shard worker")
    coordinator: bool = Field(False, description="run as the coordinator of a sharded task")
    gateways: list[str] = Field(
        default_factory=list,
        description="sites whose gateways' partial sums the coordinator merges (gateway-{site})",
    )
    shard_group: str | None = Field(
        None,
        description="MQTT shared-subscription group of the shard workers (default: "
        "fededge-{task}); set one devices cannot guess (docs/operations.md)",
    )
    shard_batch: int | None = Field(
        None, ge=1, description="updates per partial sum (default: min_updates_per_version)"
    )
    ship_interval: float = Field(1.0, gt=0, description="s after which a partial batch is sent")
    ship_timeout: float = Field(10.0, gt=0, description="s without an answer before resending")
    lease_refresh: float = Field(
        10.0,
        gt=0,
        description="s between lease refreshes; a lease 3x older with no refresh "
        "is stale (its holder vanished without the broker sending its will)",
    )
    signing_key: Path | None = Field(
        None, description="Ed25519 private key (PEM, 0600) that signs model versions and receipts"
    )

    @field_validator("gateways")
    @classmethod
    def _gateways(cls, v: list[str]) -> list[str]:
        return [check_name(site, "aggregator.gateways") for site in v]

    @field_validator("shard_group")
    @classmethod
    def _shard_group(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "shard_group")


class DeviceSettings(_Section):
    """Settings of the device daemon."""

    device_id: str = Field(default_factory=lambda: _default_device_id())
    socket_path: Path | None = Field(
        None, description="API socket path; default: state_dir/api.sock"
    )
    socket_group: str | None = None
    socket_mode: int = Field(0o660, ge=0, le=0o777, description="e.g. 0o660 in TOML, '660' in env")
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_examples: int = Field(100_000, ge=1, description="examples kept in the store")
    max_example_age: float = Field(30 * 24 * 3600.0, gt=0, description="seconds an example is kept")
    receipt_timeout: float = Field(60.0, gt=0, description="resend an update after this many s")
    evaluate_before_training: bool = True
    metrics: bool = Field(True, description="serve Prometheus metrics over HTTP")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9465, ge=0, le=65535, description="0 picks a free port")
    metrics_textfile: Path | None = Field(
        None, description="also write the metrics to this file (node_exporter textfile collector)"
    )
    metrics_textfile_interval: float = Field(
        15.0, gt=0, description="seconds between writes of metrics_textfile"
    )
    seed: int | None = Field(None, description="RNG seed for shuffling/noise (None = OS entropy)")

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        return check_name(v, "device_id")

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal_mode(cls, v: object) -> object:
        # File modes are octal to people: "660", "0660" and "0o660" (env, TOML strings) all
        # mean rw-rw----; a TOML integer written 0o660 arrives as an int already.
        if isinstance(v, str):
            text = v.strip().lower().removeprefix("0o")
            if not text or any(c not in "01234567" for c in text):
                raise ValueError(f"expected an octal file mode like 660 or 0o660, got {v!r}")
            return int(text, 8)
        return v


class GatewaySettings(_Section):
    """A site gateway (``fededge gateway``, docs/operations.md "Site gateways").

    It folds the updates of one site's devices on the site broker and sends their partial sum
    upstream through the broker bridge; ``broker`` is the site broker. Folding reuses
    ``aggregator.fsync``, ``commit_delay``, ``group_commit_max`` and ``max_update_bytes``.
    """

    site: str | None = Field(None, description="name of the site (gateway-{site} upstream)")
    signing_key: Path | None = Field(
        None, description="Ed25519 private key (PEM, 0600) that signs the gateway's receipts"
    )
    ship_interval: float = Field(
        5.0, gt=0, description="s after a batch's first update before it is sent upstream"
    )
    ship_timeout: float = Field(
        30.0, gt=0, description="s without the central answer before the batch is sent again"
    )

    @field_validator("site")
    @classmethod
    def _site(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "gateway.site")


class TrustSettings(_Section):
    """Whose signatures this process trusts (docs/security.md). Empty: it trusts the broker.

    Each value is a public key (``ed25519:<base64>``) or the path of a file holding one;
    several keys separated by commas are all trusted (key rotation).
    """

    owner_key: str | None = Field(None, description="model owner's public key(s): plan, graph")
    aggregator_key: str | None = Field(
        None, description="aggregator's public key(s): model versions, receipts"
    )

    gateway_key: str | None = Field(
        None, description="site gateway's public key(s): receipts only (docs/operations.md)"
    )

    def owner_keys(self) -> list[Ed25519PublicKey]:
        """The model owner's trusted keys (empty: plans and graphs are not verified)."""
        return trusted_keys(self.owner_key, "trust.owner_key")

    def aggregator_keys(self) -> list[Ed25519PublicKey]:
        """The aggregator's trusted keys (empty: models and receipts are not verified)."""
        return trusted_keys(self.aggregator_key, "trust.aggregator_key")

    def gateway_keys(self) -> list[Ed25519PublicKey]:
        """Site gateways' keys, trusted for receipts only (never for models)."""
        return trusted_keys(self.gateway_key, "trust.gateway_key")


def trusted_keys(value: str | None, what: str) -> list[Ed25519PublicKey]:
    """Public keys from a comma-separated list of ``ed25519:...`` texts or key file paths."""
    if value is None or not value.strip():
        return []
    # Imported here: fededge.keys imports cryptography's serialization, which a process that
    # trusts nobody need not load.
    from fededge.keys import load_public

    return [load_public(part, what) for part in value.split(",") if part.strip()]


class PrivacySettings(_Section):
    """The device's privacy floor: a plan or round below it is refused (no training, no update)."""

    require_secure_aggregation: bool = Field(
        False, description="refuse plans without secure aggregation"
    )
    min_noise_multiplier: float = Field(
        0.0, ge=0, description="refuse plans whose noise sigma/clip is below this"
    )
    max_clip_norm: float | None = Field(
        None, gt=0, description="refuse plans whose clip norm is above this"
    )
    min_threshold: int = Field(1, ge=1, description="refuse secure rounds with a lower threshold t")
    min_cohort: int = Field(1, ge=1, description="refuse secure rounds with fewer devices")


def _default_device_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
    return host or "device"


def _default_state_dir() -> Path:
    # systemd's StateDirectory= sets STATE_DIRECTORY; otherwise follow the XDG layout.
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "fededge"


class Settings(BaseSettings):
    """Everything a fededge process is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="FEDEDGE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    task: str = "digits"
    topic_prefix: str = "fededge"
    state_dir: Path = Field(default_factory=_default_state_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    aggregator: AggregatorSettings = Field(default_factory=AggregatorSettings)
    device: DeviceSettings = Field(default_factory=DeviceSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    trust: TrustSettings = Field(default_factory=TrustSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return check_name(v, "task")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or any(c in v for c in "#+\0") or v.startswith("/") or v.endswith("/"):
            raise ValueError(
                f"topic_prefix must be a plain topic path without wildcards, got {v!r}"
            )
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if creds := os.environ.get("CREDENTIALS_DIRECTORY"):
            # systemd's LoadCredential=: one file per secret, named like its environment
            # variable (FEDEDGE_BROKER__PASSWORD); below the environment, above the TOML file.
            sources.append(NestedSecretsSettingsSource(
                file_secret_settings, secrets_dir=creds, secrets_nested_delimiter="__"
            ))  # fmt: skip
        if (path := _TOML_FILE.get()) is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(
    config: Path | str | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the effective settings; every problem becomes a ConfigError naming key and value.

    ``overrides`` are nested dicts from command-line arguments; ``None`` values are ignored so
    an option that was not given does not shadow the environment or the file.
    """
    path = Path(config) if config is not None else None
    if path is not None:
        _check_toml(path)
    _check_env()
    kwargs = _drop_none(overrides or {})
    token = _TOML_FILE.set(path)
    try:
        return Settings(**kwargs)
    except pydantic.ValidationError as e:
        raise ConfigError(_describe(e, path)) from None
    finally:
        _TOML_FILE.reset(token)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            if sub := _drop_none(v):
                out[k] = sub
        elif v is not None:
            out[k] = v
    return out


def _check_toml(path: Path) -> None:
    try:
        with path.open("rb") as f:
            tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _check_env() -> None:
    # pydantic-settings ignores FEDEDGE_* variables that match no field; a typo there would
    # silently do nothing, so reject them like unknown TOML keys.
    known = {name.upper() for name in Settings.model_fields}
    for key in os.environ:
        if key.startswith("FEDEDGE_"):
            top = key[len("FEDEDGE_") :].split("__", 1)[0]
            if top not in known:
                raise ConfigError(
                    f"environment variable {key}: unknown setting {top.lower()!r}; "
                    f"expected one of {sorted(k.lower() for k in known)}"
                )


def _describe(e: pydantic.ValidationError, path: Path | None) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a fededge setting)"
        elif err["type"] == "missing":
            msg = "required but not set"
        else:
            msg = err["msg"]
        shown = "***" if "password" in key else repr(value)
        lines.append(f"{key} = {shown}: {msg}")
    where = f" (config file {path}, FEDEDGE_* environment or arguments)" if path else ""
    return "invalid configuration" + where + ":\n  " + "\n  ".join(lines)


def settings_as_toml_dict(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain TOML-able data (secrets masked, None dropped)."""
    data = settings.model_dump(mode="json")
    data["device"]["socket_mode"] = f"{settings.device.socket_mode:o}"  # octal, as people read it
    if settings.broker.password is not None:
        data["broker"]["password"] = "***"
    return _drop_none(data)
