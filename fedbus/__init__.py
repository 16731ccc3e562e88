"""fedbus: asynchronous federated learning over message queues."""

__version__ = "0.1.0"
