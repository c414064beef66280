"""Host name lookups and TCP connects that give up at a deadline.

``getaddrinfo()`` waits for as long as the system's resolver lets it (with a
resolver that does not answer, glibc's default is two tries of five seconds
each per name server), and no socket timeout covers it: a publish that has to
connect would outlast its ``publish_timeout``. So a name that is not an
address is looked up on a thread of its own and waited for until the
deadline; a lookup left behind ends when the resolver gives up.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any

#: One result of ``getaddrinfo()``: family, type, proto, canonical name, address.
AddrInfo = tuple[Any, ...]


class LookupTimeout(OSError):
    """The resolver did not answer in time.

    An ``OSError`` like every other failure to connect, and not a
    ``TimeoutError``: redis-py would replace its message with its own.
    """


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 scope id is no name
    except ValueError:
        return False
    return True


def lookup(host: str, port: int | str | None, timeout: float) -> list[AddrInfo]:
    """``getaddrinfo(host, port)`` for TCP, or :class:`LookupTimeout` after ``timeout`` s."""
    if is_address(host):
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    outcome: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the waiting thread
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="pubsub-lookup", daemon=True).start()
    if not done.wait(max(0.0, timeout)):
        raise LookupTimeout(
            f"looking up {host!r} took over {timeout:.3g} s: the DNS resolver did not answer"
        )
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return list(result)


def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """``socket.create_connection((host, port), timeout)``, the lookup included in ``timeout``."""
    deadline = time.monotonic() + timeout
    error: OSError | None = None
    for family, kind, proto, _, address in lookup(host, port, timeout):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.settimeout(timeout)
        return sock
    raise error or TimeoutError(f"connecting to {host}:{port} took over {timeout:.3g} s")
