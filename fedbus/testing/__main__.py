"""``python -m fedbus.testing amqtt|mosquitto|tansu [--port N]``: a throwaway broker in the
foreground, for trying fedbus by hand. Ctrl-C or SIGTERM stops it (by its PID) and removes
its temporary files; nothing is left running."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from fedbus.testing.brokers import AmqttBroker, BrokerError, MosquittoBroker, TansuBroker

BROKERS = {"amqtt": AmqttBroker, "mosquitto": MosquittoBroker, "tansu": TansuBroker}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedbus.testing", description=__doc__)
    parser.add_argument("broker", choices=tuple(BROKERS))
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    args = parser.parse_args(argv)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        broker = BROKERS[args.broker](args.port)
        with broker:
            where = f"{broker.host}:{broker.port}"
            print(f"{args.broker} listening on {where} (pid {broker.pid}); Ctrl-C stops it",
                  flush=True)  # fmt: skip
            while not done.wait(0.5):
                if not broker.running:
                    print(f"{args.broker} exited:\n{broker.log_tail()}", file=sys.stderr)
                    return 1
    except BrokerError as exc:
        print(f"python -m fedbus.testing: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"{args.broker} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
