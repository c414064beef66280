"""The etcd backend: ``backend`` is its one public module; the rest are its helpers."""

from .backend import EtcdBackend

__all__ = ["EtcdBackend"]
