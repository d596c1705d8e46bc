"""The decode's thread window (issue 15, 2-core decode speed-up): with `ahead`, a thread that finishes
takes the next item while the caller is still busy with a result, yet no more items run at once
than there are threads, their sizes stay within the budget, and results keep their order."""
from __future__ import annotations

import threading
import time

import pytest

from cdlcodec.codec import ordered_map


def test_an_item_waits_ahead_so_a_thread_never_waits_for_the_caller():
    done = set()

    def work(item):
        done.add(item)
        return item

    seen = []
    for value in ordered_map(work, range(6), 2, ahead=1):
        if value == 0:
            time.sleep(0.3)  # the caller writes a result out; the threads go on meanwhile
            assert 2 in done  # submitted before result 0 was handed over
        seen.append(value)
    assert seen == list(range(6))


def test_without_ahead_the_next_item_waits_for_the_caller():
    done = set()

    def work(item):
        done.add(item)
        return item

    for value in ordered_map(work, range(4), 2):
        if value == 0:
            time.sleep(0.1)
            assert 2 not in done


@pytest.mark.parametrize("threads,ahead,budget,most_running", [(2, 1, 100, 2), (3, 1, 2, 2), (2, 2, 1, 1)])
def test_running_items_stay_within_threads_and_budget(threads, ahead, budget, most_running):
    lock, running, most, submitted = threading.Lock(), [0], [0], []

    def prepare(item):
        submitted.append(item)
        return item

    def work(item):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return item * 10

    results = []
    for value in ordered_map(work, range(12), threads, prepare=prepare, size=lambda item: 1, budget=budget,
                             ahead=ahead):
        assert len(submitted) - len(results) <= threads + ahead  # never more than that in hand
        results.append(value)
    assert results == [10 * i for i in range(12)]
    assert most[0] <= most_running


def test_the_first_failure_in_order_is_reported_with_items_ahead():
    def work(item):
        if item in (3, 4):
            time.sleep(0.05 if item == 3 else 0)
            raise ValueError(f"item {item}")
        return item

    results = []
    with pytest.raises(ValueError, match="item 3"):
        for value in ordered_map(work, range(8), 2, ahead=1):
            results.append(value)
    assert results == [0, 1, 2]
