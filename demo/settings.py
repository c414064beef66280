"""Settings of the small project behind ``manage.py``: the demo, the commands and the tests.

Every ``PUBSUB_*`` setting comes from the environment (django-environ), and
the backend defaults to ``memory`` so the demo runs on a machine with no
server. A Django project of your own that sets nothing gets ``postgres``.
"""

import os
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

SECRET_KEY = env("DJANGO_SECRET_KEY", default="pulp-pubsub-demo-not-secret")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS: list[str] = []
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "pulp_pubsub",
    # the benchmark, chaos and demo commands (a checkout only: not in the wheel)
    "pulp_pubsub_tools",
    "demo",
]

DATABASES = {
    # SQLite keeps the demo and the unit tests free of any server.
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'demo.sqlite3'}"),
    # The PostgreSQL backend publishes on a Django connection; its tests use this one.
    "postgres": env.db(
        "PUBSUB_TEST_DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/postgres"
    ),
}
# A name of the run's own, so test runs side by side never drop each other's database.
DATABASES["postgres"]["TEST"] = {
    "NAME": env("PUBSUB_TEST_DATABASE_NAME", default=f"test_pulp_pubsub_{os.getpid()}"),
    "DEPENDENCIES": [],
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

PUBSUB_BACKEND = env("PUBSUB_BACKEND", default="memory")
PUBSUB_URL = env("PUBSUB_URL", default=None)
PUBSUB_OPTIONS = env.json("PUBSUB_OPTIONS", default={})
PUBSUB_CHANNEL_PREFIX = env("PUBSUB_CHANNEL_PREFIX", default="")
PUBSUB_PUBLISH_ON_COMMIT = env.bool("PUBSUB_PUBLISH_ON_COMMIT", default=True)
# The relay backend's shared token, on the relays and their clients alike.
PUBSUB_RELAY_TOKEN = env("PUBSUB_RELAY_TOKEN", default=None)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "pulp_pubsub": {
            "handlers": ["console"],
            "level": env("PUBSUB_LOG_LEVEL", default="WARNING"),
        }
    },
}
