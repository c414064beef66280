"""A small HTTP/1.1 client for etcd's v3 JSON gateway, bounded by deadlines.

Why not a client library: the listener waits on a file descriptor, and a
watch here must be a plain socket whose readability means "events arrived".
etcd3gw reads its watch through ``requests`` in a thread of its own, aetcd
through asyncio and gRPC; either would put a thread and a second buffer
between the socket and the listener. The gateway speaks JSON over one HTTP
request per call (a watch is one request whose chunked response streams
events), which the standard library carries in a few dozen lines, with no
dependency and every wait bounded by the caller's deadline.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
from typing import Any

from ..lookup import connect_tcp

#: gRPC status codes the gateway returns that say "try another member".
RETRY_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
#: Server messages with the same meaning, whatever code carries them.
RETRY_MESSAGES = (
    "no leader",
    "leader changed",
    "request timed out",
    "not capable",
    "too many requests",
    "stopped",
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


class EtcdError(Exception):
    """An error answer of the gateway (the gRPC code and etcd's message)."""

    def __init__(self, code: int, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status

    @property
    def retryable(self) -> bool:
        return self.code in RETRY_CODES or any(m in self.message for m in RETRY_MESSAGES)

    @property
    def bad_token(self) -> bool:
        return "invalid auth token" in self.message or "auth token is expired" in self.message


class Endpoint:
    """One member's address; ``str()`` is what may be printed."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.host, self.port, self.tls = host, port, tls

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    __repr__ = __str__

    def connect(self, deadline: float) -> socket.socket:
        left = _left(deadline)
        sock = connect_tcp(self.host, self.port, left)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock.settimeout(_left(deadline))
            sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        return sock


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def request_bytes(endpoint: Endpoint, path: str, body: dict[str, Any], token: str | None) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {endpoint.host}:{endpoint.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
    ]
    if token:
        head.append(f"Authorization: {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class HttpReader:
    """Parses one HTTP response from bytes fed to it, whatever their split.

    ``feed()`` then ``body_chunks()``: the status and headers first, then the
    body, de-chunked, as it arrives (a watch's body never ends).
    """

    def __init__(self) -> None:
        self.buf = b""
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.chunked = False
        self.length: int | None = None
        self.body = b""
        self.done = False
        self._chunk_left = 0

    def feed(self, data: bytes) -> None:
        self.buf += data
        if self.status is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    raise ValueError("HTTP response headers too long")
                return
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
            lines = head.split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
            if "content-length" in self.headers:
                self.length = int(self.headers["content-length"])
        if self.chunked:
            self._dechunk()
        else:
            self.body += self.buf
            self.buf = b""
            if self.length is not None and len(self.body) >= self.length:
                self.done = True

    def _dechunk(self) -> None:
        while not self.done:
            if self._chunk_left:
                piece = self.buf[: self._chunk_left]
                self.body += piece
                self.buf = self.buf[len(piece) :]
                self._chunk_left -= len(piece)
                if self._chunk_left:
                    return
                continue
            if self.buf.startswith(b"\r\n"):
                self.buf = self.buf[2:]
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            size = int(self.buf[:end].split(b";")[0] or b"0", 16)
            if size == 0:
                # The last chunk; trailers (gRPC's) follow and end with an empty line.
                rest = self.buf[end + 2 :]
                if rest.startswith(b"\r\n") or b"\r\n\r\n" in rest:
                    self.done = True
                    self.buf = b""
                return
            self.buf = self.buf[end + 2 :]
            self._chunk_left = size

    def take_json(self) -> list[dict[str, Any]]:
        """The complete JSON objects of the body so far (a stream holds several)."""
        out: list[dict[str, Any]] = []
        decoder = json.JSONDecoder()
        text = self.body.decode("utf-8")
        pos = 0
        while True:
            while pos < len(text) and text[pos] in " \r\n\t":
                pos += 1
            if pos >= len(text):
                break
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                break  # incomplete: wait for more bytes
            out.append(obj)
        self.body = text[pos:].encode("utf-8")
        return out


def check_answer(reader: HttpReader, objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The one answer object of a unary call, or the gateway's error raised."""
    obj = objs[0] if objs else {}
    if "error" in obj or (reader.status or 0) >= 400:
        message = str(obj.get("message") or obj.get("error") or f"HTTP {reader.status}")
        raise EtcdError(int(obj.get("code", 0) or 0), message, reader.status or 0)
    return obj


class Connection:
    """A keep-alive connection to one member for unary calls (not thread-safe)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.sock: socket.socket | None = None

    def call(
        self, path: str, body: dict[str, Any], deadline: float, token: str | None = None
    ) -> dict[str, Any]:
        fresh = self.sock is None
        try:
            return self._call(path, body, deadline, token)
        except (OSError, ValueError) as exc:
            self.close()
            if fresh or isinstance(exc, TimeoutError):
                raise
        # A kept-alive socket the server had closed meanwhile: one more try on a new one.
        return self._call(path, body, deadline, token)

    def _call(
        self, path: str, body: dict[str, Any], deadline: float, token: str | None
    ) -> dict[str, Any]:
        if self.sock is None:
            self.sock = self.endpoint.connect(deadline)
        sock = self.sock
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(request_bytes(self.endpoint, path, body, token))
            reader = HttpReader()
            while not reader.done:
                sock.settimeout(_left(deadline))
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("etcd closed the connection")
                reader.feed(data)
        except TimeoutError as exc:
            self.close()
            raise TimeoutError(f"no answer from {self.endpoint}") from exc
        except (OSError, ValueError):
            self.close()
            raise
        if reader.headers.get("connection", "").lower() == "close":
            self.close()
        return check_answer(reader, reader.take_json())

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
