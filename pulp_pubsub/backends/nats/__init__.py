"""The NATS backend: ``backend`` is its one public module; the rest are its helpers."""

from .backend import NatsBackend

__all__ = ["NatsBackend"]
