from __future__ import annotations

from django.apps import AppConfig


class PulpPubSubConfig(AppConfig):
    name = "pulp_pubsub"
    label = "pulp_pubsub"
    verbose_name = "Pulp pub/sub"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .registry import registry

        registry.autodiscover()

        # In a Pulp process: carry pulpcore's worker messages (a no-op elsewhere).
        from .contrib.pulpcore import setup as setup_pulpcore

        setup_pulpcore()
