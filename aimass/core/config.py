"""One typed configuration for every AI Mass process.

Values come from, in rising precedence: the defaults below (which run the embedded
stack), a TOML file (``--config FILE`` or ``AIMASS_CONFIG``), and ``AIMASS_<SECTION>_<KEY>``
environment variables (e.g. ``AIMASS_KAFKA_BOOTSTRAP=broker:9092``). A bad value fails
at start with a ``ConfigError`` naming the key and what it accepts.

Secrets (passwords, tokens, HMAC keys) are never read from the file: each secret field
names the environment variable that holds it, and ``Config.secret()`` reads it.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from aimass.core.procs import PRIORITIES


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


def _choices(*values: str) -> dict:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None) -> dict:
    return {"range": (lo, hi)}


@dataclass
class RunConfig:
    """Where the local stack keeps PIDs, ports, logs and data."""

    dir: str = ".aimass/run"
    log_level: str = field(default="INFO", metadata=_choices("DEBUG", "INFO", "WARNING", "ERROR"))
    metrics_host: str = "127.0.0.1"  # where stages serve Prometheus metrics; 0.0.0.0 in containers
    # CPU priority of predict and sink when one machine runs every stage (`aimass demo`): "idle"
    # (Linux SCHED_IDLE) gives them only CPU time the reading -> alert path (bridge, workers,
    # alerter) leaves, so the burst of predictions at every window close never delays a threshold
    # alarm; under full load they lag (Kafka holds their input). "low" = 10 nice steps; "normal".
    # Clusters separate stages with CPU requests instead.
    background_priority: str = field(default="idle", metadata=_choices(*PRIORITIES))


@dataclass
class MqttConfig:
    """MQTT broker connection (the bridge, the simulator, replay)."""

    host: str = "127.0.0.1"
    port: int = field(default=1883, metadata=_range(1, 65535))
    username: str = ""
    password_env: str = "AIMASS_MQTT_PASSWORD"  # name of the env var holding the password
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_insecure: bool = False
    topic_pattern: str = "aimass/{tenant}/{device_id}/telemetry"
    labels_pattern: str = "aimass/{tenant}/{device_id}/labels"
    qos: int = field(default=1, metadata=_choices("0", "1"))
    keepalive_s: int = field(default=30, metadata=_range(5, 3600))
    # The embedded Mosquitto (`aimass up`, the demo): true = no anonymous clients; users are
    # mqtt.username ($password_env) and the "user:password" entries of $embedded_users_env, under
    # the per-device ACL. A cert + key file make its listener TLS-only (clients: mqtt.tls).
    embedded_auth: bool = False
    embedded_users_env: str = "AIMASS_MQTT_USERS"
    embedded_tls_cert_file: str = ""
    embedded_tls_key_file: str = ""


@dataclass
class KafkaConfig:
    """Kafka (or Kafka-protocol broker) connection and topic layout."""

    bootstrap: str = "127.0.0.1:9092"
    partitions: int = field(default=6, metadata=_range(1, 1024))
    replication: int = field(default=1, metadata=_range(1, 16))
    topic_prefix: str = "aimass"
    security_protocol: str = field(
        default="PLAINTEXT", metadata=_choices("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    )
    sasl_mechanism: str = field(default="PLAIN", metadata=_choices("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    sasl_username: str = ""
    sasl_password_env: str = "AIMASS_KAFKA_PASSWORD"
    ssl_ca_file: str = ""
    session_timeout_ms: int = field(default=6000, metadata=_range(1000, 300000))
    # Longest a fetch waits for data. Some brokers (the local Tansu) hold a fetch until this
    # runs out even when data arrives, so every hop of the pipeline adds up to it.
    fetch_max_wait_ms: int = field(default=100, metadata=_range(1, 10000))
    # Largest record value any stage produces: Arrow batches are split into records below it.
    # At most the broker's message.max.bytes (Kafka's default: 1 MiB).
    max_record_bytes: int = field(default=1024 * 1024, metadata=_range(16 * 1024, 16 * 1024 * 1024))


# Room for an MQTT PUBLISH's headers on top of bridge.max_payload_bytes: fixed header (5), topic
# (2 + its length: topics up to ~4 KB), packet id (2) and v5 properties. The bridge announces
# max_payload_bytes + this as its MQTT v5 Maximum Packet Size, and every shipped Mosquitto
# config sets it as max_packet_size.
MQTT_HEADER_ALLOWANCE = 4096


@dataclass
class BridgeConfig:
    """MQTT -> Kafka bridge: validation limits and micro-batch flushing."""

    client_id: str = "aimass-bridge"
    # MQTT v5 shared subscription group ($share/<group>/...) for several bridges; "" = a plain
    # subscription (one bridge). Mosquitto 2.0 does not restore shared subscriptions after a
    # broker restart, so messages published before the bridges re-subscribe would be dropped.
    share_group: str = ""
    max_payload_bytes: int = field(default=65536, metadata=_range(64, 16 * 1024 * 1024))
    # A Kafka record per partition per flush: every downstream stage pays per record, so bigger
    # records cost less CPU per reading (measured: 200 ms vs 50 ms cut publish->alert p99 at 5k/s
    # from 1.3 s to 0.4 s); flush_ms is also the most the bridge adds to latency.
    flush_readings: int = field(default=20000, metadata=_range(1, 1_000_000))
    flush_ms: int = field(default=200, metadata=_range(1, 60_000))
    max_future_s: float = field(default=300.0, metadata=_range(0, None))
    max_past_days: float = field(default=3650.0, metadata=_range(0, None))
    receive_maximum: int = field(default=10000, metadata=_range(20, 65535))
    metrics_port: int = field(default=9101, metadata=_range(0, 65535))
    # The broker keeps the bridge's subscription and queues its messages this long while it is down.
    session_expiry_s: int = field(default=86400, metadata=_range(0, 4294967295))
    # Kafka must confirm a record within this; else the bridge starts a new producer and sends it again.
    kafka_timeout_s: float = field(default=30.0, metadata=_range(1, 3600))

    @property
    def max_packet_bytes(self) -> int:
        """The largest MQTT packet the bridge and the broker accept."""
        return self.max_payload_bytes + MQTT_HEADER_ALLOWANCE


@dataclass
class CleanConfig:
    """The clean stage: dedup horizon, lateness, clock skew."""

    dedup_horizon_s: float = field(default=600.0, metadata=_range(0, None))
    allowed_lateness_s: float = field(default=5.0, metadata=_range(0, None))
    max_clock_skew_s: float = field(default=60.0, metadata=_range(0, None))  # vs the bridge receive time
    drop_non_finite: bool = True  # false: non-finite values pass to the clean topic (windows skip them)
    units_file: str = ""  # TOML [metrics.NAME] unit/min/max overriding streams/units.py defaults


@dataclass
class WindowConfig:
    """The window stage: tumbling and sliding window sizes and EWMA / z-score history."""

    sizes_s: str = "10,60"  # comma separated tumbling window sizes in seconds
    sliding_s: str = "30/10"  # comma separated sliding windows SIZE/HOP in seconds ("" = none)
    ewma_alpha: float = field(default=0.3, metadata=_range(0.0, 1.0))
    zscore_history: int = field(default=30, metadata=_range(2, 100000))  # in hops of the window
    zscore_min_history: int = field(default=10, metadata=_range(2, None))  # z-score 0 until this many history means
    # (with 5, 3 of 200 simulated 70 s runs of 12 clean series had a window with |z| > 6; with 10, none)
    # a series without readings this long (processing time) has its windows closed; >= the largest window
    idle_close_s: float = field(default=120.0, metadata=_range(1, None))

    def sizes(self) -> list[int]:
        return [int(s) for s in self.sizes_s.split(",") if s.strip()]

    def specs(self) -> list[tuple[int, int]]:
        """(size_s, hop_s) of every window: tumbling ones have hop == size."""
        try:
            specs = [(s, s) for s in self.sizes()]
            for item in filter(str.strip, self.sliding_s.split(",")):
                size, hop = item.split("/")
                specs.append((int(size), int(hop)))
        except ValueError:
            raise ConfigError(f"config key window.sizes_s / window.sliding_s: {self.sizes_s!r} / "
                              f"{self.sliding_s!r} is not valid; accepted: '10,60' and '30/10,...'") from None
        sizes = [size for size, _ in specs]
        if not specs or len(set(sizes)) != len(sizes) or any(h <= 0 or s % h for s, h in specs):
            raise ConfigError("config keys window.sizes_s / window.sliding_s: every window size must be "
                              "positive, appear once (it is part of the window key) and be a multiple of its hop")
        return specs


@dataclass
class WorkerConfig:
    """Faust workers (clean + window agents)."""

    app_id: str = "aimass"
    data_dir: str = ""  # default: <run dir>/worker-<port>
    web_port: int = field(default=6066, metadata=_range(0, 65535))
    metrics_port: int = field(default=9102, metadata=_range(0, 65535))


@dataclass
class TritonConfig:
    """Triton Inference Server: where it is and how the predict stage talks to it."""

    # gRPC host:port of a Triton run elsewhere (a cluster's service); empty: the tritonserver the
    # embedded stack starts (`aimass up`, the demo, a backtest), 127.0.0.1:<grpc_port>
    url: str = ""
    http_port: int = field(default=8000, metadata=_range(1, 65535))
    grpc_port: int = field(default=8001, metadata=_range(1, 65535))
    metrics_port: int = field(default=8002, metadata=_range(1, 65535))
    model_repository: str = "triton_repo"
    timeout_s: float = field(default=2.0, metadata=_range(0.01, 600))
    max_rows_per_request: int = field(default=4096, metadata=_range(1, 1_000_000))
    max_in_flight: int = field(default=8, metadata=_range(1, 1024))
    breaker_failures: int = field(default=3, metadata=_range(1, 1000))
    breaker_reset_s: float = field(default=5.0, metadata=_range(0.1, 3600))

    def grpc_address(self) -> str:
        """host:port the predict stage's gRPC client connects to: ``url``, else the embedded Triton."""
        return self.url or f"127.0.0.1:{self.grpc_port}"


