"""Options shared by several commands, with their fixed choices as enums so ``--help`` lists
them and a typo is refused before anything starts."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer


class TransportName(StrEnum):
    mqtt = "mqtt"
    kafka = "kafka"


class AlgorithmName(StrEnum):
    fedbuff = "fedbuff"
    fedasync = "fedasync"


class Role(StrEnum):
    all = "all"
    reducer = "reducer"
    committer = "committer"
    leader = "leader"
    helper = "helper"


class LogFormat(StrEnum):
    json = "json"
    console = "console"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class Example(StrEnum):
    softmax = "softmax"
    mlp = "mlp"


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (examples in compose/worker-*.toml); FEDBUS_* variables and "
        "flags override it.",
    ),
]
TransportOpt = Annotated[
    TransportName | None, typer.Option(help="Broker protocol (default from config: mqtt).")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(help="Model id: 1-64 lowercase letters, digits and inner hyphens."),
]
MqttHostOpt = Annotated[str | None, typer.Option(help="MQTT broker host.")]
MqttPortOpt = Annotated[int | None, typer.Option(min=1, max=65535, help="MQTT broker port.")]
KafkaBootstrapOpt = Annotated[
    str | None, typer.Option(help="Kafka bootstrap servers, host:port[,host:port...].")
]


def broker_overrides(
    transport: TransportName | None,
    mqtt_host: str | None,
    mqtt_port: int | None,
    kafka_bootstrap: str | None,
) -> dict[str, Any]:
    """Settings overrides for the broker flags (only those given: the rest come from the
    config file and the environment)."""
    out: dict[str, Any] = {}
    if transport is not None:
        out["transport"] = transport.value
    mqtt = {k: v for k, v in (("hostname", mqtt_host), ("port", mqtt_port)) if v is not None}
    if mqtt:
        out["mqtt"] = mqtt
    if kafka_bootstrap is not None:
        out["kafka"] = {"bootstrap_servers": kafka_bootstrap}
    return out
