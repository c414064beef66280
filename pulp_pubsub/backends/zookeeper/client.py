"""kazoo clients for the ZooKeeper backend, and what kazoo does not offer.

kazoo has no call for a container node (ZooKeeper 3.5's ``createContainer``, a node the
server removes once its last child is gone), so :func:`create_container` sends that request
itself. Channels are containers: a subscriber's private channel (its liveness probe's, an
introspection reply's) holds only ephemeral messages, and disappears with its session
instead of piling up.

History trimming (:func:`trim`) is the publishers' job; see the backend's docstring for the
rule and the guarantee it gives.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError, RolledBackError
from kazoo.protocol.serialization import Create2
from kazoo.retry import KazooRetry

from .names import Where, sequence

logger = logging.getLogger(__name__)

#: ZooKeeper's ``CreateMode.CONTAINER`` flag, sent with opcode 19 (``createContainer``).
CONTAINER_FLAG = 4
#: Deletes per multi-op: a few dozen KiB of request, well under jute.maxbuffer.
TRIM_BATCH = 500


class _Quieter(logging.LoggerAdapter[logging.Logger]):
    """kazoo's log, its warnings as INFO: each connection it loses is the listener's to report
    (once, with what it does about it), and a publish that fails raises."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        self.logger.log(min(level, logging.INFO), msg, *args, **kwargs)


KAZOO_LOGGER = _Quieter(logging.getLogger("pulp_pubsub.backends.zookeeper.kazoo"), {})


class CreateContainer(Create2):
    type = 19


@dataclass(frozen=True)
class Connect:
    """Everything a kazoo client of this install is built from (no secret in ``repr()``)."""

    where: Where
    session_timeout: float
    ca_file: str
    cert_file: str
    key_file: str

    def client(self, retry_forever: bool) -> KazooClient:
        kwargs: dict[str, Any] = {}
        if self.where.tls:
            kwargs.update(
                use_ssl=True,
                ca=self.ca_file or None,
                certfile=self.cert_file or None,
                keyfile=self.key_file or None,
                verify_certs=True,
            )
        if self.where.username is not None:
            kwargs["auth_data"] = [("digest", f"{self.where.username}:{self.where.password}")]
        # A subscriber's client tries each member once per start and no more: the shared
        # listener reconnects (with its backoff) and replays. A publisher's keeps trying
        # in the background, so the next publish finds it connected to a live member.
        retry = KazooRetry(max_tries=-1 if retry_forever else 0, delay=0.05, max_delay=1.0)
        return KazooClient(
            hosts=self.where.connect_string,
            timeout=self.session_timeout,
            connection_retry=retry,
            logger=KAZOO_LOGGER,
            **kwargs,
        )


def stop(client: KazooClient, wait: float) -> None:
    """Stop and close ``client``, waiting for it at most ``wait`` seconds.

    kazoo's own stop waits for its connection thread, and a thread in the middle of a
    connect handshake with a member that took the TCP connection and says nothing (frozen,
    or a proxy in front of one that is restarting) gives up only after the whole session
    timeout: 30 s by default, however short ``connect_timeout`` is. Past ``wait`` the
    client finishes stopping on a thread of its own, so neither a reconnecting subscriber
    nor a publisher replacing its session waits for it.
    """
    closing = threading.Thread(
        target=_stop_now, args=(client,), name="pubsub-zookeeper-stop", daemon=True
    )
    closing.start()
    closing.join(wait)


def _stop_now(client: KazooClient) -> None:
    try:
        client.stop()
        client.close()
    except Exception:
        logger.debug("Closing a ZooKeeper session failed", exc_info=True)


def create_container(client: KazooClient, path: str, acl: Sequence[Any], timeout: float) -> None:
    """Make ``path`` a container node (its parents plain ones) unless it exists."""
    parent = path.rsplit("/", 1)[0]
    for attempt in range(2):
        result = client.handler.async_result()
        client._call(CreateContainer(path, b"", list(acl), CONTAINER_FLAG), result)
        try:
            result.get(timeout=timeout)
            return
        except NodeExistsError:
            return
        except NoNodeError:
            if attempt or not parent:
                raise
            client.ensure_path(parent, acl=list(acl))


def parse_mark(data: bytes) -> int:
    """The channel node's data: the highest sequence trimming has deleted (-1: none)."""
    try:
        return int(data) if data else -1
    except ValueError:
        return -1


def trim(
    client: KazooClient, path: str, max_count: int, max_age_ms: int, now_ms: int, timeout: float
) -> int:
    """Delete a channel's messages beyond ``max_count`` or older than ``max_age_ms``.

    The newest message always stays: it holds the channel's place, so sequences go on and
    subscribers' positions stay meaningful. Deletes go in one multi-op with the channel
    node's new mark (the highest sequence deleted), written with the version read, so
    two publishers trimming at once cannot move the mark backwards. Returns how many
    messages went.
    """
    data, stat = client.get(path)
    mark = parse_mark(data)
    names = sorted(
        (seq, name) for name in client.get_children(path) if (seq := sequence(name)) is not None
    )
    if len(names) <= 1:
        return 0
    doomed = max(0, len(names) - max_count)
    # Sequence order is creation order, so ages fall along the list: the first message
    # young enough is found by bisection over its older part.
    low, high = doomed, len(names) - 1
    while low < high:
        middle = (low + high) // 2
        node = client.exists(f"{path}/{names[middle][1]}")
        if node is not None and now_ms - node.ctime <= max_age_ms:
            high = middle
        else:
            low = middle + 1
    doomed = min(max(doomed, low), len(names) - 1)
    gone = 0
    version = stat.version
    for start in range(0, doomed, TRIM_BATCH):
        batch = names[start : min(start + TRIM_BATCH, doomed)]
        mark = max(mark, batch[-1][0])
        transaction = client.transaction()
        transaction.set_data(path, str(mark).encode(), version=version)
        for _, name in batch:
            transaction.delete(f"{path}/{name}")
        results = transaction.commit_async().get(timeout=timeout)
        if any(isinstance(r, (BadVersionError, NoNodeError, RolledBackError)) for r in results):
            return gone  # another publisher is trimming this channel
        for result in results:
            if isinstance(result, Exception):
                raise result
        version += 1
        gone += len(batch)
    return gone
