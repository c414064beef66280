"""The after-commit sender's batching, on its own (no server: the batches are recorded)."""

import threading

from pulp_pubsub.backends.aftercommit import AfterCommitSender, Deferred


def item(n: int) -> Deferred:
    return Deferred("chan", str(n), None, 1)


def recorder() -> tuple[list[list[str]], threading.Event, object]:
    batches: list[list[str]] = []
    first_sent = threading.Event()

    def send_batch(batch: list[Deferred]) -> None:
        batches.append([d.payload for d in batch])
        first_sent.set()

    return batches, first_sent, send_batch


def test_a_lone_publish_goes_at_once_and_those_right_after_it_go_together():
    batches, first_sent, send_batch = recorder()
    # An interval far longer than the few puts below take, so they all land in it.
    sender = AfterCommitSender(send_batch, flush_timeout=30, send_interval=2.0)
    try:
        sender.put(item(0))
        assert first_sent.wait(30)  # not held back: nothing was sent before it
        for n in range(1, 6):
            sender.put(item(n))
        assert sender.flush()
        assert batches == [["0"], ["1", "2", "3", "4", "5"]]
    finally:
        sender.close()


def test_without_an_interval_the_order_is_kept_and_nothing_is_lost():
    batches, _, send_batch = recorder()
    sender = AfterCommitSender(send_batch, flush_timeout=30, send_interval=0.0)
    try:
        for n in range(200):
            sender.put(item(n))
        assert sender.flush()
        assert [p for batch in batches for p in batch] == [str(n) for n in range(200)]
    finally:
        sender.close()
