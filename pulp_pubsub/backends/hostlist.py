"""The parts of a multi-host ``PUBSUB_URL`` that etcd and ZooKeeper write the same way.

``user:password@host[:port],host2[:port],[::1]:port``: the members of one cluster, each with
the scheme's default port when none is given, and credentials quoted as in any URL.
"""

from __future__ import annotations

from urllib.parse import unquote

from django.core.exceptions import ImproperlyConfigured

from ..conf import hide_password


def parse_credentials(userinfo: str, url: str, what: str) -> tuple[str, str]:
    """(user, password) of ``user:password``, both required; ``what`` names the scheme."""
    user, colon, pw = userinfo.partition(":")
    username, password = unquote(user), (unquote(pw) if colon else None)
    if not username or password is None:
        raise ImproperlyConfigured(
            f"PUBSUB_URL {hide_password(url)!r}: {what} needs both a user name and a "
            "password (user:password@)."
        )
    return username, password


def parse_hosts(hostlist: str, default_port: int, url: str) -> list[tuple[str, int]]:
    """The (host, port) pairs of a comma-separated list; IPv6 addresses in brackets."""
    hosts = []
    for part in hostlist.split(","):
        part = part.strip()
        if part.startswith("["):
            host, _, port_text = part[1:].partition("]")
            port_text = port_text.lstrip(":")
        else:
            host, _, port_text = part.partition(":")
        try:
            port = int(port_text) if port_text else default_port
            if not host or not 0 < port < 65536 or any(c.isspace() for c in host):
                raise ValueError
        except ValueError:
            raise ImproperlyConfigured(
                f"PUBSUB_URL {hide_password(url)!r}: {part!r} is not host[:port]."
            ) from None
        hosts.append((host, port))
    return hosts
