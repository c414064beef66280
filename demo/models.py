"""A table for the tests and the benchmark to write in a transaction that also publishes."""

from django.db import models


class Event(models.Model):
    note = models.CharField(max_length=200)
