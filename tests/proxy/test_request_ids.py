"""Request ids drawn in batches (proxy/ids.py): unique, unguessable-sized, per process,
ascending from batch to batch."""

from __future__ import annotations

import os
import re
import time

from sluice.proxy import ids
from sluice.proxy.ids import BATCH, random_request_id


def test_ids_are_32_hex_digits_and_never_repeat_across_batches() -> None:
    drawn = [random_request_id() for _ in range(3 * BATCH + 7)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in drawn)
    assert len(set(drawn)) == len(drawn)


def test_ids_ascend_and_start_with_the_time_they_were_drawn() -> None:
    """Ascending ids go in at the right edge of the records store's request_id index
    instead of anywhere in it (proxy/ids.py)."""
    ids._forget_batch()
    drawn = []
    for _ in range(3):
        before = time.time_ns() // 1_000_000
        batch = [random_request_id() for _ in range(BATCH)]
        after = time.time_ns() // 1_000_000
        assert all(before <= int(i[:12], 16) <= after for i in batch)
        drawn += batch
        time.sleep(0.002)  # the next batch is drawn in a later millisecond
    for i in range(2):  # every id of a batch sorts before every id of the next one
        assert max(drawn[i * BATCH : (i + 1) * BATCH]) < min(drawn[(i + 1) * BATCH :])
    # 20 random digits after the prefix: no two ids share them
    assert len({i[12:] for i in drawn}) == len(drawn)


def test_a_forked_child_does_not_reuse_its_parents_batch() -> None:
    random_request_id()  # the parent holds a batch now
    assert ids._batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, then exit without running pytest's teardown
        os.close(read)
        os.write(write, " ".join(random_request_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split()
    os.waitpid(pid, 0)
    parent = [random_request_id() for _ in range(4)]
    assert len(child) == 4
    assert not set(child) & set(parent)