@dataclass
class PredictConfig:
    """The predict stage."""

    history_windows: int = field(default=8, metadata=_range(2, 1024))
    window_s: int = field(default=10, metadata=_range(1, 86400))
    checkpoint_every_s: float = field(default=5.0, metadata=_range(0.1, 3600))
    metrics_port: int = field(default=9103, metadata=_range(0, 65535))
    band_k: float = field(default=3.0, metadata=_range(0.0, 100.0))  # band = forecast +- band_k * residual rms


@dataclass
class DetectConfig:
    """The predict stage's online detectors (``aimass.models.series_model``, ``device_model``).

    Scores are 1 - 0.5^(statistic / q): 0.5 at the statistic's normal 99th percentile ``q``."""

    warmup_windows: int = field(default=30, metadata=_range(2, 100_000))  # a series is not judged before
    long_windows: int = field(default=8640, metadata=_range(10, 10_000_000))  # residual-scale memory (1 day of 10 s)
    regime_windows: int = field(default=60, metadata=_range(2, 10_000_000))  # outlier windows in a row = new normal
    forecast_alpha: float = field(default=0.3, metadata=_range(0.001, 1.0))  # Holt level weight
    forecast_beta: float = field(default=0.05, metadata=_range(0.0, 1.0))  # Holt trend weight
    q_level: float = field(default=2.6, metadata=_range(0.01, None))  # |z| of the one-step residual
    q_spread: float = field(default=2.6, metadata=_range(0.01, None))  # |z| of log window std
    q_change: float = field(default=6.0, metadata=_range(0.01, None))  # CUSUM statistic
    device_warmup_windows: int = field(default=45, metadata=_range(3, 256))
    device_slow_ratio: float = field(default=20.0, metadata=_range(1.0, None))  # between / within variance
    device_shrink: float = field(default=0.3, metadata=_range(0.0, 1.0))
    device_alarm_score: float = field(default=0.86, metadata=_range(0.0, 1.0))  # the device rule's threshold
    device_clear_windows: int = field(default=6, metadata=_range(1, 10_000))
    device_reopen_distance: float = field(default=1.0, metadata=_range(0.0, None))
    device_reopen_s: float = field(default=20.0, metadata=_range(0.0, None))
    device_reopen_tau_s: float = field(default=120.0, metadata=_range(1.0, None))
    device_adapt_s: float = field(default=1800.0, metadata=_range(1.0, None))


