"""``pubsub_bench``: every backend side by side with its bare client and with Pulp's polling.

Modules, one concern each:

- :mod:`.servers`   throwaway PostgreSQL/Redis, or checks on the servers given
- :mod:`.agents`    forked (or, for the in-process memory backend, threaded) agents
- :mod:`.roles`     what an agent does: subscribe, echo, ping, publish, write, poll
- :mod:`.raw`       the bare client libraries, for the layer/raw ratio
- :mod:`.adapters`  one small adapter per backend: how to point the layer at a server
- :mod:`.monitor`   the database-side counters (sessions, transactions)
- :mod:`.scenarios` the measurements; :mod:`.runner` puts them in order
- :mod:`.fleet`     the fleet scenario, its agents (:mod:`.fleet_roles`) and report
  (:mod:`.fleet_report`)
- :mod:`.report`, :mod:`.plot`, :mod:`.progress`  what a person reads
- :mod:`.permessage` one process's work per message, layer or bare, for callgrind and cProfile
"""

from __future__ import annotations


class BenchError(Exception):
    """A benchmark could not run; the command turns it into a ``CommandError``."""


#: Scenario names in the order the issue lists them (and the report shows them).
SCENARIOS = ("latency", "fanout", "targeted", "connections", "idle", "commit", "poll")
#: Scenarios run only when named, each on its own: ``fleet`` grows a fleet through
#: several sizes per backend (see :mod:`.fleet`).
ALONE = ("fleet",)
