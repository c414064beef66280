"""The subscriber machinery every backend shares; see :mod:`.subscriber`."""

from .loop import PROBE_PREFIX
from .subscriber import RESERVED_PREFIXES, Callback, Subscriber

__all__ = ["PROBE_PREFIX", "RESERVED_PREFIXES", "Callback", "Subscriber"]
