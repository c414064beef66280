"""NATS server URLs and the channel-to-subject mapping of the nats backend.

A channel is one subject token: ``%``, ``.`` and ``$`` are written ``%25``, ``%2E`` and
``%24``, so no name can add a token, leave one empty or reach a ``$``-system subject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

from ...conf import Secret, hide_password

SCHEMES = {"nats": False, "tls": True}
#: The leading token (after the prefix) of targeted-delivery subjects:
#: ``<prefix>._work.<channel>.<group>``. Three tokens where a broadcast has one, so a
#: targeted message never reaches a broadcast subscriber or the replay stream.
WORK_TOKEN = "_work"
#: The leading token (after the prefix) of the subjects the replay stream republishes each
#: stored broadcast to: ``<prefix>._live.<channel>``, two tokens, so no broadcast's subject
#: (one token) nor any targeted one (three) is among them.
LIVE_TOKEN = "_live"
#: A header of a plain NATS message on a live subject, sent by a publisher whose publish the
#: stream has not stored within a retry interval (no leader), so that its subscribers need
#: not wait out the election (see .storing). With :data:`MSG_ID` too, the body is the
#: message, delivered at once; without it (a targeted publish, or an older release), the
#: subscribers resync the channel.
UNSTORED_HEADER = "Pubsub-Unstored"
#: The header JetStream deduplicates on, within the stream's duplicate window; every copy
#: of a message (its tries, what the stream stores and republishes, a notice) carries it.
MSG_ID = "Nats-Msg-Id"
_ESCAPES = {"%": "%25", ".": "%2E", "$": "%24"}
_UNESCAPE = re.compile(r"%(25|2E|24)")


def escape_token(name: str) -> str:
    """A channel name as one subject token (see the module docstring)."""
    return "".join(_ESCAPES.get(char, char) for char in name)


def unescape_token(token: str) -> str | None:
    """Undo :func:`escape_token`; None for a token it cannot have made."""
    name = _UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), token)
    return name if escape_token(name) == token else None


def work_subject(root: str, channel_token: str, group: str) -> str:
    """The subject of a targeted publish to ``group`` (``root`` is the prefix token and a dot)."""
    return f"{root}{WORK_TOKEN}.{channel_token}.{escape_token(group)}"


def hide_credentials(url: str) -> str:
    """A server URL fit for output: a password or a token (bare user info) is masked."""
    return str(hide_password(url))


@dataclass(frozen=True)
class _Server:
    url: str  # without credentials: nats-py would use them unquoted
    shown: str
    tls: bool
    credentials: tuple[str, str | None] | None  # (user, password) or (token, None)


def parse_servers(value: str) -> list[_Server]:
    """``nats://[user:password@|token@]host[:port]`` or ``tls://...``, comma-separated."""
    servers = []
    for item in value.split(","):
        item = item.strip()
        shown = hide_credentials(item)
        if not item:
            raise ImproperlyConfigured(
                f"The NATS PUBSUB_URL {hide_credentials(value)} has an empty server "
                "in its comma-separated list."
            )
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError as exc:
            raise ImproperlyConfigured(f"The NATS server URL {shown} is not valid: {exc}") from None
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ImproperlyConfigured(
                f"The NATS server URL {shown} is not valid: expected "
                "nats://[user:password@]host[:port] or tls://..., comma-separated for a cluster."
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ImproperlyConfigured(
                f"The NATS server URL {shown} has a path or query; NATS takes none "
                "(quote '/', '@', ':' in a password; TLS files go in PUBSUB_OPTIONS)."
            )
        userinfo, _, hostport = parts.netloc.rpartition("@")
        credentials: tuple[str, str | None] | None = None
        if userinfo:
            user, colon, password = userinfo.partition(":")
            if colon:
                credentials = (unquote(user), Secret(unquote(password)))
            else:  # a bare user info is a token
                credentials = (Secret(unquote(user)), None)
        host = hostport if port else f"{hostport}:4222"
        url = f"{parts.scheme}://{host}"
        servers.append(_Server(url, shown, SCHEMES[parts.scheme], credentials))
    if len({server.credentials for server in servers}) > 1:
        raise ImproperlyConfigured(
            "The servers in the NATS PUBSUB_URL carry different credentials; give them once "
            "(in one URL, or in the 'user'/'password'/'token' options)."
        )
    return servers
