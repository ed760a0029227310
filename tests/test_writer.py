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
