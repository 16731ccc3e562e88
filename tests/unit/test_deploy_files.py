"""Deployment files (``compose/``, ``schemas/asyncapi.yaml``) parsed and checked for real
properties.

Docker is not needed: every file is parsed, and the checks are the ones whose failure would
break a deployment silently (a dashboard querying a metric the code no longer exports, a
Kafka models topic that is not compacted, a Mosquitto queue that drops updates, an ACL that
lets one device publish as another, an AsyncAPI channel that names a topic the code never
uses). Cross-file consistency (ports, partitions, usernames, paths) is checked too.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
SCHEMAS = REPO / "schemas"
MIB64 = 64 * 1024 * 1024
DEMO_MODEL = "digits"

#: Every metric the workers export (workers/observability.py); the dashboard may use no other.
COUNTERS = {
    "fedbus_updates_received_total": {"model", "transport"},
    "fedbus_updates_accepted_total": {"model"},
    "fedbus_updates_rejected_total": {"model", "reason"},
    "fedbus_updates_redelivered_total": {"model"},
    "fedbus_update_bytes_received_total": {"model"},
    "fedbus_models_published_total": {"model"},
}
GAUGES = {
    "fedbus_model_version": {"model"},
    "fedbus_consumer_lag_messages": {"model"},
}
HISTOGRAMS = {
    "fedbus_update_staleness_versions": {"model"},
    "fedbus_aggregate_duration_seconds": {"model"},
    "fedbus_checkpoint_duration_seconds": {"model"},
}
#: Labels Prometheus itself adds on scrape (plus the ``worker`` target label in prometheus.yml).
TARGET_LABELS = {"instance", "job", "worker"}

SCHEMA_FILES = {
    "update.schema.json",
    "model.schema.json",
    "model_diff.schema.json",
    "event.schema.json",
    "deadletter.schema.json",
    "secure_update.schema.json",
    "secure_key.schema.json",
    "secure_receipt.schema.json",
    "secure_manifest.schema.json",
    "secure_sum.schema.json",
}
ID = r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?"

#: Keys the example worker TOML files may use (a subset of workers/settings.py).
TOML_KEYS: dict[str, set[str] | None] = {
    "model": None,
    "transport": None,
    "worker_id": None,
    "checkpoint_dir": None,
    "metrics_host": None,
    "metrics_port": None,
    "log_format": None,
    "require_signatures": None,
    "public_keys_dir": None,
    "mqtt": {"hostname", "port", "username", "identifier", "shared_group"},
    "kafka": {"bootstrap_servers", "security_protocol", "group_id", "update_partitions"},
    "aggregation": {
        "algorithm",
        "buffer_size",
        "staleness",
        "max_staleness",
        "server_lr",
        "momentum",
        "alpha",
        "clip_norm",
    },
}

WORKERS = {"worker-mqtt": "mqtt", "worker-kafka": "kafka"}
BROKER_OF = {"mqtt": "mosquitto", "kafka": "kafka"}


# -- loading -------------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(COMPOSE / "docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    return _yaml(SCHEMAS / "asyncapi.yaml")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((COMPOSE / "grafana/dashboards/fedbus.json").read_text(encoding="utf-8"))


def _toml(transport: str) -> dict[str, Any]:
    with (COMPOSE / f"worker-{transport}.toml").open("rb") as fh:
        return tomllib.load(fh)


def _env(service: dict[str, Any]) -> dict[str, str]:
    """Compose ``environment`` as a dict whether written as a map or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    out = []
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        out.append((source, target))
    return out


def _script(service: dict[str, Any]) -> str:
    command = service.get("command")
    return "\n".join(command) if isinstance(command, list) else str(command)


