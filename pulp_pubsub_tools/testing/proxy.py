"""A TCP proxy between clients and a server on loopback that can cut, stall or slow traffic."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
import time
import urllib.parse
from typing import Any

from .processes import LOOPBACK


class TcpProxy:
    """A loopback relay to one server that injects network faults on demand.

    ``cut()`` resets every open connection (RST, as a dead middlebox would) and keeps
    accepting; ``stall()`` keeps sockets open but forwards nothing either way, not even a FIN
    (a black hole / half-open link) until ``resume()``, which also ends ``slow(d)``, the
    per-chunk delay.  Two threads per connection, at most ``max_connections`` connections.
    """

    def __init__(self, target_host: str, target_port: int, max_connections: int = 1024) -> None:
        if not ipaddress.ip_address(socket.gethostbyname(target_host)).is_loopback:
            raise ValueError("TcpProxy only relays to loopback addresses")
        self.target, self.max_connections = (target_host, target_port), max_connections
        self._listener = socket.create_server((LOOPBACK, 0), backlog=128)
        self._listener.settimeout(0.2)  # lets the accept loop notice close()
        self.host, self.port = LOOPBACK, int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._delay = 0.0
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> TcpProxy:
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()
        return self

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def url_for(self, url: str) -> str:
        """The same URL, with host and port pointing at this proxy."""
        parts = urllib.parse.urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = (auth + "@" if auth else "") + f"{self.host}:{self.port}"
        return parts._replace(netloc=netloc).geturl()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                if len(self._pairs) >= self.max_connections:
                    raise OSError("proxy connection limit reached")
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._abort(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[Any, Any]) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                while not self._flowing.wait(0.05):  # stalled: hold the bytes (or the EOF)
                    if pair not in self._pairs:
                        return
                if not data or pair not in self._pairs:
                    break
                if self._delay:
                    time.sleep(self._delay)
                dst.sendall(data)
        with self._lock:
            if pair not in self._pairs:
                return  # cut() already reset it
            self._pairs.discard(pair)
        for s in pair:  # orderly close: the other side sees EOF
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        """Close with RST rather than FIN; SHUT_RD first wakes a thread blocked in recv."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        sock.close()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            for s in pair:
                self._abort(s)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._delay = 0.0
        self._flowing.set()

    def slow(self, delay_seconds: float) -> None:
        self._delay = max(0.0, delay_seconds)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
        if self._thread.is_alive():
            self._thread.join(2)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
