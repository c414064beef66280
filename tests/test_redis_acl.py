"""The smallest Redis ACL a fleet needs, tried on a real redis-server.

The ACL line is read from docs/security.md, so the page and the test cannot
drift apart. A user with it works end to end (publish, subscribe, the
liveness probe, introspection, the commands), and the server's ACL LOG shows
that the layer never even tried a command outside it. A user limited to
another prefix gets an error that names the ACL, on every path.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.core.management import CommandError, call_command
from django.test import override_settings

from pulp_pubsub import get_backend
from pulp_pubsub.backends.redis.groups import CONSUMER_GROUP
from pulp_pubsub.exceptions import PublishError
from pulp_pubsub.management.inspect import gather
from pulp_pubsub_tools.testing import RedisServer

from .reliability_util import Inbox
from .util import wait_until

pytestmark = [pytest.mark.backend, pytest.mark.servers]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "fleet-Secret-7"
ADMIN_PASSWORD = "admin-Secret-9"
TARGETED = "pulp-targeted"
OPTIONS = {"probe_interval": 0.3, "probe_timeout": 2.0, "connect_timeout": 2.0}


def documented_acl(user: str = "pulp") -> str:
    with open(os.path.join(ROOT, "docs", "security.md")) as page:
        [line] = [line.strip() for line in page if line.startswith(f"user {user} on ")]
    return line


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    acl = [
        f"user default on >{ADMIN_PASSWORD} ~* &* +@all",
        documented_acl().replace(">CHANGE-ME", f">{PASSWORD}"),
        documented_acl(TARGETED).replace(">CHANGE-ME", f">{PASSWORD}"),
    ]
    with RedisServer(acl_lines=acl) as running:
        yield running


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(
        host=server.host, port=server.port, password=ADMIN_PASSWORD, decode_responses=True
    )


def settings_for(
    server: RedisServer, prefix: str, user: str = "pulp", options: dict[str, Any] = OPTIONS
) -> dict[str, Any]:
    return {
        "PUBSUB_BACKEND": "redis",
        "PUBSUB_URL": f"redis://{user}:{PASSWORD}@{server.host}:{server.port}/0",
        "PUBSUB_CHANNEL_PREFIX": prefix,
        "PUBSUB_OPTIONS": options,
    }


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_the_documented_acl_is_the_least_the_fleet_needs():
    acl = documented_acl()
    assert "&site1.*" in acl and "resetchannels" in acl and "-@all" in acl
    assert "~" not in acl  # no keys
    granted = re.findall(r"\+(\S+)", acl)
    assert granted == ["publish", "subscribe", "unsubscribe", "pubsub|numsub"]


def test_a_user_with_the_documented_acl_works_end_to_end(server):
    admin(server).acl_log_reset()
    with override_settings(**settings_for(server, "site1.")):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("demo_events", inbox)
            assert sub.wait_connected(10), sub.last_error
            backend.publish("demo_events", "allowed")
            inbox.wait(lambda messages: [m.payload for m in messages] == ["allowed"])
            # The liveness probe, on a channel under the prefix.
            wait_until(lambda: sub.probe_rtt is not None, what="a liveness probe")
            [answer] = gather(backend, timeout=10, expect=1)
            assert answer.channels == ("demo_events",)
            pong = run("pubsub_ping", "--count=2", "--expect-subscribers=1")
            assert "redis: 1 live subscriber(s) answered" in pong
            listing = run("pubsub_channels", "--live", "--timeout=1")
            assert "demo_events  subscribers: 1  live: 1" in listing
            assert sub.stats["reconnects"] == 0, sub.last_error
        backend.close()
    # Nothing the layer sent was refused, not even quietly (a client library's extras).
    assert admin(server).acl_log() == []


def test_the_documented_targeted_acl_carries_targeted_delivery(server):
    """The second documented line: a Pulp fleet's targeted wake-ups, and nothing refused."""
    admin(server).acl_log_reset()
    with override_settings(**settings_for(server, "site1.", user=TARGETED)):
        backend = get_backend()
        with backend.subscriber(manual_ack=True) as holder, backend.subscriber() as other:
            held, inbox = Inbox(holder), Inbox(other)
            holder.subscribe("demo_events", held, group="workers")
            assert holder.wait_connected(10), holder.last_error
            backend.publish("demo_events", "one of you", group="workers")
            held.wait(lambda messages: [m.payload for m in messages] == ["one of you"])
            other.subscribe("demo_events", inbox, group="workers")
            assert other.wait_connected(10), other.last_error
            # Busy: the held message is given back and handed to the other member.
            holder.set_accepting("demo_events", "workers", False)
            inbox.wait(lambda messages: [m.payload for m in messages] == ["one of you"])
            for sub in (holder, other):
                assert sub.stats["reconnects"] == 0, sub.last_error
        backend.close()
    assert admin(server).acl_log() == []


