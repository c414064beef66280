"""Reading the pub/sub statements pulpcore sends to PostgreSQL.

pulpcore has no hook for its messaging: it runs ``LISTEN``, ``UNLISTEN``,
``SELECT pg_notify(...)`` and ``NOTIFY`` as SQL text on a few cursors. The
integration hands those cursors out itself and translates exactly these
statements into the layer's calls; anything else is ordinary SQL and goes to
the database unchanged. A statement that *looks* like pub/sub but does not
parse raises, because guessing would silently lose a wake-up.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ...exceptions import PubSubError

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_LISTEN = re.compile(rf"\s*(UNLISTEN|LISTEN)\s+({_IDENT})\s*;?\s*", re.IGNORECASE)
_NOTIFY = re.compile(
    rf"\s*NOTIFY\s+({_IDENT})\s*(?:,\s*'((?:[^']|'')*)')?\s*;?\s*", re.IGNORECASE | re.DOTALL
)
_PG_NOTIFY = re.compile(
    r"\s*SELECT\s+pg_notify\s*\(\s*(?:'((?:[^']|'')*)'|(%s))\s*,\s*(%s|'((?:[^']|'')*)')\s*\)"
    r"\s*;?\s*",
    re.IGNORECASE | re.DOTALL,
)
#: Words that mark a statement as pub/sub even when the patterns above miss it.
_SUSPECT = re.compile(r"\b(?:UN)?LISTEN\b|\bNOTIFY\b|\bpg_notify\b", re.IGNORECASE)

Verb = Literal["listen", "unlisten", "notify"]


class UntranslatableStatement(PubSubError):
    """pulpcore sent pub/sub SQL that the integration cannot translate."""


@dataclass(frozen=True)
class Statement:
    verb: Verb
    channel: str
    payload: str = ""


def _identifier(text: str) -> str:
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()  # PostgreSQL folds unquoted names, and so must we


def _literal(text: str) -> str:
    return text.replace("''", "'")


def parse(sql: object, params: Sequence[Any] | None = None) -> Statement | None:
    """The pub/sub statement in ``sql``, or None for any other SQL.

    ``params`` are the cursor's positional parameters (``%s`` placeholders).
    """
    if not isinstance(sql, str):
        sql = bytes(sql).decode() if isinstance(sql, bytes | bytearray) else str(sql)
    if not _SUSPECT.search(sql):
        return None
    if match := _LISTEN.fullmatch(sql):
        verb: Verb = "unlisten" if match[1].upper() == "UNLISTEN" else "listen"
        if params:
            raise UntranslatableStatement(f"{match[1]} takes no parameters: {sql!r}")
        return Statement(verb, _identifier(match[2]))
    if match := _NOTIFY.fullmatch(sql):
        if params:
            raise UntranslatableStatement(f"NOTIFY takes no parameters: {sql!r}")
        return Statement("notify", _identifier(match[1]), _literal(match[2] or ""))
    if match := _PG_NOTIFY.fullmatch(sql):
        values = list(params or ())
        wanted = (match[2] is not None) + (match[3] == "%s")
        if len(values) != wanted:
            raise UntranslatableStatement(
                f"pg_notify with {wanted} placeholder(s) got {len(values)} parameter(s): {sql!r}"
            )
        channel = _literal(match[1]) if match[1] is not None else str(values.pop(0))
        payload = _literal(match[4] or "") if match[3] != "%s" else values.pop(0)
        if not isinstance(payload, str):
            raise UntranslatableStatement(f"pg_notify payload is not text: {payload!r}")
        return Statement("notify", channel, payload)
    raise UntranslatableStatement(
        f"pulpcore sent pub/sub SQL that pulp-pubsub cannot translate: {sql[:200]!r}. "
        "This pulpcore version changed how it signals its workers; set "
        "PUBSUB_PULPCORE_INTEGRATION = False until pulp-pubsub supports it."
    )