def _conf_lines(path: Path) -> list[list[str]]:
    """Mosquitto-style config: one option per line, ``#`` comment lines, no inline comments."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line.split())
    return lines


# -- compose: services, health, dependencies --------------------------------------------------


def test_compose_has_every_service_and_named_volumes(compose: dict[str, Any]) -> None:
    """The deployment DESIGN promises: brokers, topic set-up, model init, workers, monitoring."""
    expected = {
        "mosquitto",
        "kafka",
        "topics-init",
        "model-init-mqtt",
        "model-init-kafka",
        "worker-mqtt",
        "worker-kafka",
        "prometheus",
        "grafana",
    }
    assert expected <= set(compose["services"])
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, _ in _mounts(service):
            if source.startswith((".", "/")):
                # Bind mounts stay inside compose/ (relative) and point at files we ship.
                assert not source.startswith("/"), f"{name}: absolute bind mount {source}"
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_brokers_have_healthchecks(services: dict[str, Any]) -> None:
    """Workers wait for ``service_healthy``, which needs a healthcheck on each broker."""
    for broker in ("mosquitto", "kafka"):
        check = services[broker]["healthcheck"]
        assert check["test"] and not check.get("disable")


@pytest.mark.parametrize(("name", "transport"), sorted(WORKERS.items()))
def test_worker_service(services: dict[str, Any], name: str, transport: str) -> None:
    """Each worker: built from compose/Dockerfile, /readyz healthcheck on its metrics port,
    waits for a healthy broker and a published model, keeps checkpoints in a named volume."""
    svc = services[name]
    env = _env(svc)
    assert svc["build"]["dockerfile"] == "compose/Dockerfile"
    assert (COMPOSE / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert svc["command"][:3] == ["worker", "--config", "/etc/fedbus/worker.toml"]

    test = " ".join(svc["healthcheck"]["test"])
    port = env["FEDBUS_METRICS_PORT"]
    assert f":{port}/readyz" in test
    assert port == str(_toml(transport)["metrics_port"])
    assert env["FEDBUS_METRICS_HOST"] == "0.0.0.0"  # else Prometheus cannot reach it

    deps = svc["depends_on"]
    assert deps[BROKER_OF[transport]]["condition"] == "service_healthy"
    assert deps[f"model-init-{transport}"]["condition"] == "service_completed_successfully"
    if transport == "kafka":
        assert deps["topics-init"]["condition"] == "service_completed_successfully"

    assert env["FEDBUS_TRANSPORT"] == transport
    assert env["FEDBUS_MODEL"] == DEMO_MODEL
    mounts = dict((target, source) for source, target in _mounts(svc))
    assert mounts["/etc/fedbus/worker.toml"] == f"./worker-{transport}.toml"
    state = mounts[env["FEDBUS_CHECKPOINT_DIR"]]
    assert not state.startswith((".", "/")), "checkpoints belong in a named volume"


def test_worker_env_names_are_settings_fields(services: dict[str, Any]) -> None:
    """``FEDBUS_A__B`` must name a real settings field: a typo is silently ignored by env."""
    settings = pytest.importorskip("workers.settings")
    root = settings.WorkerSettings.model_fields
    for name in [*WORKERS, "model-init-mqtt", "model-init-kafka"]:
        for key in _env(services[name]):
            assert key.startswith("FEDBUS_"), key
            parts = key.removeprefix("FEDBUS_").lower().split("__")
            assert parts[0] in root, key
            if len(parts) == 2:
                assert parts[1] in root[parts[0]].annotation.model_fields, key
            else:
                assert len(parts) == 1, key


SCALE = ("model-init-scale", "committer", "committer-standby", "reducer-0", "reducer-1")


def test_scale_profile_reducers_committer_and_standby(services: dict[str, Any]) -> None:
    """Reducers own disjoint partitions covering 0..P-1, each with its own MQTT session; the
    committer and its standby share one session and one state volume; no role shares a
    client id with another service; every FEDBUS_* name is a settings field."""
    settings = pytest.importorskip("workers.settings")
    for name in SCALE:
        svc = services[name]
        assert svc["profiles"] == ["scale"], name
        env = _env(svc)
        settings.load(None, **_as_overrides(env))  # every name and value is accepted
    envs = {name: _env(services[name]) for name in SCALE}
    roles = {name: services[name].get("command", [])[-1:] for name in SCALE[1:]}
    assert roles == {
        "committer": ["committer"], "committer-standby": ["committer"],
        "reducer-0": ["reducer"], "reducer-1": ["reducer"],
    }  # fmt: skip
    p = int(envs["committer"]["FEDBUS_SCALE__PARTITIONS"])
    owned = [json.loads(envs[r]["FEDBUS_SCALE__REDUCER_PARTITIONS"]) for r in SCALE[3:]]
    assert sorted(x for parts in owned for x in parts) == list(range(p))
    for r in SCALE[3:]:
        assert int(envs[r]["FEDBUS_SCALE__PARTITIONS"]) == p
    ids = {name: envs[name]["FEDBUS_MQTT__IDENTIFIER"] for name in SCALE}
    assert ids["committer"] == ids["committer-standby"]
    assert len({ids[n] for n in SCALE if n != "committer-standby"}) == len(SCALE) - 1
    assert _toml("mqtt")["mqtt"]["identifier"] not in ids.values()
    assert services["committer"]["volumes"] == services["committer-standby"]["volumes"]
    assert envs["committer"]["FEDBUS_MODEL"] != DEMO_MODEL  # never beside worker-mqtt's model


KAFKA_SCALE = (
    "model-init-kafka-scale",
    "committer-kafka",
    "committer-kafka-standby",
    "reducer-kafka",
)


def test_kafka_scale_profile_a_reducer_group_a_committer_and_a_standby(
    services: dict[str, Any],
) -> None:
    """Reducers are replicas of one service (``--scale reducer-kafka=N``) that name
    themselves after their container; every role agrees on the model, its partition count
    and a group of its own (not worker-kafka's); the committer and its standby share one
    state volume; devices are granted exactly digits-scale's updates (write) and models
    (read); every FEDBUS_* name and value is a settings field."""
    settings = pytest.importorskip("workers.settings")
    ids = pytest.importorskip("fedbus.wire.ids")
    for name in [*KAFKA_SCALE, "acls-init-kafka-scale"]:
        assert services[name]["profiles"] == ["scale-kafka"], name
    envs = {name: _env(services[name]) for name in KAFKA_SCALE}
    loaded = {name: settings.load(None, **_as_overrides(env)) for name, env in envs.items()}
    model = loaded["committer-kafka"].model
    assert model != DEMO_MODEL  # never beside worker-kafka's model
    group = loaded["committer-kafka"].kafka.group_id
    assert group != _toml("kafka")["kafka"]["group_id"] and model in group
    for s in loaded.values():
        assert (s.transport, s.model, s.kafka.group_id) == ("kafka", model, group)
        assert s.kafka.update_partitions == 4 and s.aggregation.algorithm == "fedbuff"
    roles = {n: services[n]["command"][-1:] for n in ("committer-kafka", "committer-kafka-standby")}
    assert roles == {"committer-kafka": ["committer"], "committer-kafka-standby": ["committer"]}
    reducer = services["reducer-kafka"]
    assert "FEDBUS_WORKER_ID" not in envs["reducer-kafka"]  # replicas would share it
    command = _script(reducer)
    assert reducer["entrypoint"] == ["/bin/sh", "-c"]
    assert command.endswith("--role reducer") and "exec fedbus worker" in command
    shell = command.replace("$$", "$")  # compose's escape
    assert shell.startswith('FEDBUS_WORKER_ID="reducer-$(hostname)" ')
    assert ids.is_valid_id("reducer-0123456789ab")  # a container's hostname is its short id
    for name in ("committer-kafka", "reducer-kafka"):
        assert f":{envs[name]['FEDBUS_METRICS_PORT']}/readyz" in " ".join(
            services[name]["healthcheck"]["test"]
        )
        deps = services[name]["depends_on"]
        assert deps["kafka"]["condition"] == "service_healthy"
        assert deps["model-init-kafka-scale"]["condition"] == "service_completed_successfully"
    committers = [services[n] for n in ("committer-kafka", "committer-kafka-standby")]
    assert committers[0]["volumes"] == committers[1]["volumes"]
    state = dict((t, src) for src, t in _mounts(committers[0]))[
        envs["committer-kafka"]["FEDBUS_CHECKPOINT_DIR"]
    ]
    assert not state.startswith((".", "/")), "committer state belongs in a named volume"
    grants = [
        shlex.split(line.strip())[1:]
        for line in _script(services["acls-init-kafka-scale"]).splitlines()
        if line.strip().startswith("acl ")
    ]
    ops = set()
    for g in grants:
        flags = list(zip(g[::2], g[1::2], strict=False))
        assert ("--allow-principal", "User:fedbus-device") in flags
        topic = dict(flags)["--topic"]
        ops |= {(topic, value) for flag, value in flags if flag == "--operation"}
    assert ops == {
        (f"fedbus.{model}.updates", "Write"),
        (f"fedbus.{model}.updates", "Describe"),
        (f"fedbus.{model}.models", "Read"),
        (f"fedbus.{model}.models", "Describe"),
    }


def _as_overrides(env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        parts = key.removeprefix("FEDBUS_").lower().split("__")
        if value.startswith("${"):
            value = "x"
        if len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = (
                json.loads(value) if value.startswith("[") else value
            )
        else:
            out[parts[0]] = value
    return out


def test_mqtt_model_init_does_not_reuse_worker_client_id(services: dict[str, Any]) -> None:
    """Same MQTT client id as the worker would wipe the worker's persistent session."""
    env = _env(services["model-init-mqtt"])
    assert env["FEDBUS_MQTT__IDENTIFIER"] != _toml("mqtt")["mqtt"]["identifier"]


def test_dockerfile() -> None:
    """python:3.11-slim, installs this repo with pip, runs as non-root, ``fedbus`` entrypoint."""
    text = (COMPOSE / "Dockerfile").read_text(encoding="utf-8")
    instructions = [
        line.split(None, 1)
        for line in text.splitlines()
        if line.strip() and not line.startswith((" ", "#"))
    ]
    first = {kw.upper(): arg for kw, arg in reversed(instructions)}
    last = {kw.upper(): arg for kw, arg in instructions}
    assert first["FROM"].strip() == "python:3.11-slim"
    assert re.search(r"pip install \.", text)
    assert last["USER"].strip() not in {"root", "0"}
    assert json.loads(last["ENTRYPOINT"]) == ["fedbus"]


# -- Kafka -----------------------------------------------------------------------------------


def test_kafka_is_kraft_with_64mib_limits(services: dict[str, Any]) -> None:
    """KRaft combined node, no ZooKeeper anywhere; records up to 64 MiB; no auto-creation."""
    assert not any(
        "zookeeper" in name or "zookeeper" in str(s.get("image", ""))
        for name, s in services.items()
    )
    kafka = services["kafka"]
    env = _env(kafka)
    assert kafka["image"].startswith("apache/kafka:")
    assert not any("ZOOKEEPER" in key for key in env)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    assert f"{node}@kafka:" in env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert f"{controller}://" in env["KAFKA_LISTENERS"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) == MIB64
    assert int(env["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= MIB64
    # The socket limit caps a whole produce request, so it must exceed the record limit.
    assert int(env["KAFKA_SOCKET_REQUEST_MAX_BYTES"]) > MIB64
    # Workers reach the broker through an advertised listener on the compose network.
    bootstrap = _env(services["worker-kafka"])["FEDBUS_KAFKA__BOOTSTRAP_SERVERS"]
    assert f"://{bootstrap}" in env["KAFKA_ADVERTISED_LISTENERS"]


def _created_topics(services: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Topic name -> {"partitions": n, config key: value} from topics-init's script."""
    topics: dict[str, dict[str, str]] = {}
    for line in _script(services["topics-init"]).splitlines():
        tokens = shlex.split(line, comments=True)
        if not tokens or tokens[0] != "t":
            continue
        spec: dict[str, str] = {}
        it = iter(tokens[1:])
        for flag in it:
            value = next(it)
            if flag == "--topic":
                name = value
            elif flag == "--partitions":
                spec["partitions"] = value
            elif flag == "--config":
                key, val = value.split("=", 1)
                spec[key] = val
        topics[name] = spec
    return topics


def test_topics_init_creates_the_five_topics(services: dict[str, Any]) -> None:
    """Models compacted, events delete+retention, big records allowed, partitions match config."""
    svc = services["topics-init"]
    assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = _script(svc)
    assert "--if-not-exists" in script  # runs on every `up`
    topics = _created_topics(services)
    m = DEMO_MODEL
    assert set(topics) == {
        f"fedbus.{m}.{k}" for k in ("updates", "models", "diffs", "events", "deadletter")
    }
    assert topics[f"fedbus.{m}.models"]["cleanup.policy"] == "compact"
    assert topics[f"fedbus.{m}.diffs"]["cleanup.policy"] == "delete"
    assert topics[f"fedbus.{m}.events"]["cleanup.policy"] == "delete"
    assert int(topics[f"fedbus.{m}.events"]["retention.ms"]) > 0
    for kind in ("updates", "models"):
        assert int(topics[f"fedbus.{m}.{kind}"]["max.message.bytes"]) == MIB64
    partitions = int(topics[f"fedbus.{m}.updates"]["partitions"])
    kafka_toml = _toml("kafka")
    assert partitions == kafka_toml["kafka"]["update_partitions"]
    if kafka_toml["aggregation"]["algorithm"] == "fedasync":
        assert partitions == 1  # one global order


# -- Mosquitto -------------------------------------------------------------------------------


def _mosquitto() -> tuple[dict[str, list[str]], dict[str, dict[str, list[str]]]]:
    """(global options, {listener "port [host]": its options})."""
    glob: dict[str, list[str]] = {}
    listeners: dict[str, dict[str, list[str]]] = {}
    current = glob
    for key, *args in _conf_lines(COMPOSE / "mosquitto/mosquitto.conf"):
        if key == "listener":
            current = listeners.setdefault(" ".join(args), {})
        else:
            current[key] = args
    return glob, listeners


def test_mosquitto_conf() -> None:
    """Persistence on and saved often, queues that do not drop updates, 20 in flight, 64 MiB."""
    glob, listeners = _mosquitto()
    assert glob["per_listener_settings"] == ["true"]
    assert glob["persistence"] == ["true"]
    assert glob["persistence_location"][0].startswith("/mosquitto/data")
    assert int(glob["autosave_interval"][0]) <= 300
    assert glob.get("autosave_on_changes", ["false"])[0] in {"true", "false"}
    assert int(glob["max_queued_messages"][0]) >= 10000
    # Workers ack only after a checkpoint; workers/settings.py caps ack_every at this value.
    assert int(glob["max_inflight_messages"][0]) == 20
    # max_packet_size, not message_size_limit: only it is announced to clients (CONNACK)
    assert "message_size_limit" not in glob
    assert int(glob["max_packet_size"][0]) >= MIB64 + 65_536
    assert "1883" in listeners


def test_mosquitto_listeners_authenticate() -> None:
    """Every listener reachable from the network needs a password and the ACL; an anonymous
    one is tolerated only on loopback (the healthcheck)."""
    _, listeners = _mosquitto()
    for name, opts in listeners.items():
        _, *host = name.split()
        if opts.get("allow_anonymous") == ["true"]:
            assert host == ["127.0.0.1"], f"anonymous listener {name} is not loopback-only"
        else:
            assert opts["allow_anonymous"] == ["false"], name
            assert "password_file" in opts, name
        assert opts["acl_file"][0].startswith("/mosquitto/config/")
        assert (COMPOSE / "mosquitto" / opts["acl_file"][0].rsplit("/", 1)[1]).is_file()
    text = (COMPOSE / "mosquitto/mosquitto.conf").read_text(encoding="utf-8")
    for option in ("listener 8883", "certfile", "keyfile", "cafile"):
        assert re.search(rf"^#\s*{option}\b", text, re.M), f"TLS example lacks {option}"


def test_mosquitto_service_wires_conf_auth_and_health(services: dict[str, Any]) -> None:
    """The password file the conf names is the one the entrypoint writes; the healthcheck
    uses the loopback listener; persistence lives in a named volume."""
    _, listeners = _mosquitto()
    svc = services["mosquitto"]
    assert svc["image"].startswith("eclipse-mosquitto:2")
    password_file = listeners["1883"]["password_file"][0]
    assert password_file in _script(svc)
    assert "mosquitto_passwd" in _script(svc)
    mounts = dict((target, source) for source, target in _mounts(svc))
    assert mounts["/mosquitto/config"] == "./mosquitto"
    assert not mounts["/mosquitto/data"].startswith((".", "/"))
    health = svc["healthcheck"]["test"]
    loopback_ports = [n.split()[0] for n in listeners if n.endswith("127.0.0.1")]
    assert health[health.index("-p") + 1] in loopback_ports


def _acl(
    name: str = "acl",
) -> tuple[list[tuple[str, str]], dict[str | None, list[tuple[str, str]]]]:
    """(pattern rules, {user or None for anonymous: topic rules}) as (access, topic) pairs,
    of one ACL file: ``acl`` (device listeners), ``acl-services``, ``acl-health``."""
    patterns: list[tuple[str, str]] = []
    users: dict[str | None, list[tuple[str, str]]] = {None: []}
    user: str | None = None
    for key, *args in _conf_lines(COMPOSE / "mosquitto" / name):
        if key == "user":
            user = args[0]
            users.setdefault(user, [])
        elif key in {"topic", "pattern"}:
            access, topic = (args[0], args[1]) if len(args) == 2 else ("readwrite", args[0])
            (patterns if key == "pattern" else users[user]).append((access, topic))
        else:
            raise AssertionError(f"unexpected ACL line {key} {args}")
    return patterns, users


def _matches(filter_: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest)."""
    f, t = filter_.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def _allowed(username: str, access: str, topic: str) -> bool:
    """Mosquitto's decision: deny rules win, otherwise any matching grant allows. Service
    users log in on the services listener (acl-services), devices on the device listener."""
    patterns, users = _acl("acl-services" if username.startswith("fedbus-") else "acl")
    rules = [(a, p.replace("%u", username)) for a, p in patterns] + users.get(username, [])
    if any(a == "deny" and _matches(p, topic) for a, p in rules):
        return False
    return any(a in {access, "readwrite"} and _matches(p, topic) for a, p in rules)


def test_acl_lines() -> None:
    """The exact device patterns, with ``%u`` as a whole last level, and no ``$share`` lines
    (Mosquitto checks shared subscriptions without the ``$share/<group>/`` prefix)."""
    patterns, users = _acl()
    assert ("write", "fedbus/v1/+/updates/%u") in patterns
    assert ("read", "fedbus/v1/+/model") in patterns
    assert ("readwrite", "fedbus/v1/+/status/%u") in patterns
    for _, topic in patterns:
        if "%u" in topic:
            assert topic.split("/")[-1] == "%u", topic
    assert users == {None: []}  # devices only: every rule is a per-device pattern
    _, services = _acl("acl-services")
    assert "fedbus-worker" in services and "fedbus-analytics" in services
    assert not any("$share" in t for rules in services.values() for _, t in rules)
    health_patterns, health = _acl("acl-health")
    assert health_patterns == [] and health == {None: [("read", "$SYS/broker/uptime")]}


def test_listeners_bind_identity() -> None:
    """Devices' client id is their username (no device can take the worker's session); the
    services listener has its own password file and ACL; the worker uses it."""
    _, listeners = _mosquitto()
    device, services = listeners["1883"], listeners["1885"]
    assert device["use_username_as_clientid"] == ["true"]
    assert device["acl_file"] == ["/mosquitto/config/acl"]
    assert services["acl_file"] == ["/mosquitto/config/acl-services"]
    assert services["password_file"] != device["password_file"]
    assert "use_username_as_clientid" not in services  # a worker opens several connections
    health = next(opts for name, opts in listeners.items() if name.endswith("127.0.0.1"))
    assert health["acl_file"] == ["/mosquitto/config/acl-health"]
    assert _toml("mqtt")["mqtt"]["port"] == 1885
    assert not _toml("mqtt")["mqtt"]["identifier"].startswith("dev-")


def test_acl_behaviour() -> None:
    """Evaluated like Mosquitto: a device can publish only as itself; only workers publish
    models, events and dead letters; analytics only read."""
    m = DEMO_MODEL
    assert _allowed("dev-7", "write", f"fedbus/v1/{m}/updates/dev-7")
    assert not _allowed("dev-7", "write", f"fedbus/v1/{m}/updates/dev-8")
    assert not _allowed("dev-7", "read", f"fedbus/v1/{m}/updates/dev-8")
    assert _allowed("dev-7", "read", f"fedbus/v1/{m}/model")
    assert _allowed("dev-7", "read", f"fedbus/v1/{m}/diffs")
    assert _allowed("dev-7", "write", f"fedbus/v1/{m}/status/dev-7")
    assert not _allowed("dev-7", "write", f"fedbus/v1/{m}/status/dev-8")
    for kind in ("model", "diffs", "events", "deadletter"):
        assert not _allowed("dev-7", "write", f"fedbus/v1/{m}/{kind}")
        assert _allowed("fedbus-worker", "write", f"fedbus/v1/{m}/{kind}")
        assert not _allowed("fedbus-analytics", "write", f"fedbus/v1/{m}/{kind}")
    assert _allowed("fedbus-worker", "read", f"fedbus/v1/{m}/updates/dev-7")
    assert _allowed("fedbus-worker", "read", f"fedbus/v1/{m}/model")  # restart bootstrap
    assert _allowed("fedbus-analytics", "read", f"fedbus/v1/{m}/events")
    assert not _allowed("fedbus-analytics", "read", f"fedbus/v1/{m}/updates/dev-7")


def test_worker_mqtt_username_is_in_acl(services: dict[str, Any]) -> None:
    """The worker logs in as the ACL's worker user, in env and TOML alike."""
    _, users = _acl("acl-services")
    env_user = _env(services["worker-mqtt"])["FEDBUS_MQTT__USERNAME"]
    assert env_user == _toml("mqtt")["mqtt"]["username"]
    assert env_user in users


def test_no_real_passwords_committed() -> None:
    """Only the example ships; it explains mosquitto_passwd and holds no credential line."""
    example = (COMPOSE / "mosquitto/passwords.example").read_text(encoding="utf-8")
    assert "mosquitto_passwd" in example
    assert not [ln for ln in example.splitlines() if ln and not ln.startswith("#")]
    ignored = (COMPOSE / ".gitignore").read_text(encoding="utf-8").split()
    assert "mosquitto/passwords" in ignored and ".env" in ignored


# -- worker TOML examples --------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["mqtt", "kafka"])
def test_worker_toml(transport: str) -> None:
    """Parses, uses only documented keys, and is accepted by the real settings model."""
    data = _toml(transport)
    for key, value in data.items():
        assert key in TOML_KEYS, key
        allowed = TOML_KEYS[key]
        if allowed is None:
            assert not isinstance(value, dict), key
        else:
            assert isinstance(value, dict) and set(value) <= allowed, (key, set(value) - allowed)
    assert data["transport"] == transport
    assert re.fullmatch(ID, data["model"]) and data["model"] == DEMO_MODEL
    if transport == "kafka":
        assert data["kafka"]["group_id"] == f"fedbus-reducers-{data['model']}"
    settings = pytest.importorskip("workers.settings")
    settings.WorkerSettings.model_validate(data)  # extra="forbid": unknown keys fail


# -- Prometheus and Grafana ------------------------------------------------------------------


def test_prometheus_scrapes_both_workers(services: dict[str, Any]) -> None:
    """Each worker service at its configured metrics port, path /metrics."""
    prom = _yaml(COMPOSE / "prometheus/prometheus.yml")
    targets = {
        target
        for job in prom["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for group in job.get("static_configs", [])
        for target in group["targets"]
    }
    for name in WORKERS:
        assert f"{name}:{_env(services[name])['FEDBUS_METRICS_PORT']}" in targets
    mounts = {target: source for source, target in _mounts(services["prometheus"])}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"


def test_grafana_provisioning(services: dict[str, Any], dashboard: dict[str, Any]) -> None:
    """Datasource points at the compose Prometheus with the uid the dashboard uses; the
    dashboard provider reads the folder compose mounts the dashboard JSON into."""
    ds = _yaml(COMPOSE / "grafana/provisioning/datasources/prometheus.yaml")
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {source["uid"]}

    providers = _yaml(COMPOSE / "grafana/provisioning/dashboards/dashboards.yaml")["providers"]
    mounts = {source: target for source, target in _mounts(services["grafana"])}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert providers[0]["options"]["path"] == mounts["./grafana/dashboards"]


PROMQL_FUNCS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
    "label_values", "topk", "bottomk", "delta", "deriv", "clamp_min", "clamp_max", "abs",
    "sum_over_time", "max_over_time", "avg_over_time", "vector", "scalar",
}  # fmt: skip
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset"}  # fmt: skip


def _expressions(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        yield query["query"] if isinstance(query, dict) else str(query or "")


def _metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) referenced by a PromQL expression."""
    labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", expr))
    # Grafana's label_values(metric, label): the second argument is a label name.
    for metric, label in re.findall(r"label_values\(\s*([^,()]+?)\s*,\s*(\w+)\s*\)", expr):
        labels.add(label)
        expr = expr.replace(f"label_values({metric}, {label})", f"label_values({metric})")
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", bare):
        word, call = m.group(1), m.group(2)
        if call:
            assert word in PROMQL_FUNCS, f"unknown function {word} in {expr}"
        elif word not in PROMQL_KEYWORDS and word not in labels:
            names.add(word)
    return names, labels


def _allowed_series() -> dict[str, set[str]]:
    series = {**COUNTERS, **GAUGES}
    for name, labels in HISTOGRAMS.items():
        series[f"{name}_bucket"] = labels | {"le"}
        series[f"{name}_sum"] = labels
        series[f"{name}_count"] = labels
    return series


def test_dashboard_uses_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    """Every series in every query is one the workers export, with labels it really has, so
    the dashboard cannot drift from the code; and every exported metric is on a panel."""
    series = _allowed_series()
    used: set[str] = set()
    for expr in _expressions(dashboard):
        names, labels = _metric_names(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            assert name in series, f"{name} is not exported by fedbus workers ({expr})"
            assert labels <= series[name] | TARGET_LABELS, (name, labels)
        used |= names
    exported = set(COUNTERS) | set(GAUGES) | {f"{h}_bucket" for h in HISTOGRAMS}
    assert exported <= used, f"metrics without a panel: {exported - used}"


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    """Loadable by the file provider: uid, title, unique panel ids, grid positions, a
    staleness heatmap and p50/p99 latency panels."""
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["w"] <= 24
        assert p["type"] in {"timeseries", "stat", "heatmap", "gauge", "bargauge", "table"}
    kinds = {p["type"] for p in dashboard["panels"]}
    assert "heatmap" in kinds
    exprs = list(_expressions(dashboard))
    for hist in ("fedbus_aggregate_duration_seconds", "fedbus_checkpoint_duration_seconds"):
        for q in ("0.5", "0.99"):
            assert any(f"histogram_quantile({q}," in e and hist in e for e in exprs), (hist, q)


# -- AsyncAPI --------------------------------------------------------------------------------

MQTT_ADDRESSES = {
    "fedbus/v1/{model}/updates/{client}",
    "fedbus/v1/{model}/model",
    "fedbus/v1/{model}/diffs",
    "fedbus/v1/{model}/events",
    "fedbus/v1/{model}/deadletter",
    "fedbus/v1/{model}/status/{client}",
    "fedbus/v1/{model}/keys/{role}",
    "fedbus/v1/{model}/secure/receipts",
    "fedbus/v1/{model}/secure/manifests",
    "fedbus/v1/{model}/secure/sums",
}
KAFKA_ADDRESSES = {
    f"fedbus.{{model}}.{k}"
    for k in ("updates", "models", "diffs", "events", "deadletter", "keys", "secure.receipts",
              "secure.manifests", "secure.sums")
}  # fmt: skip
TOPIC_GRAMMAR = re.compile(
    r"fedbus/v1/\{model\}/(?:updates/\{client\}|model|diffs|events|deadletter|status/\{client\}"
    r"|keys/\{role\}|secure/(?:receipts|manifests|sums))"
    r"|fedbus\.\{model\}\.(?:updates|models|diffs|events|deadletter|keys"
    r"|secure\.(?:receipts|manifests|sums))"
)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _pointer(doc: Any, fragment: str) -> Any:
    """Resolve a JSON pointer (``/a/b``) in ``doc``; KeyError if it does not exist."""
    node = doc
    for part in fragment.lstrip("/").split("/"):
        if part:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _channel_of(asyncapi: dict[str, Any], op: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ref = op["channel"]["$ref"]
    assert ref.startswith("#/channels/"), ref
    name = ref.removeprefix("#/channels/")
    return name, asyncapi["channels"][name]


def test_asyncapi_version_and_servers(asyncapi: dict[str, Any]) -> None:
    """AsyncAPI 3 with one server per broker."""
    assert str(asyncapi["asyncapi"]).startswith("3.")
    servers = asyncapi["servers"]
    assert servers["mosquitto"]["protocol"] == "mqtt"
    assert servers["kafka"]["protocol"] == "kafka"


def test_asyncapi_channels_follow_topic_grammar(asyncapi: dict[str, Any]) -> None:
    """Every address is a fedbus topic, all of them are documented, parameters match."""
    addresses = set()
    for name, channel in asyncapi["channels"].items():
        address = channel["address"]
        assert TOPIC_GRAMMAR.fullmatch(address), f"{name}: {address}"
        params = set(re.findall(r"\{(\w+)\}", address))
        assert params == set(channel.get("parameters", {})), name
        protocol = "mqtt" if address.startswith("fedbus/") else "kafka"
        for server in channel["servers"]:
            assert _pointer(asyncapi, server["$ref"].removeprefix("#"))["protocol"] == protocol
        addresses.add(address)
    assert addresses == MQTT_ADDRESSES | KAFKA_ADDRESSES


def test_asyncapi_refs_resolve(asyncapi: dict[str, Any]) -> None:
    """Internal refs resolve; file refs name one of the four schema files (and, once those
    exist, the fragment resolves in them)."""
    files = set()
    for ref in _refs(asyncapi):
        path, _, fragment = ref.partition("#")
        if not path:
            _pointer(asyncapi, fragment)
            continue
        name = Path(path).name
        assert path in {name, f"./{name}"}, f"schema refs are relative to schemas/: {ref}"
        assert name in SCHEMA_FILES, ref
        files.add(name)
        if (SCHEMAS / name).is_file() and fragment:
            _pointer(json.loads((SCHEMAS / name).read_text(encoding="utf-8")), fragment)
    assert files == SCHEMA_FILES


def test_asyncapi_messages(asyncapi: dict[str, Any]) -> None:
    """Binary envelopes are msgpack, events CloudEvents JSON; Kafka keys documented."""
    messages = asyncapi["components"]["messages"]
    for name in ("update", "model", "deadletter"):
        assert messages[name]["contentType"] == "application/msgpack"
        assert messages[name]["payload"]["$ref"].endswith(f"{name}.schema.json")
    assert messages["event"]["contentType"] == "application/cloudevents+json"
    assert messages["event"]["payload"]["$ref"].split("#")[0].endswith("event.schema.json")
    for name in ("update", "model", "event", "deadletter"):
        assert messages[name]["bindings"]["kafka"]["key"]["type"] == "string"


def test_asyncapi_operations(asyncapi: dict[str, Any]) -> None:
    """Each operation names an existing channel and that channel's messages; every role
    appears, devices send and workers receive updates on both transports."""
    roles: dict[str, set[tuple[str, str]]] = {}
    for name, op in asyncapi["operations"].items():
        assert op["action"] in {"send", "receive"}, name
        channel_name, channel = _channel_of(asyncapi, op)
        prefix = f"#/channels/{channel_name}/messages/"
        for message in op["messages"]:
            assert message["$ref"].startswith(prefix), (name, message)
            assert message["$ref"].removeprefix(prefix) in channel["messages"]
        for tag in op.get("tags", []):
            roles.setdefault(tag["name"], set()).add((op["action"], channel_name))
    assert set(roles) == {"device", "worker", "analytics"}
    for transport in ("mqtt", "kafka"):
        assert ("send", f"{transport}Updates") in roles["device"]
        assert ("receive", f"{transport}Updates") in roles["worker"]
        assert ("send", f"{transport}Deadletter") in roles["worker"]
        assert ("receive", f"{transport}Events") in roles["analytics"]
    assert ("send", "mqttModel") in roles["worker"]
    assert ("send", "kafkaModels") in roles["worker"]


def test_asyncapi_mqtt_bindings(asyncapi: dict[str, Any]) -> None:
    """QoS 1 everywhere; only the model, device-status and aggregator-key channels are
    retained."""
    retained_channels = set()
    for name, op in asyncapi["operations"].items():
        _, channel = _channel_of(asyncapi, op)
        mqtt = op.get("bindings", {}).get("mqtt")
        if channel["address"].startswith("fedbus/"):
            assert mqtt is not None and mqtt["qos"] == 1, name
            if mqtt.get("retain"):
                retained_channels.add(channel["address"])
        else:
            assert mqtt is None, name
    assert retained_channels == {
        "fedbus/v1/{model}/model",
        "fedbus/v1/{model}/status/{client}",
        "fedbus/v1/{model}/keys/{role}",
    }
    update_sends = [
        op for op in asyncapi["operations"].values()
        if op["action"] == "send" and op["channel"]["$ref"] == "#/channels/mqttUpdates"
    ]  # fmt: skip
    assert update_sends and all(op["bindings"]["mqtt"]["retain"] is False for op in update_sends)


def test_asyncapi_documents_partitioned_subscription(asyncapi: dict[str, Any]) -> None:
    """Reducers read partitions through plain subscriptions (no ``$share``, which loses
    queued updates on a Mosquitto restart); FedAsync and the all worker the plain filter."""
    assert "shared_group" not in _toml("mqtt")["mqtt"]
    subs = {
        op["x-mqtt-subscription"]
        for op in asyncapi["operations"].values()
        if "x-mqtt-subscription" in op
    }
    assert subs == {"fedbus/v1/{model}/updates/{p}/+", "fedbus/v1/{model}/updates/+"}


def test_asyncapi_kafka_bindings_match_topics_init(
    asyncapi: dict[str, Any], services: dict[str, Any]
) -> None:
    """Documented topic configs agree with what compose creates; reducers' group id follows
    ``fedbus-reducers-<model>``."""
    created = _created_topics(services)
    for channel in asyncapi["channels"].values():
        binding = channel.get("bindings", {}).get("kafka")
        if binding is None:
            continue
        topic = created[channel["address"].replace("{model}", DEMO_MODEL)]
        assert binding["partitions"] == int(topic["partitions"])
        for key, value in binding["topicConfiguration"].items():
            expected = ",".join(value) if isinstance(value, list) else str(value)
            assert topic[key] == expected, (channel["address"], key)
    models = asyncapi["channels"]["kafkaModels"]["bindings"]["kafka"]["topicConfiguration"]
    assert models["cleanup.policy"] == ["compact"]
    group = asyncapi["operations"]["workerReceiveUpdatesKafka"]["bindings"]["kafka"]["groupId"]
    assert re.fullmatch(group["pattern"], _toml("kafka")["kafka"]["group_id"])


# -- hygiene ---------------------------------------------------------------------------------


def test_no_machine_paths() -> None:
    """Nothing in the deployment files depends on where this checkout lives."""
    files = [p for p in COMPOSE.rglob("*") if p.is_file()] + [SCHEMAS / "asyncapi.yaml"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?:/home/|/Users/|/work/)", text), path


def test_kafka_authenticates_and_authorizes(services: dict[str, Any]) -> None:
    """Every Kafka listener wants SASL, nothing is allowed without an ACL, the workers log in
    as a user the broker knows, and devices may only write updates and read models."""
    env = _env(services["kafka"])
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols.values()) <= {"SASL_PLAINTEXT", "SASL_SSL"}
    names = {u.split("://")[0] for u in env["KAFKA_LISTENERS"].split(",")}
    assert names == set(protocols)
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    users = {}
    for name in names:
        jaas = env[f"KAFKA_LISTENER_NAME_{name}_PLAIN_SASL_JAAS_CONFIG"]
        users[name] = set(re.findall(r"user_([a-z0-9-]+)=", jaas))
    assert all(u == users["INTERNAL"] for u in users.values())
    for name in ("worker-kafka", "model-init-kafka"):
        worker = _env(services[name])
        assert worker["FEDBUS_KAFKA__SECURITY_PROTOCOL"] == protocols["INTERNAL"]
        assert worker["FEDBUS_KAFKA__SASL_PLAIN_USERNAME"] in users["INTERNAL"]
    grants = [
        shlex.split(line)[1:]
        for line in _script(services["topics-init"]).splitlines()
        if line.startswith("acl ")
    ]
    ops: set[tuple[str, str]] = set()  # (topic, operation) granted to devices
    for g in grants:
        flags = list(zip(g[::2], g[1::2], strict=False))
        if ("--allow-principal", "User:fedbus-device") not in flags:
            continue
        topic = dict(flags)["--topic"]
        ops |= {(topic, value) for flag, value in flags if flag == "--operation"}
    m = DEMO_MODEL
    assert ops == {
        (f"fedbus.{m}.updates", "Write"),
        (f"fedbus.{m}.updates", "Describe"),
        (f"fedbus.{m}.models", "Read"),
        (f"fedbus.{m}.models", "Describe"),
    }
