"""The end-to-end run: real pulpcore workers on pulp-pubsub, beside stock ones.

``python -m pulp_pubsub_tools.e2e`` (from a checkout: it starts its
throwaway servers with :mod:`pulp_pubsub_tools.testing`) makes or reuses a virtualenv with
pulpcore from PyPI, migrates a throwaway database, runs the scenarios of
:mod:`.scenarios` and prints their figures. :mod:`.agent` is the part that
runs inside Pulp (``pulpcore.app.settings``), in that virtualenv.
"""
