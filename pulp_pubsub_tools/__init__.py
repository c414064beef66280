"""What measures and tests pulp-pubsub, kept out of the runtime and out of the wheel.

The benchmark, the chaos engine, the throwaway-server launchers and the pulpcore
end-to-end harness live here, with the ``pubsub_bench``, ``pubsub_chaos`` and
``pubsub_demo`` commands. It runs from a checkout (``pip install -e ".[test]"``,
then ``python manage.py ...`` from the checkout's root), where it is a Django app
of the project's own settings. A Pulp install gets ``pulp_pubsub`` alone.
"""
