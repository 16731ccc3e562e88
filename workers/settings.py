"""Worker configuration: a TOML file, then ``FEDBUS_*`` environment variables, then flags.

Names mirror the client libraries' own (aiomqtt for ``[mqtt]``, aiokafka for ``[kafka]``) so
an operator can copy a value from their documentation. Nested keys use ``__`` in the
environment: ``FEDBUS_KAFKA__SECURITY_PROTOCOL=SASL_SSL``. Secrets are ``SecretStr`` and
print masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fedbus.wire.errors import WireError
from fedbus.wire.ids import validate_id


class _Section(BaseModel):
    """Every level of the configuration refuses keys it does not know: a typo such as
    ``buffer_sise`` must stop the worker, not leave it running on the default."""

    model_config = ConfigDict(extra="forbid")


class MqttSettings(_Section):
    hostname: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    identifier: str | None = None  # a stable id keeps the persistent session across restarts
    keepalive: int = 30
    # MQTT 5 unless the broker speaks only 3.1.1 (the demo's embedded amqtt broker): 3.1.1
    # has no session expiry, CONNACK packet limit or user properties (a retained model then
    # carries its version only inside the message).
    protocol: Literal["5", "3.1.1"] = "5"
    session_expiry_interval: int = 3600
    # How long start-up keeps trying before it reports the broker unreachable (and exits 2).
    connect_timeout: float = Field(10.0, gt=0)
    tls_ca_certs: str | None = None
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_insecure: bool = False
    shared_group: str | None = None  # "$share/<group>/..." for FedBuff reducers


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None  # with SSL / SASL_SSL: aiokafka's create_ssl_context(...)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    group_id: str | None = None
    # Partitions of a new updates topic. FedAsync needs per-model order: keep one. FedBuff
    # reducers (role reducer) share the partitions: one reducer per partition at most works.
    update_partitions: int = 1
    session_timeout_ms: int = 10000  # how long a dead worker holds its partitions
    heartbeat_interval_ms: int = 3000
    # A member that has not polled this long leaves its group (aiokafka's default); waiting
    # standbys poll, so it only catches a stuck loop.
    max_poll_interval_ms: int = Field(300000, ge=1000)
    max_message_bytes: int = 64 * 1024 * 1024
    # How long a fetch that finds nothing waits: latency at low rates (aiokafka's default: 500).
    # At least 1: 0 turns an idle consumer into a busy loop.
    fetch_max_wait_ms: int = Field(10, ge=1)
    # The state store's producer (state_store = "kafka"): idempotent, so a retried write is
    # never duplicated or reordered. Tansu has no idempotent producer: false there (each
    # record is keyed, so a duplicate write would change nothing read back).
    enable_idempotence: bool = True
    # Replicas of the state topic when the worker creates it: 1 keeps it on one broker (it
    # survives the worker's machine, not that broker's); 3 or more on a cluster, which then
    # gets min.insync.replicas = 2.
    state_replication_factor: int = Field(1, ge=1)


class AggregationSettings(_Section):
    """The policy (``workers/strategy.py`` turns it into one FedAsync or FedBuff object)."""

    algorithm: Literal["fedbuff", "fedasync"] = "fedbuff"
    buffer_size: int = Field(10, ge=1)
    # FedBuff: updates held for the next buffer when their client is already in this one;
    # None = buffer_size. Past it a repeat client is refused with reason client_busy.
    max_deferred: int | None = Field(None, ge=0)
    # ... of them at most this many from one client (one device cannot fill the queue) ...
    max_deferred_per_client: int | None = Field(2, ge=0)
    # ... and at most this many bytes held in all (deferred updates stay encoded).
    max_deferred_bytes: int | None = Field(256 * 1024 * 1024, ge=0)
    staleness: Literal["constant", "polynomial", "hinge", "threshold"] = "polynomial"
    staleness_a: float = 0.5  # polynomial exponent, or hinge slope
    staleness_b: float = 4.0  # hinge knee, or threshold cutoff
    max_staleness: int | None = Field(None, ge=0)
    server_optimizer: Literal["sgd", "adam"] = "sgd"  # FedBuff; sgd takes momentum
    server_lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    alpha: float = Field(0.6, gt=0, le=1)  # FedAsync mixing
    direction: Literal["delta", "paper"] = "delta"  # FedAsync; paper keeps a ring of bases
    ring_depth: int = Field(8, ge=1)
    clip_norm: float | None = Field(None, gt=0)
    # FedBuff robust aggregation (Byzantine devices): coordinate-wise median or trimmed mean
    robust: Literal["median", "trimmed_mean"] | None = None
    trim_beta: float = Field(0.2, ge=0, lt=0.5)
    # Central DP (FedBuff): Gaussian noise z * clip_norm / K per flush; needs clip_norm
    dp_noise_multiplier: float | None = Field(None, gt=0)
    # INSECURE, simulations and benchmarks only: derives the DP noise from this public seed,
    # so anyone who knows it can remove the noise. Unset (the default), every flush's noise
    # comes from a fresh key from the operating system's CSPRNG that is never checkpointed.
    dp_insecure_seed: int | None = None
    dp_delta: float = Field(1e-5, gt=0, lt=1)  # every reported epsilon is at this delta
    # Epsilon after which the model makes no further version (README, Privacy); needs DP.
    privacy_budget: float | None = Field(None, gt=0)
    # FedBuff: a buffer non-empty for this long without reaching K is applied as it is
    # (still divided by K), so a fleet with fewer than K active clients still makes progress.
    buffer_timeout_s: float | None = Field(None, gt=0)
    # (client, update id) pairs remembered to tell redeliveries apart; replays older than
    # this are still refused by the device's seq (signed updates).
    dedup_window: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> AggregationSettings:
        if self.dp_noise_multiplier is not None and self.clip_norm is None:
            raise ValueError("dp_noise_multiplier needs clip_norm (the sensitivity bound)")
        if self.privacy_budget is not None and self.dp_noise_multiplier is None:
            raise ValueError("privacy_budget needs central DP (dp_noise_multiplier)")
        if self.algorithm == "fedasync" and (self.robust or self.dp_noise_multiplier):
            raise ValueError("robust aggregation and DP need a buffer: use algorithm fedbuff")
        return self


class ScaleSettings(_Section):
    """Scale-out (``role = "reducer"`` / ``"committer"``; README, Scaling out)."""

    # MQTT update partitions: devices publish to .../updates/<crc32(client) mod P>/<client>.
    # 0 keeps the single topic level (one consumer per model). Devices need the same value.
    partitions: int = Field(0, ge=0, le=4096)
    # The partitions this reducer owns (static assignment); None: all of them.
    reducer_partitions: list[int] | None = None
    # A reducer hands its partial on at this many updates or after this long. Mosquitto
    # delivers at most max_inflight_messages (default 20) unacknowledged updates per reducer,
    # and a reducer acknowledges only once a commit holds its partial: keep it at most 20.
    flush_updates: int = Field(10, ge=1)
    flush_ms: float = Field(50.0, gt=0)
    # Watermarks travel at QoS 0 (outside Mosquitto's in-flight limit), so one can be lost
    # with a connection: a partial still unanswered after this long is sent again (the
    # committer refuses a repeat as duplicates, and the reducer acknowledges them then).
    resend_s: float = Field(10.0, gt=0)
    # Kafka: the most updates a reducer holds between receipt and the watermark that settles
    # them (it stops reading until watermarks come; on MQTT the broker's in-flight limit
    # bounds this). Memory: that many updates' bytes, e.g. 256 MB at 1M int8 parameters.
    max_unsettled: int = Field(256, ge=1)
    # A standby committer checks the active one's presence this often.
    standby_poll_s: float = Field(0.2, gt=0)
    # A reducer holds an update whose base version it has not heard of yet (the device saw
    # the new model first) for at most this long, then refuses it as future_version. How
    # many it holds: aggregation.max_deferred, max_deferred_per_client, max_deferred_bytes.
    max_ahead_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _owned(self) -> ScaleSettings:
        for p in self.reducer_partitions or []:
            if not 0 <= p < max(self.partitions, 1):
                raise ValueError(f"reducer partition {p} is not in 0..{self.partitions - 1}")
        return self


class SecureSettings(_Section):
    """Secure aggregation (``role = "leader"`` / ``"helper"``; README, Secure aggregation).

    ``keys_dir`` holds this aggregator's keys, never the other's: ``identity.key`` (Ed25519,
    signs key messages, receipts, manifests and sums), ``peer.pub`` (the other aggregator's
    identity), and ``<model>/<epoch>.x25519`` (the share-opening key of each epoch; the
    newest is announced, older ones still open shares in flight, a removed one is retired).
    Missing identity and model keys are created on first start.
    """

    enabled: bool = False
    keys_dir: Path | None = None
    # Fewest updates the helper agrees to sum (None: buffer_size); a buffer timeout closes
    # a buffer early only when it holds at least this many.
    min_buffer: int | None = Field(None, ge=2)
    weight_bits: int = Field(10, ge=0, le=16)
    frac_bits: int | None = Field(None, ge=0, le=30)  # None: the largest that cannot overflow


class WorkerSettings(BaseSettings):
    """Everything ``fedbus worker`` needs. Precedence: flags > env > TOML file > defaults."""

    model_config = SettingsConfigDict(
        env_prefix="FEDBUS_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    model: str = "digits"
    # Several models in one process (each with its own state directory and metrics label);
    # None serves ``model`` alone.
    models: list[str] | None = None
    # Kafka: the workers started with the same model_group and models share the models out
    # through a consumer group, and a dead worker's models move to the others (README,
    # Scaling out). Each worker of a group needs its own worker_id.
    model_group: str | None = None
    transport: Literal["mqtt", "kafka"] = "mqtt"
    # all: one process consumes, folds and commits (default); reducer: folds a share of the
    # updates into partial sums; committer: merges partials, commits and publishes (a second
    # one with the same worker_id waits as a standby).
    # leader / helper: the two aggregators of secure aggregation ([secure]).
    role: Literal["all", "reducer", "committer", "leader", "helper"] = "all"
    worker_id: str = "worker-0"
    mqtt: MqttSettings = MqttSettings()
    kafka: KafkaSettings = KafkaSettings()
    aggregation: AggregationSettings = AggregationSettings()
    scale: ScaleSettings = ScaleSettings()
    secure: SecureSettings = SecureSettings()
    checkpoint_dir: Path = Path("fedbus-state")
    # Where the committer's write-ahead log and snapshots live: "local" (checkpoint_dir) or
    # "kafka" (a compacted topic fedbus.<model>.state on [kafka], which a worker on another
    # machine replays: README, State on Kafka). checkpoint_dir still holds the lock.
    state_store: Literal["local", "kafka"] = "local"
    checkpoint_keep: int = 3
    checkpoint_fsync: bool = True
    ack_every: int = Field(10, ge=1, le=20)  # Mosquitto delivers at most 20 unacked messages
    checkpoint_interval_s: float = 1.0  # commit (log append, ack) unacked messages this often
    # A full snapshot (model, buffer, dedup window) replaces the log this often, or once the
    # log since the last one holds this many bytes; in between commits only append to it.
    snapshot_interval_s: float = Field(30.0, gt=0)
    snapshot_log_bytes: int = Field(256 * 1024 * 1024, ge=1)
    max_message_bytes: int = 64 * 1024 * 1024
    # Received messages waiting for the loop are held up to this many bytes (and 64
    # messages); past it the transport leaves the rest at the broker.
    max_inbox_bytes: int = Field(128 * 1024 * 1024, ge=1)
    # Dead-letter records carry the reason, metadata and the message's SHA-256; with this
    # on they also carry its first 64 KiB (data minimisation: off unless debugging needs it).
    deadletter_keep_payload: bool = False
    # The downlink (README, Model downlink): the model channel carries the newest full model
    # in ``model_codec`` (fp32, fp16, int8, int4); with ``model_diff_codec`` (int8, int4,
    # topk:fraction=..., fp16; "" turns it off) the diffs channel that following devices
    # read carries a keyframe every ``model_keyframe_every`` publications and compressed
    # differences between them.
    model_codec: str = "fp32"
    model_diff_codec: str = "int8"
    model_keyframe_every: int = Field(10, ge=1)
    # Every version is committed and announced by its event; its weights are published at
    # most this often (always the newest committed version, and always after a buffer
    # drain and on shutdown). 0 publishes every version. The default keeps publication a
    # small share of a worker's time at 1M parameters on both brokers (README, Delivery).
    model_publish_interval_s: float = Field(1.0, ge=0)
    require_signatures: bool = False
    public_keys_dir: Path | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535)  # 0 disables the HTTP endpoints
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # One INFO "progress" line this often (per-version lines are DEBUG); 0 turns it off.
    log_summary_interval_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _signed_when_it_matters(self) -> WorkerSettings:
        """Robust aggregation and DP bound what one device can do by counting one
        contribution per client id; without signatures anyone who can publish can be any
        number of clients (on Kafka any producer can set any key)."""
        a = self.aggregation
        uses = [
            name
            for name, on in (("robust", a.robust), ("dp_noise_multiplier", a.dp_noise_multiplier))
            if on is not None
        ]
        if uses and not self.require_signatures:
            raise ValueError(
                f"aggregation.{' and aggregation.'.join(uses)} needs require_signatures = true "
                "(and public_keys_dir): it counts one contribution per device, which only "
                "signatures enforce"
            )
        if self.require_signatures and self.public_keys_dir is None:
            raise ValueError(
                "require_signatures = true needs public_keys_dir (the registered device keys; "
                "`fedbus keys register`)"
            )
        return self

    @field_validator("log_level", "log_format", "transport", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_codec")
    @classmethod
    def _model_codec(cls, value: str) -> str:
        from fedbus.downlink import model_codec

        try:
            model_codec(value)
        except (WireError, ValueError) as exc:
            raise ValueError(getattr(exc, "detail", str(exc))) from exc
        return value

    @field_validator("model_diff_codec")
    @classmethod
    def _diff_codec(cls, value: str) -> str:
        from fedbus.downlink import diff_codec

        if value:
            try:
                diff_codec(value)
            except (WireError, ValueError) as exc:
                raise ValueError(getattr(exc, "detail", str(exc))) from exc
        return value

    @field_validator("model", "worker_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        try:
            return validate_id(value, "id")
        except WireError as exc:
            raise ValueError(exc.detail) from exc

    @field_validator("model_group")
    @classmethod
    def _group_id(cls, value: str | None) -> str | None:
        return None if value is None else cls._ids(value)

    @field_validator("models")
    @classmethod
    def _model_ids(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value or len(set(value)) != len(value):
            raise ValueError("models must name at least one model, each once")
        return [cls._ids(v) for v in value]

    @model_validator(mode="after")
    def _roles(self) -> WorkerSettings:
        if self.role != "all" and self.aggregation.algorithm != "fedbuff":
            raise ValueError(
                f"role {self.role} needs algorithm fedbuff (FedAsync applies updates one by "
                "one in order: it scales by model, with role all)"
            )
        if self.role != "all" and self.aggregation.robust is not None:
            raise ValueError(f"role {self.role}: robust aggregation keeps every update, no sums")
        if self.model_group is not None:
            if self.transport != "kafka":
                raise ValueError(
                    'model_group needs transport = "kafka" (its consumer group shares the '
                    "models out); on MQTT remove model_group and list the models per worker"
                )
            if self.role != "all":
                raise ValueError(f'model_group serves models in role "all", not {self.role}')
            if self.kafka.group_id is not None:
                raise ValueError(
                    "model_group gives each model a consumer group of its own: remove "
                    "kafka.group_id"
                )
        if self.state_store == "kafka" and self.role in ("leader", "helper"):
            raise ValueError(
                f'role {self.role} keeps its state in checkpoint_dir: use state_store = "local"'
            )
        if self.role in ("leader", "helper"):
            if not self.secure.enabled or self.secure.keys_dir is None:
                raise ValueError(
                    f"role {self.role} needs secure.enabled = true and secure.keys_dir"
                )
            a = self.aggregation
            if a.clip_norm is None or a.max_staleness is None:
                raise ValueError(
                    f"role {self.role} needs aggregation.clip_norm and aggregation.max_staleness "
                    "(they bound the secure sum)"
                )
            if a.privacy_budget is not None:
                raise ValueError(
                    f"role {self.role}: aggregation.privacy_budget is not supported in secure "
                    "mode yet; unset it (dp_noise_multiplier works)"
                )
        return self

    @property
    def served_models(self) -> list[str]:
        return list(self.models) if self.models else [self.model]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # TOML is read only when a subclass names a file (see ``load``).
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def masked(self) -> dict[str, Any]:
        """The effective configuration as JSON-able data, secrets shown as ``**********``."""
        return self.model_dump(mode="json")


def describe(exc: ValidationError, source: str) -> str:
    """One line naming each bad setting by its path (``aggregation.buffer_sise``), what is
    wrong with it, and where settings come from, so the user knows what to edit."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown setting (a typo?)")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            shown = err.get("input")
            given = "" if isinstance(shown, dict) else f" (got {shown!r:.60})"
            problems.append(f"{where}: {msg}{given}")
    return f"invalid configuration from {source}: " + "; ".join(problems)


def load(config_file: Path | None = None, **overrides: Any) -> WorkerSettings:
    """Build settings from an optional TOML file, the environment and explicit overrides.

    Every mistake becomes a :class:`~fedbus.cli.errors.UserError` with one line naming the
    setting: an unknown key at any level, a value of the wrong type or range, malformed TOML,
    a missing file.
    """
    import tomllib

    from fedbus.cli.errors import UserError

    cls: type[WorkerSettings] = WorkerSettings
    if config_file is not None:
        if not config_file.is_file():
            raise UserError(f"--config {config_file}: no such file")

        class FromFile(WorkerSettings):
            model_config = SettingsConfigDict(
                **{**WorkerSettings.model_config, "toml_file": config_file}
            )

        cls = FromFile
    source = f"{config_file}, " if config_file is not None else ""
    source += "FEDBUS_* environment variables and flags"
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {config_file}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        raise UserError(describe(exc, source)) from None
