"""The relay's wire protocol, and the blocking client both sides of the layer use.

A relay speaks WebSocket (subprotocol ``pulp-pubsub.v1``); every message is
one JSON object in a text frame, with a ``type``:

=============  =========  ===================================================================
type           direction  fields and meaning
=============  =========  ===================================================================
subscribe      to relay   ``id``, ``channels`` (wire names), ``local`` (optional bool: never
                          LISTEN for them on PostgreSQL; the subscriber's own probe channel).
                          Answered by ``subscribed`` once the relay's LISTEN covers them.
unsubscribe    to relay   ``channels``. Not answered.
publish        to relay   ``id``, ``channel``, ``payload``, ``notify`` (bool). ``notify``: the
                          relay runs ``pg_notify`` on its own session (PostgreSQL fans it out
                          to every relay); otherwise the relay hands it to its own clients
                          only. Answered by ``published`` (or ``error``).
publish_many   to relay   ``id``, ``messages`` (a list of ``[channel, payload]``): several
                          publishes without ``notify``, in order, checked whole first.
                          Answered once by ``published`` (or ``error``: nothing was sent).
ping           to relay   ``id``. Answered by ``pong`` with the relay's health: ``postgres``
                          (``listening``, ``down`` or ``off``), ``clients``, ``channels``.
message        to client  ``channel``, ``payload``: a notification, byte-exact.
resync         to client  ``channels``: what these channels carried may have been missed
                          (the relay's PostgreSQL session was lost and is back).
error          to client  ``error`` and, when it answers a request, its ``id``.
=============  =========  ===================================================================

A client authenticates with ``Authorization: Bearer <token>`` in the
handshake; a wrong token gets HTTP 401, a full relay HTTP 503. A client too
slow to read its messages is closed with code 1013 (try again later): it
reconnects, to this relay or another, and resyncs.

:class:`RelayConnection` is a client on a plain (or TLS) socket driven by
websockets' sans-I/O protocol, so the listener thread can wait for it in
``select()`` like any other transport; websockets' own synchronous client
reads on a thread of its own, which would hide readiness from ``fileno()``.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
import time
from typing import Any

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState, InvalidStatus, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from ...conf import hide_password
from ...exceptions import ConnectionLost
from ..lookup import connect_tcp

SUBPROTOCOL = Subprotocol("pulp-pubsub.v1")
#: websockets logs every handshake header at DEBUG, the token's ``Authorization`` among them:
#: its connections log here instead, never below INFO, and never that header.
WIRE_LOGGER = logging.getLogger("pulp_pubsub.relay.wire")
WIRE_LOGGER.setLevel(logging.INFO)


class _NoCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "authorization" not in str(record.msg).lower() and not any(
            "authorization" in str(arg).lower() for arg in (record.args or ())
        )


WIRE_LOGGER.addFilter(_NoCredentials())
#: Largest frame either side accepts: a 7,999-byte payload JSON-escaped with room to spare.
MAX_FRAME = 2**20
#: Bytes asked of the socket per read.
RECV_SIZE = 65536
#: Close code for a client whose send queue overflowed (RFC 6455 "try again later").
TOO_SLOW = 1013
_HINTS = {
    401: "the relay refused the token: check PUBSUB_RELAY_TOKEN on both sides",
    403: "the relay refused the connection",
    503: "the relay is full (its --max-clients) or shutting down",
}


#: One encoder for every frame: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(**frame: Any) -> str:
    return _ENCODER.encode(frame)


def decode(text: str | bytes) -> dict[str, Any]:
    """One frame as a dict with a str ``type``; ValueError for anything else."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ValueError("a relay frame is a JSON object with a string 'type'")
    return data


def check_url(url: str) -> None:
    """Raise ValueError unless ``url`` is a ws:// or wss:// URL."""
    try:
        parse_uri(url)
    except InvalidURI as exc:
        # Only the reason: the exception's own text repeats the URL, password and all.
        raise ValueError(exc.msg) from None


