"""Every mistake a user can make on the command line or in the config: one line on stderr
naming what to change, exit status 2, no traceback. Each case runs the real command in its own
process, as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedbus.testing.brokers import MosquittoBroker


def fedbus(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDBUS_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fedbus.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def plain_lines(stderr: str) -> list[str]:
    """The lines that are not JSON log records (workers log JSON before they fail)."""
    out = []
    for line in stderr.splitlines():
        try:
            json.loads(line)
        except ValueError:
            out.append(line)
    return out


def assert_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = plain_lines(result.stderr)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["worker", "--model", "Digits_1"], ["model", "Digits_1"]),
        (["worker", "--algorithm", "fedsync"], ["--algorithm", "fedsync"]),
        (["worker", "--transport", "amqp"], ["--transport", "amqp"]),
        (["worker", "--metrics-port", "99999"], ["--metrics-port", "99999"]),
        (["worker", "--log-format", "xml"], ["--log-format"]),
        (["worker", "--role", "leader"], ["role leader", "secure.enabled", "secure.keys_dir"]),
        (["worker", "--role", "reducer", "--algorithm", "fedasync"], ["role reducer", "fedbuff"]),
        (
            # Kafka's committer role exists: a broker it cannot reach is the one line
            [
                "worker",
                "--role",
                "committer",
                "--transport",
                "kafka",
                "--kafka-bootstrap",
                "127.0.0.1:1",
            ],
            ["cannot reach the broker", "--kafka-bootstrap"],
        ),
        (["worker", "--config", "no-such-file.toml"], ["--config", "no-such-file.toml"]),
        (["client", "simulate", "--codec", "int9"], ["--codec", "int9"]),
        (["client", "simulate", "--dropout", "1.5"], ["--dropout"]),
        (["bench", "kernels", "--sizes", "lots"], ["--sizes"]),
        (["bench", "attacks", "--attacks", "sign-flip"], ["--attacks", "sign-flip"]),
        (["keys", "new", "Dev_1"], ["Dev_1"]),
        (["model", "init", "--npz", "missing.npz"], ["--npz", "missing.npz"]),
        (["demo", "--codecs", "int9"], ["--codecs", "int9"]),
        (["no-such-command"], ["no-such-command"]),
    ],
)
def test_flag_mistakes(args: list[str], needles: list[str], tmp_path: Path) -> None:
    assert_one_line(fedbus(*args, cwd=tmp_path), *needles)


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ('[aggregation]\nalgoritm = "fedasync"\n', ["aggregation.algoritm", "unknown"]),
        ("[aggregation]\nbuffer_sise = 50\n", ["aggregation.buffer_sise", "unknown"]),
        ('[mqtt]\nhostame = "broker"\n', ["mqtt.hostame", "unknown"]),
        ('modle = "digits"\n', ["modle", "unknown"]),
        ('[aggregation]\nalgorithm = "fedsync"\n', ["aggregation.algorithm", "fedsync"]),
        ("[aggregation]\nbuffer_size = 0\n", ["aggregation.buffer_size"]),
        ("[aggregation\n", ["not valid TOML"]),
        (
            '[aggregation]\nalgorithm = "fedasync"\nrobust = "median"\n',
            ["robust", "fedbuff"],
        ),
        ("[scale]\npartitions = 4\nreducer_partitions = [4]\n", ["scale", "partition 4"]),
        ("models = []\n", ["models"]),
        ('state_store = "s3"\n', ["state_store", "s3"]),
        ('role = "helper"\nstate_store = "kafka"\n', ["role helper", "state_store"]),
    ],
)
def test_config_file_mistakes(toml: str, needles: list[str], tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(toml)
    assert_one_line(fedbus("worker", "--config", str(config), cwd=tmp_path), *needles)


@pytest.mark.parametrize(
    "toml",
    [
        "[aggregation]\nclip_norm = 1.0\ndp_noise_multiplier = 1.0\n",
        '[aggregation]\nrobust = "median"\n',
    ],
)
def test_algorithm_flag_cannot_drop_dp_or_robust_aggregation(toml: str, tmp_path: Path) -> None:
    """``--algorithm fedasync`` over a FedBuff config with DP or a robust mean is refused at
    start, never run without them."""
    config = tmp_path / "worker.toml"
    config.write_text(toml)
    result = fedbus("worker", "--config", str(config), "--algorithm", "fedasync", cwd=tmp_path)
    assert_one_line(result, "fedbuff", "DP")


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"FEDBUS_LOG_LEVEL": "verbose"}, ["log_level", "verbose"]),
        ({"FEDBUS_MQTT__PORT": "x"}, ["mqtt.port"]),
        ({"FEDBUS_AGGREGATION__SERVER_LR": "-1"}, ["aggregation.server_lr"]),
        ({"FEDBUS_TRANSPORT": "amqp"}, ["transport", "amqp"]),
        (
            {
                "FEDBUS_TRANSPORT": "kafka",
                "FEDBUS_ROLE": "reducer",
                "FEDBUS_SCALE__PARTITIONS": "4",
            },
            ["kafka.update_partitions", "consumer group"],
        ),
    ],
)
def test_environment_mistakes(env: dict[str, str], needles: list[str], tmp_path: Path) -> None:
    assert_one_line(fedbus("worker", env=env, cwd=tmp_path), *needles)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_broker_listening(tmp_path: Path) -> None:
    port = _free_port()
    result = fedbus(
        "worker", "--mqtt-port", str(port), env={"FEDBUS_MQTT__CONNECT_TIMEOUT": "1"},
        cwd=tmp_path,
    )  # fmt: skip
    assert_one_line(result, "cannot reach the broker", str(port), "--mqtt-port")


@pytest.mark.parametrize("role", ["all", "reducer"])
def test_busy_metrics_port(tmp_path: Path, mosquitto: MosquittoBroker, role: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = fedbus(
            "worker", "--mqtt-port", str(mosquitto.port), "--metrics-port", str(port),
            "--model", f"busy-port-{role}", "--role", role, cwd=tmp_path,
        )  # fmt: skip
    assert_one_line(result, "metrics port", str(port), "--metrics-port")


def test_version_and_help_examples() -> None:
    version = fedbus("--version")
    assert version.returncode == 0 and version.stdout.startswith("fedbus ")
    for command in (["worker"], ["model", "init"], ["client", "simulate"], ["demo"],
                    ["keys", "new"], ["bench", "kernels"], ["bench", "e2e"],
                    ["bench", "attacks"]):  # fmt: skip
        shown = fedbus(*command, "--help")
        assert shown.returncode == 0, shown.stderr
        assert "Example: fedbus " + " ".join(command) in shown.stdout, shown.stdout
    worker_help = fedbus("worker", "--help").stdout
    for flag in ("--mqtt-host", "--mqtt-port", "--kafka-bootstrap", "[mqtt|kafka]",
                 "[fedbuff|fedasync]", "[json|console]"):  # fmt: skip
        assert flag in worker_help
    assert "[a-z0-9-]" not in worker_help or "lowercase" in worker_help


_SECURE = {
    "FEDBUS_SECURE__ENABLED": "true",
    "FEDBUS_AGGREGATION__CLIP_NORM": "1",
    "FEDBUS_AGGREGATION__MAX_STALENESS": "4",
    "FEDBUS_MQTT__CONNECT_TIMEOUT": "1",
    "FEDBUS_METRICS_PORT": "0",
}


def test_secure_roles_name_a_missing_peer_key_or_an_overflowing_budget(tmp_path: Path) -> None:
    """Checked before the broker is reached: no broker listens on the port given here."""
    keys = tmp_path / "keys"
    env = _SECURE | {"FEDBUS_SECURE__KEYS_DIR": str(keys)}
    port = str(_free_port())
    result = fedbus("worker", "--role", "helper", "--mqtt-port", port, env=env, cwd=tmp_path)
    assert_one_line(result, "peer.pub", "leader's identity.pub")
    (keys / "peer.pub").write_bytes((keys / "identity.pub").read_bytes())
    env |= {"FEDBUS_AGGREGATION__CLIP_NORM": "1e9"}
    result = fedbus("worker", "--role", "leader", "--mqtt-port", port, env=env, cwd=tmp_path)
    assert_one_line(result, "cannot fit", "clip_norm")
    result = fedbus(
        "worker", "--role", "leader", "--transport", "kafka",
        env=_SECURE | {"FEDBUS_SECURE__KEYS_DIR": str(keys)}, cwd=tmp_path,
    )  # fmt: skip
    assert_one_line(result, "role leader", "MQTT")


def test_kafka_state_store_out_of_reach(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """An MQTT worker keeping its state on a Kafka that is not there: one line naming it."""
    port = _free_port()
    result = fedbus(
        "worker", "--mqtt-port", str(mosquitto.port), "--metrics-port", "0",
        "--model", "kafka-state-away", cwd=tmp_path,
        env={"FEDBUS_STATE_STORE": "kafka", "FEDBUS_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"},
    )  # fmt: skip
    assert_one_line(result, "state_store = kafka", str(port), "kafka.bootstrap_servers")
