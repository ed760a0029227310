"""TraceWriter internals: the queue bound, shard assembly, error reporting."""

import threading
import time

import numpy as np
import pytest
import zarr

from attnscope.errors import AttnscopeError
from attnscope.store import SiteLayout, StoreLayout, TraceWriter, chunk_steps
from attnscope.store._writer import _ByteQueue


def layout(steps=(0, 1, 2), num_steps=3, spatial=(2, 3)):
    return StoreLayout(num_steps=num_steps, samples=2, prompt_of_sample=(0, 1), image_of_sample=(0, 0),
                       token_positions=(0, 1, 2), token_text=[["<s>", "a", "<e>"], ["<s>", "b", "<e>"]],
                       sites=[SiteLayout("s", {"name": "s"}, heads=1, spatial=spatial, branches=("cond",), steps=steps)])


def test_queue_blocks_producer_only_when_full():
    q = _ByteQueue(limit=100)
    q.put("a", 60)
    done = threading.Event()
    threading.Thread(target=lambda: (q.put("b", 60), done.set()), daemon=True).start()
    time.sleep(0.1)
    assert not done.is_set()  # 60 + 60 > 100: waits
    assert q.get() == "a"
    assert done.wait(2) and q.get() == "b"
    q.put("big", 1000)  # an item larger than the bound still goes through an empty queue
    assert q.get() == "big"


def test_shards_and_values(tmp_path):
    w = TraceWriter(tmp_path / "t.zarr")
    w.init(layout())
    data = {s: np.random.default_rng(s).random((2, 1, 2, 3, 3)).astype(np.float16) for s in range(3)}
    for s in range(3):
        w.timestep(s, 900.0 - s)
        w.put("s", "cond", s, data[s])
    w.close(complete=True)
    arr = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")["sites/s/attention"]
    assert arr.shards == (3, 2, 1, 2, 3, 3) and arr.chunks == (3, 1, 1, 2, 3, 3)
    np.testing.assert_array_equal(arr[...], np.stack([data[s] for s in range(3)]))
    assert w.steps_written == 3


def test_writer_errors_reach_the_producer(tmp_path):
    w = TraceWriter(tmp_path / "t.zarr")
    w.init(layout())
    w.put("s", "cond", 0, np.zeros((5, 5), np.float16))  # wrong shape: fails in the writer thread
    with pytest.raises(AttnscopeError, match="trace writer for .* failed"):
        w.close(complete=True)
    root = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert root.attrs["complete"] is False


def test_chunk_steps_bounds():
    assert chunk_steps(10**6, 50) == 1
    assert chunk_steps(1, 50) == 8
    assert chunk_steps(1, 3) == 3


def test_a_closed_writer_refuses_new_data_instead_of_blocking(tmp_path):
    """A put after close queued forever into a queue nobody drained: with a full queue the producer hung."""
    w = TraceWriter(tmp_path / "t.zarr", max_queue_bytes=64)
    w.init(layout())
    w.close(complete=False)
    outcome = []

    def put_twice():  # 72 + 72 bytes > 64: the second put waited on the dead writer thread
        try:
            for _ in range(2):
                w.put("s", "cond", 0, np.zeros((2, 1, 2, 3, 3), np.float16))
        except AttnscopeError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=put_twice, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "put() blocked on a closed writer"
    assert len(outcome) == 1 and "is closed" in str(outcome[0]) and "new one per run" in str(outcome[0])


def test_complete_is_never_marked_with_steps_missing(tmp_path):
    """close(complete=True) marked a store complete although no step's maps had arrived (hooks removed mid-block)."""
    w = TraceWriter(tmp_path / "t.zarr")
    w.init(layout())
    w.put("s", "cond", 0, np.zeros((2, 1, 2, 3, 3), np.float16))   # steps 1 and 2 never come
    w.close(complete=True)
    root = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert w.steps_written == 1 and root.attrs["steps_written"] == 1 and root.attrs["complete"] is False