class RelayConnection:
    """One WebSocket connection to a relay, read without blocking once open."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # For messages: without a password a ws:// URL may carry for HTTP basic auth.
        self.url = hide_password(url) or ""
        uri = parse_uri(url)
        deadline = time.monotonic() + timeout
        self._fragments: list[bytes] = []
        self.frames: list[dict[str, Any]] = []
        try:
            sock = connect_tcp(uri.host, uri.port, timeout)
        except OSError as exc:
            raise ConnectionLost(f"could not connect to the relay {url}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if uri.secure:
                context = ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=uri.host)
            sock.setblocking(False)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ConnectionLost(f"TLS with the relay {url} failed: {exc}") from None
        self.sock = sock
        self._protocol = ClientProtocol(
            uri, subprotocols=[SUBPROTOCOL], max_size=MAX_FRAME, logger=WIRE_LOGGER
        )
        request = self._protocol.connect()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        self._protocol.send_request(request)
        try:
            self._flush(deadline)
            protocol = self._protocol
            while protocol.state is State.CONNECTING and protocol.handshake_exc is None:
                if not self._wait(deadline):
                    raise ConnectionLost(f"the relay {url} did not answer the handshake in time")
                self._receive()
            self._handshake_result()
        except BaseException:
            self.sock.close()
            raise

    def _handshake_result(self) -> None:
        exc = self._protocol.handshake_exc
        if exc is None:
            return
        if isinstance(exc, InvalidStatus):
            status = exc.response.status_code
            hint = _HINTS.get(status, "")
            raise ConnectionLost(
                f"the relay {self.url} refused the connection: HTTP {status}"
                + (f" ({hint})" if hint else "")
            )
        raise ConnectionLost(f"the WebSocket handshake with {self.url} failed: {exc}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, deadline: float, **frame: Any) -> None:
        self.send_many(deadline, [frame])

    def send_many(self, deadline: float, frames: list[dict[str, Any]]) -> None:
        """Several frames in one write; ConnectionLost once the relay has begun closing.

        A connection the relay closed while nobody read it (its close frame waits in
        the socket) refuses to send: that is a lost connection, for the caller to
        drop and replace, never an error that would stay with it.
        """
        self.send_encoded(deadline, [encode(**frame).encode() for frame in frames])

    def send_encoded(self, deadline: float, texts: list[bytes]) -> None:
        """:meth:`send_many` for frames already encoded (one encoding for several relays)."""
        try:
            for text in texts:
                self._protocol.send_text(text)
        except InvalidState as exc:
            raise ConnectionLost(
                f"the connection to the relay {self.url} is closing: {exc}"
            ) from None
        self._flush(deadline)

    def read(self) -> list[dict[str, Any]]:
        """The frames that have arrived, without waiting; ConnectionLost once closed.

        A read that did not fill the buffer took what there was: reading again
        would be one more system call to learn that, on every answer a publisher
        waits for. More that arrives later makes the socket readable again.
        """
        while self._receive():
            pass
        out, self.frames = self.frames, []
        return out

    def wait(self, deadline: float) -> bool:
        """Wait until the socket is readable; False at ``deadline``."""
        return self._wait(deadline)

    def close(self) -> None:
        try:
            if self._protocol.state is State.OPEN:
                self._protocol.send_close()
                self.sock.send(b"".join(self._protocol.data_to_send()))
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.sock.close()

    # -- socket plumbing -------------------------------------------------------

    def _receive(self) -> bool:
        """Read once; False when nothing more is there now, as far as it can tell."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionLost(f"the connection to the relay {self.url} failed: {exc}") from None
        protocol = self._protocol
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        for event in protocol.events_received():
            if not isinstance(event, Frame):
                continue
            if event.opcode is Opcode.TEXT or event.opcode is Opcode.CONT:
                self._fragments.append(bytes(event.data))
                if event.fin:
                    whole = b"".join(self._fragments)
                    self._fragments = []
                    try:
                        self.frames.append(decode(whole))
                    except ValueError:
                        continue
        # Pongs to the relay's pings, and the closing handshake.
        pending = b"".join(protocol.data_to_send())
        if pending:
            try:
                self._write(pending, time.monotonic() + 1.0)
            except ConnectionLost:
                pass
        if protocol.state is State.CLOSED or not data:
            if protocol.handshake_exc is not None:
                return False  # refused: the caller reports the HTTP status
            reason = ""
            if protocol.close_rcvd is not None:
                code, text = protocol.close_rcvd.code, protocol.close_rcvd.reason
                reason = f" (close code {code}{': ' + text if text else ''})"
            raise ConnectionLost(f"the relay {self.url} closed the connection{reason}")
        sock = self.sock
        return len(data) == RECV_SIZE or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)

    def _flush(self, deadline: float) -> None:
        data = b"".join(self._protocol.data_to_send())
        if data:
            self._write(data, deadline)

    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                left = deadline - time.monotonic()
                poller = select.poll()
                poller.register(self.sock.fileno(), select.POLLOUT)
                if left <= 0 or not poller.poll(left * 1000):
                    raise ConnectionLost(f"the relay {self.url} stopped reading") from None
                continue
            except (OSError, ssl.SSLError) as exc:
                raise ConnectionLost(f"sending to the relay {self.url} failed: {exc}") from None
            view = view[sent:]

    def _wait(self, deadline: float) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(left * 1000))
