"""Where a ZooKeeper install is, and the znode paths of its channels and messages.

``PUBSUB_URL`` is what ZooKeeper users write: the connect string
``host:2181,host2:2181/chroot``, or the same as a URL, ``zk://[user:password@]host:2181,
host2:2181/chroot`` (``zks://`` for TLS to the ``secureClientPort``). Credentials only in the
URL form, whose password the layer knows how to hide.

A channel is the znode ``<chroot><root>/<channel>`` and each message one sequential child
of it. ZooKeeper forbids ``/`` in a node name and the names ``.`` and ``..``, and refuses
some code points; those are written as ``%XX`` (UTF-8 bytes), and ``%`` itself as ``%25``,
so every channel has exactly one node and a plain client can find it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from django.core.exceptions import ImproperlyConfigured

from ...conf import hide_password
from ..hostlist import parse_credentials, parse_hosts

DEFAULT_PORT = 2181
_SCHEMES = {"zk": False, "zookeeper": False, "zks": True}
#: A message node's name ends in ZooKeeper's 10-digit sequence number (whatever its prefix:
#: a plain client may use its own).
_SEQUENCE = re.compile(r"(-?\d{10})$")


@dataclass(frozen=True)
class Where:
    hosts: list[tuple[str, int]]
    chroot: str
    tls: bool
    username: str | None
    password: str | None

    @property
    def connect_string(self) -> str:
        """The hosts for kazoo, without the chroot (the layer prefixes its paths itself)."""
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)


def parse_url(url: str) -> Where:
    scheme, sep, rest = url.partition("://")
    tls = False
    if sep:
        if scheme.lower() not in _SCHEMES:
            raise ImproperlyConfigured(
                f"PUBSUB_URL {hide_password(url)!r} is not a ZooKeeper URL: expected "
                "zk://host:2181[,host2:2181][/chroot], zks:// for TLS, or a plain "
                "connect string host:2181[,host2:2181][/chroot]."
            )
        tls = _SCHEMES[scheme.lower()]
    else:
        rest = url
    userinfo, at, location = rest.rpartition("@")
    if at and not sep:
        raise ImproperlyConfigured(
            "PUBSUB_URL: credentials go in the zk://user:password@host:2181 form (or the "
            "username and password options), not in a plain connect string."
        )
    if "?" in location or "#" in location:
        raise ImproperlyConfigured(
            f"PUBSUB_URL {hide_password(url)!r}: a ZooKeeper URL has no query; "
            "TLS files and limits are PUBSUB_OPTIONS."
        )
    hostlist, slash, chroot = location.partition("/")
    chroot = ("/" + chroot.strip("/")) if slash and chroot.strip("/") else ""
    if chroot and ("//" in chroot or any(p in (".", "..") for p in chroot.split("/"))):
        raise ImproperlyConfigured(f"PUBSUB_URL {hide_password(url)!r}: bad chroot {chroot!r}.")
    username = password = None
    if at:
        username, password = parse_credentials(userinfo, url, "digest authentication")
    hosts = parse_hosts(hostlist, DEFAULT_PORT, url)
    return Where(hosts, chroot, tls, username, password)


def _refused(char: str) -> bool:
    """Characters ZooKeeper's PathUtils refuses in a path, and ours that must be escaped."""
    code = ord(char)
    return (
        char in "/%"
        or code < 0x20
        or 0x7F <= code <= 0x9F
        or 0xD800 <= code <= 0xF8FF
        or code >= 0xFFF0  # and beyond: Java's surrogate pairs, which ZooKeeper refuses
    )


def escape(wire: str) -> str:
    """The node name of a wire channel name."""
    if wire in (".", ".."):
        return wire.replace(".", "%2E")
    if not any(_refused(c) for c in wire):
        return wire
    return "".join("".join(f"%{b:02X}" for b in c.encode()) if _refused(c) else c for c in wire)


def unescape(name: str) -> str:
    return unquote(name) if "%" in name else name


def sequence(name: str) -> int | None:
    """The sequence number of a message node's name, or None for another node."""
    match = _SEQUENCE.search(name)
    return int(match.group(1)) if match else None
