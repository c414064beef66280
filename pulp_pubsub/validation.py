"""The channel-name and payload rules shared by every backend.

Names are checked once, here, so a name that works on one backend works on
all of them: 1 to 63 UTF-8 bytes (PostgreSQL's identifier limit, beyond which
it silently truncates and two channels would collide), and none of the
characters that are whitespace, control or format codes, quotes, ``;``,
``\\`` or the subject wildcards ``*`` and ``>`` of NATS.
"""

from __future__ import annotations

import unicodedata

from .exceptions import InvalidChannel, InvalidPayload

MAX_CHANNEL_BYTES = 63
FORBIDDEN_CHARACTERS = frozenset("'\"`;\\*>")
_FAST_CHECKED = (" ", *sorted(FORBIDDEN_CHARACTERS))


def _bad_character(name: str) -> str | None:
    if name.isascii() and name.isprintable():
        # The usual name, checked without a Unicode lookup per character (every
        # publish checks its channel): printable ASCII has no control, format or
        # unassigned character, and its only whitespace is the space.
        found = [i for i in map(name.find, _FAST_CHECKED) if i >= 0]
        if not found:
            return None
        first = name[min(found)]  # the first bad character, as the full check reports
        return "whitespace" if first == " " else f"the character {first!r}"
    for char in name:
        if char.isspace():
            return "whitespace"
        if unicodedata.category(char) in {"Cc", "Cf", "Cs", "Co", "Cn"}:
            return f"the control or unassigned character U+{ord(char):04X}"
        if char in FORBIDDEN_CHARACTERS:
            return f"the character {char!r}"
    return None


def validate_channel(name: object, *, what: str = "channel name") -> str:
    if not isinstance(name, str):
        raise InvalidChannel(f"A {what} must be a str, not {type(name).__name__}.")
    if not name:
        raise InvalidChannel(f"A {what} cannot be empty.")
    problem = _bad_character(name)
    if problem:
        raise InvalidChannel(f"The {what} {name!r} contains {problem}.")
    size = len(name.encode("utf-8"))
    if size > MAX_CHANNEL_BYTES:
        raise InvalidChannel(
            f"The {what} {name[:20]!r}... is {size} bytes long; "
            f"the limit is {MAX_CHANNEL_BYTES} bytes (UTF-8)."
        )
    return name


def validate_prefix(prefix: object) -> str:
    if prefix == "":
        return ""
    return validate_channel(prefix, what="PUBSUB_CHANNEL_PREFIX")


def encode_payload(payload: object, *, limit: int | None, allow_nul: bool, backend: str) -> bytes:
    """Return the UTF-8 bytes of ``payload`` or refuse it before anything is sent."""
    if not isinstance(payload, str):
        raise InvalidPayload(f"A payload must be a str, not {type(payload).__name__}.")
    try:
        data = payload.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPayload(f"The payload cannot be encoded as UTF-8: {exc.reason}.") from exc
    if not allow_nul and "\x00" in payload:
        raise InvalidPayload(f"The {backend} backend cannot carry a NUL character in a payload.")
    if limit is not None and len(data) > limit:
        raise InvalidPayload(
            f"The payload is {len(data)} bytes; the {backend} backend's limit is {limit} bytes."
        )
    return data


def check_payload_fits(
    payload: object, *, limit: int | None, allow_nul: bool, backend: str
) -> None:
    """Refuse ``payload`` as :func:`encode_payload` does, without encoding the usual one.

    Every publish checks its payload. An ASCII ``str`` (the usual wake-up, task id or
    timestamp) is as many UTF-8 bytes as characters and cannot fail to encode, so it is
    measured without making the bytes; anything else takes the full check.
    """
    if (
        type(payload) is str
        and payload.isascii()
        and (limit is None or len(payload) <= limit)
        and (allow_nul or "\x00" not in payload)
    ):
        return
    encode_payload(payload, limit=limit, allow_nul=allow_nul, backend=backend)


#: Most receivers one targeted message may name (each is one queue entry on the server).
MAX_RECEIVERS = 1000
_GROUP_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def validate_group(group: object) -> str:
    """A targeted-delivery group: 1 to 63 ASCII letters, digits, ``_``, ``.`` or ``-``.

    Narrower than a channel name on purpose: a backend builds its queue's
    name from the channel and the group with a separator no group contains.
    """
    if not isinstance(group, str):
        raise InvalidChannel(f"A group name must be a str, not {type(group).__name__}.")
    if not 1 <= len(group) <= MAX_CHANNEL_BYTES or not set(group) <= _GROUP_CHARACTERS:
        raise InvalidChannel(
            f"The group name {group[:70]!r} must be 1 to {MAX_CHANNEL_BYTES} ASCII letters, "
            "digits, '_', '.' or '-'."
        )
    return group


def validate_receivers(receivers: object) -> int:
    if isinstance(receivers, bool) or not isinstance(receivers, int):
        raise InvalidPayload(f"receivers must be an int, not {type(receivers).__name__}.")
    if not 1 <= receivers <= MAX_RECEIVERS:
        raise InvalidPayload(f"receivers must be from 1 to {MAX_RECEIVERS}, not {receivers}.")
    return receivers
