"""The demo app's handler module, found by autodiscovery at start-up."""

from pulp_pubsub import registry

DEMO = "demo_events"

registry.declare(DEMO, "Free-form messages for the demo and the commands' tests.")
