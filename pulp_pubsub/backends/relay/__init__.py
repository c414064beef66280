"""The the relay backend: ``backend`` is its one public module; the rest are its helpers."""

from .backend import RelayBackend

__all__ = ["RelayBackend"]
