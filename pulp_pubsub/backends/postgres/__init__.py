"""The PostgreSQL backend: ``backend`` is its one public module; the rest are its helpers."""

from .backend import PostgresBackend

__all__ = ["PostgresBackend"]