@dataclass
class AlertConfig:
    """Rules, alarms and notification delivery."""

    rules_path: str = "rules/examples"
    reload_s: float = field(default=2.0, metadata=_range(0.1, 3600))
    state_dir: str = ""  # default: <run dir>/alerts
    api_host: str = "127.0.0.1"
    api_port: int = field(default=8080, metadata=_range(0, 65535))
    api_token_env: str = "AIMASS_API_TOKEN"  # `aimass alerts` sends it; on the alerter: one admin token "default"
    api_tokens_env: str = "AIMASS_API_TOKENS"  # on the alerter: "name:role:secret,..." (role: read|operate|admin)
    api_rate_per_s: float = field(default=20.0, metadata=_range(0.1, 100_000))  # per token
    api_burst: int = field(default=40, metadata=_range(1, 1_000_000))
    # per client address, for requests without a valid token (guessing, /healthz)
    api_address_rate_per_s: float = field(default=5.0, metadata=_range(0.1, 100_000))
    api_address_burst: int = field(default=50, metadata=_range(1, 1_000_000))
    api_max_body_bytes: int = field(default=16384, metadata=_range(256, 16 * 1024 * 1024))
    # POST /pipeline-alerts: Alertmanager posts a whole group (alertmanager.yml's max_alerts bounds it)
    pipeline_max_body_bytes: int = field(default=262144, metadata=_range(1024, 16 * 1024 * 1024))
    api_tls_cert_file: str = ""  # both set: the API serves HTTPS only
    api_tls_key_file: str = ""
    api_tls_ca_file: str = ""  # `aimass alerts` and peers: CA that signed the API's certificate (default: the system's)
    # host:port,... of the other alerter replicas (a name resolving to all of them, e.g. a headless
    # Service): every replica's API then answers for all alarms ("" = this replica's only)
    api_peers: str = ""
    api_peer_timeout_s: float = field(default=2.0, metadata=_range(0.1, 60))
    notify: bool = True  # false: alarms are raised and stored, but no receiver is notified (backtests)
    webhook_secret_env: str = "AIMASS_WEBHOOK_SECRET"  # the demo generates this secret when unset
    max_attempts: int = field(default=15, metadata=_range(1, 100))
    backoff_initial_s: float = field(default=0.5, metadata=_range(0.01, 3600))
    backoff_max_s: float = field(default=60.0, metadata=_range(0.01, 86400))  # 15 attempts ~ 9 min
    metrics_port: int = field(default=9104, metadata=_range(0, 65535))
    outcome_horizon_s: float = field(default=600.0, metadata=_range(1, None))  # how long a prediction waits for its window
    label_grace_s: float = field(default=60.0, metadata=_range(0, None))  # detections may trail a label's end by this
    anomaly_threshold: float = field(default=0.8, metadata=_range(0.0, 1.0))  # model detection = score crossing this
    quality_every_s: float = field(default=10.0, metadata=_range(0.1, 86400))  # how often quality rows are emitted
    # Batches start at most this often: each one costs a state transaction, a flush and a commit
    # (~2-4 ms of CPU) however few records it holds; this is also the most it adds to alert latency.
    batch_interval_ms: int = field(default=100, metadata=_range(0, 10_000))
    # Engine / join / quality checkpoints and offset commits happen at most this often (alarms,
    # notifications and events are saved every batch); a crash replays at most this much input,
    # which the engine and the alarm store absorb. 0 = every batch.
    checkpoint_ms: int = field(default=1000, metadata=_range(0, 600_000))


