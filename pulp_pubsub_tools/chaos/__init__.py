"""A chaos run: break the server and the network on purpose, then check nothing was lost silently.

A publisher sends sequence-numbered messages at a steady rate on a few channels to S subscriber
processes, while an injector, at random intervals, restarts the server (gracefully and with
``kill -9``), kills the subscribers' connections from the server side, freezes the server
(``SIGSTOP`` past the probe interval), and cuts, stalls or slows a loopback TCP proxy that sits
between the clients and the server. Afterwards :mod:`pulp_pubsub_tools.chaos.invariant` checks, for
every subscriber, the promise the design makes.

The invariant, precisely. Every time below is ``time.time()`` on the one machine the run uses.

- A publish of sequence number *s* on channel *c* **succeeded** when ``publish()`` returned
  without raising; ``t_call(s)`` is the moment just before it was called. A publish that raised
  (``PublishError`` after ``publish_timeout``) promised nothing and is not checked, though it
  may still have reached the server.
- Subscriber *P* **was subscribed** to *c* from the moment its ``subscribe(c, ...)`` returned
  until it began ``close()``, which is after the publisher stopped, so only the start matters.
- For every *P* and every succeeded *s* with ``t_call(s)`` after *P* subscribed, **either** *P*
  received *s* (a message on *c* with payload ``str(s)``), **or** *P* received a message with
  ``resync=True`` on *c* whose window covers *s*. A resync carries ``since``, the last moment
  *P* had proof that it heard on the connection it lost (a read that brought something, a
  probe's answer, the confirmed LISTEN/SUBSCRIBE), and its ``received_at``; it covers *s* when
  ``publish()`` of *s* **returned** after ``since - margin`` and was **called** before
  ``received_at``. A resync is queued only once the new connection's LISTEN/SUBSCRIBE has been
  confirmed, so a message that reached the server after that moment must arrive; and one that
  the server had before *P*'s last proof of hearing (less the margin, for a message accepted
  but not yet passed on) must have arrived already. Any later resync is not enough.
- In a **fault-free stretch** (from a fault's recovery to the next fault, and the final phase
  of the run) every succeeded message must arrive, and no resync may.

Around the invariant the run also counts, and a run passes only when each is 0:

- **stuck** subscribers: those that, once the last fault had healed, did not receive any message
  published after it within the settle time, or whose process died or hung in ``close()``;
- **unrecovered** faults: a fault after which some subscriber received no message published
  after it healed within the recovery timeout (the run goes on; the fault is reported);
- **hung** publishes: a ``publish()`` that took longer than ``publish_timeout`` plus one second
  of scheduling slack, and any publish that raised something other than a ``PubSubError``;
- **leaks**: a line of any output or log of the run (the subscribers' logs, the publisher's
  errors, the orchestrator's log records) that contains the server's password.

The **recovery time** of a fault is the time from its healing (the server answering again, the
proxy resumed, or at once for a cut or a server-side kill) until the last subscriber received a
message published after that moment. It includes the publisher's own recovery and its cadence
(one message every ``1/rate`` s).

Entry points: :func:`pulp_pubsub_tools.chaos.engine.run` and ``manage.py pubsub_chaos``.
"""

from __future__ import annotations

from .engine import ChaosConfig, ChaosReport, run

__all__ = ["ChaosConfig", "ChaosReport", "run"]
