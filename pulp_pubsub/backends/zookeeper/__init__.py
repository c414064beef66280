"""The ZooKeeper backend: ``backend`` is its one public module; the rest are its helpers."""

from .backend import ZookeeperBackend

__all__ = ["ZookeeperBackend"]