TIDY_COMMANDS = " +xinfo|consumers +xgroup|delconsumer"


def ghost(server: RedisServer, key: str) -> None:
    """A consumer as a SIGKILLed member leaves it: in the group, holding nothing, idle."""
    client = admin(server)
    client.xgroup_create(key, CONSUMER_GROUP, "$", mkstream=True)
    entry = client.xadd(key, {"p": "done"})
    client.xreadgroup(CONSUMER_GROUP, "ghost", {key: ">"}, count=1)
    client.xack(key, CONSUMER_GROUP, entry)
    wait_until(
        lambda: all(c["idle"] >= 500 for c in client.xinfo_consumers(key, CONSUMER_GROUP)),
        what="the ghost to be idle",
    )


def consumer_names(server: RedisServer, key: str) -> set[str]:
    return {c["name"] for c in admin(server).xinfo_consumers(key, CONSUMER_GROUP)}


def test_the_documented_targeted_acl_lets_members_remove_consumers_long_gone(server):
    assert TIDY_COMMANDS in documented_acl(TARGETED)
    admin(server).acl_log_reset()
    ghost(server, "site1.tidy#workers")
    options = {**OPTIONS, "consumer_expiry": 0.5, "claim_timeout": 60}
    with override_settings(**settings_for(server, "site1.", user=TARGETED, options=options)):
        backend = get_backend()
        with backend.subscriber() as sub:
            sub.subscribe("tidy", lambda message: None, group="workers")
            assert sub.wait_connected(10), sub.last_error
            wait_until(lambda: "ghost" not in consumer_names(server, "site1.tidy#workers"))
        backend.close()
    assert admin(server).acl_log() == []


def test_a_targeted_acl_without_the_consumer_commands_only_leaves_them(server, caplog):
    """An ACL written before the consumer commands: a WARNING, and delivery as before."""
    user = "pulp-targeted-old"
    line = documented_acl(TARGETED).replace(TARGETED, user).replace(TIDY_COMMANDS, "")
    admin(server).execute_command("ACL", "SETUSER", *line.split()[1:])
    admin(server).execute_command("ACL", "SETUSER", user, f">{PASSWORD}")
    ghost(server, "site1.old#workers")
    options = {**OPTIONS, "consumer_expiry": 0.5, "claim_timeout": 60}
    with override_settings(**settings_for(server, "site1.", user=user, options=options)):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("old", inbox, group="workers")
            assert sub.wait_connected(10), sub.last_error
            wait_until(lambda: "stale consumers" in caplog.text, what="the warning")
            backend.publish("old", "still delivered", group="workers")
            inbox.wait(lambda messages: [m.payload for m in messages] == ["still delivered"])
            assert sub.stats["reconnects"] == 0, sub.last_error
        backend.close()
    assert "ghost" in consumer_names(server, "site1.old#workers")
    assert "+xinfo|consumers +xgroup|delconsumer" in caplog.text
    assert PASSWORD not in caplog.text


def test_a_user_limited_to_another_prefix_gets_an_error_naming_the_acl(server, caplog):
    with override_settings(**settings_for(server, "site2.")):
        backend = get_backend()
        with pytest.raises(PublishError, match=r"NoPermissionError.*ACL user needs") as caught:
            backend.publish("demo_events", "x")
        assert "&site2.*" in str(caught.value)
        with backend.subscriber() as sub:
            sub.subscribe("demo_events", lambda m: None)
            wait_until(lambda: sub.last_error, what="the subscriber's error")
            assert not sub.connected
            assert "Redis refused SUBSCRIBE" in str(sub.last_error)
            assert "ACL user needs" in str(sub.last_error)
        for args in [
            ("pubsub_publish", "demo_events", "x"),
            ("pubsub_ping",),
            ("pubsub_channels", "--live", "--timeout=1"),
        ]:
            with pytest.raises(CommandError, match=r"NoPermissionError.*ACL user needs"):
                run(*args)
        backend.close()
    assert "NoPermissionError" in caplog.text
    assert PASSWORD not in caplog.text