@dataclass
class StateConfig:
    """Per-partition checkpoints of predict and the alerter (aimass.streams.statestore)."""

    # kafka: a compacted topic, so replicas need no shared volume; files: one directory (single host)
    store: str = field(default="files", metadata=_choices("files", "kafka"))
    dir: str = ""  # files store: default <run dir>/state
    key_env: str = "AIMASS_STATE_KEY"  # HMAC key of checkpoints; required by the kafka store (same for all replicas)


# TTLs are `toDateTime(time) + INTERVAL n DAY`, and DateTime ends in 2106: a row whose expiry
# falls past that wraps around to the 1970s and is deleted at once (36,500 days did this to every
# row). 20,000 days keeps a row written now safe until 2051. 0 = no TTL: rows are kept forever.
MAX_TTL_DAYS = 20000


@dataclass
class ClickHouseConfig:
    """The store: embedded chDB (default) or a ClickHouse server URL."""

    url: str = ""  # empty: chDB under <run dir>/chdb; else clickhouse://user:password@host:9000/db
    database: str = "aimass"
    password_env: str = "AIMASS_CLICKHOUSE_PASSWORD"
    secure: bool = False
    tls_ca_file: str = ""  # CA bundle that signed the server's certificate (default: the system's)
    ttl_days: int = field(default=30, metadata=_range(0, MAX_TTL_DAYS))  # 0 = keep forever
    ttl_overrides: str = ""  # per-table TTL in days, e.g. "readings=7,readings_1h=365"
    flush_rows: int = field(default=200000, metadata=_range(1, 10_000_000))
    flush_ms: int = field(default=1000, metadata=_range(10, 600_000))
    # Tables other than readings get few rows, but every insert has a fixed cost: buffer them longer.
    side_flush_factor: int = field(default=5, metadata=_range(1, 1000))
    metrics_port: int = field(default=9105, metadata=_range(0, 65535))
    group_id: str = "aimass-sink"  # Kafka consumer group of the sink
    retry_initial_s: float = field(default=0.5, metadata=_range(0.01, 3600))
    retry_max_s: float = field(default=30.0, metadata=_range(0.01, 86400))
    connect_timeout_s: float = field(default=5.0, metadata=_range(0.1, 600))
    query_port: int = field(default=9125, metadata=_range(0, 65535))  # sink's read-only SQL endpoint (chDB mode)
    query_token_env: str = "AIMASS_QUERY_TOKEN"  # its bearer token; unset: generated into <run dir>/query-token
    query_timeout_s: float = field(default=30.0, metadata=_range(0.1, 3600))  # per query on that endpoint
    query_max_rows: int = field(default=5_000_000, metadata=_range(1, 1_000_000_000))  # result rows per query
    query_max_bytes: int = field(default=512 << 20, metadata=_range(1024, 1 << 40))  # result bytes per query
    query_max_concurrent: int = field(default=2, metadata=_range(1, 64))  # queries at once; more get 429
    query_max_threads: int = field(default=2, metadata=_range(1, 256))  # engine threads per query


