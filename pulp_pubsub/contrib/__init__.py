"""Integrations of pulp-pubsub with programs that do not know about it."""
