"""The Redis backend: ``backend`` is its one public module; the rest are its helpers."""

from .backend import RedisBackend

__all__ = ["RedisBackend"]