@dataclass
class Config:
    """The whole configuration."""

    run: RunConfig = field(default_factory=RunConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    alert: AlertConfig = field(default_factory=AlertConfig)
    clickhouse: ClickHouseConfig = field(default_factory=ClickHouseConfig)
    state: StateConfig = field(default_factory=StateConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir).resolve()

    @staticmethod
    def secret(env_name: str) -> str:
        """Read a secret from the environment (never from files, never logged)."""
        return os.environ.get(env_name, "")


def _convert(key: str, raw: Any, typ: Any, meta: dict) -> Any:
    """Convert a raw file/env value to the field's type, naming the key on failure."""
    try:
        if typ is bool:
            if isinstance(raw, bool):
                value: Any = raw
            elif str(raw).strip().lower() in ("1", "true", "yes", "on"):
                value = True
            elif str(raw).strip().lower() in ("0", "false", "no", "off"):
                value = False
            else:
                raise ValueError
        elif typ is int:
            if isinstance(raw, bool):
                raise ValueError
            value = int(str(raw).strip())
        elif typ is float:
            value = float(str(raw).strip())
        else:
            value = str(raw)
    except ValueError:
        accepted = {bool: "true/false", int: "an integer", float: "a number"}.get(typ, "a string")
        raise ConfigError(f"config key {key}: {raw!r} is not valid; accepted: {accepted}") from None
    choices = meta.get("choices")
    if choices and str(value) not in choices:
        raise ConfigError(f"config key {key}: {raw!r} is not valid; accepted: {', '.join(choices)}")
    lo, hi = meta.get("range", (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise ConfigError(f"config key {key}: {raw!r} is out of range; accepted: {bounds}")
    return value


def _section_fields(section: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


def _apply(cfg: Config, section_name: str, key: str, raw: Any, origin: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections:
        raise ConfigError(f"{origin}: unknown config section {section_name!r}; accepted: {', '.join(sorted(sections))}")
    section = getattr(cfg, section_name)
    fields = _section_fields(section)
    if key not in fields:
        raise ConfigError(
            f"{origin}: unknown config key {section_name}.{key}; accepted: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(type(section))
    typ = hints[key]
    if get_origin(typ) is Literal:
        typ = type(get_args(typ)[0])
    setattr(section, key, _convert(f"{section_name}.{key}", raw, typ, dict(fields[key].metadata)))


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Build the configuration from defaults, an optional TOML file and the environment."""
    env = dict(os.environ if env is None else env)
    cfg = Config()
    path = path or env.get("AIMASS_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (from --config or AIMASS_CONFIG)")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: {exc}") from None
        for section_name, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config file {p}: top-level key {section_name!r} must be a [section]")
            for key, raw in values.items():
                if "password" in key and not key.endswith("_env") or key in ("token", "secret"):
                    raise ConfigError(
                        f"config file {p}: {section_name}.{key}: secrets are read from the environment only; "
                        f"set the variable named by {section_name}.{key}_env instead"
                    )
                _apply(cfg, section_name, key, raw, f"config file {p}")
    sections = sorted((f.name for f in dataclasses.fields(Config)), key=len, reverse=True)
    for name, raw in env.items():
        if not name.startswith("AIMASS_") or name == "AIMASS_CONFIG":
            continue
        rest = name[len("AIMASS_"):].lower()
        for section_name in sections:
            if rest.startswith(section_name + "_"):
                key = rest[len(section_name) + 1:]
                if key in _section_fields(getattr(cfg, section_name)):
                    _apply(cfg, section_name, key, raw, f"environment {name}")
                break
    return cfg


def describe(cfg: Config | None = None) -> list[tuple[str, str, str, str]]:
    """Rows (key, env var, default/current value, doc) for the configuration reference."""
    cfg = cfg or Config()
    rows = []
    for sf in dataclasses.fields(Config):
        section = getattr(cfg, sf.name)
        for f in dataclasses.fields(section):
            meta = dict(f.metadata)
            accepted = ", ".join(meta["choices"]) if "choices" in meta else ""
            if "range" in meta:
                lo, hi = meta["range"]
                accepted = f"{lo if lo is not None else ''}..{hi if hi is not None else ''}"
            rows.append((f"{sf.name}.{f.name}", f"AIMASS_{sf.name.upper()}_{f.name.upper()}",
                         repr(getattr(section, f.name)), accepted))
    return rows


def to_env(cfg: Config) -> dict[str, str]:
    """``AIMASS_*`` variables that reproduce ``cfg`` in a child process (secrets excluded: they stay in env)."""
    env = {}
    for sf in dataclasses.fields(Config):
        section = getattr(cfg, sf.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            env[f"AIMASS_{sf.name.upper()}_{f.name.upper()}"] = str(value).lower() if isinstance(value, bool) \
                else str(value)
    return env


def reference_markdown() -> str:
    """The configuration reference table of the README (a test keeps the two in sync)."""
    rows = ["| key | environment variable | default | accepted |", "| --- | --- | --- | --- |"]
    rows += [f"| `{key}` | `{env}` | `{default}` | {accepted} |" for key, env, default, accepted in describe()]
    return "\n".join(rows)
