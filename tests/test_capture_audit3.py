"""Capture given numpy values where ints or choices are expected (a third audit): the same trace as with Python
values, or one clear error with nothing written."""

import numpy as np
import pytest
import xarray as xr

import attnscope as ats
from attnscope.errors import AttnscopeError

from .conftest import cli

PROMPT = "a red circle and a blue square"


def test_numpy_counts_give_the_trace_python_ints_give(shapes, tmp_path):
    # an np.arange item as num_inference_steps / num_images_per_prompt was refused ("expected an int >= 1")
    given = ats.capture(shapes, PROMPT, seed=[4, 5], store=tmp_path / "np.zarr", num_inference_steps=np.int64(3),
                        num_images_per_prompt=np.int64(2), height=np.int32(32))
    plain = ats.capture(shapes, PROMPT, seed=[4, 5], store=tmp_path / "py.zarr", num_inference_steps=3,
                        num_images_per_prompt=2, height=32)
    assert given.manifest["run"]["pipeline_kwargs"] == {"num_inference_steps": 3, "num_images_per_prompt": 2,
                                                        "height": 32}
    assert type(given.manifest["run"]["num_inference_steps"]) is int
    site = plain.sites[0]
    xr.testing.assert_identical(given.attention(site).load(), plain.attention(site).load())
    np.testing.assert_array_equal(np.stack([np.asarray(i) for i in given.images]),
                                  np.stack([np.asarray(i) for i in plain.images]))


def test_tokens_given_as_an_array_is_one_error_and_nothing_written(shapes, tmp_path):
    # it reached `tokens == "auto"` before being checked: numpy's "truth value … is ambiguous"
    store = tmp_path / "t.zarr"
    with pytest.raises(AttnscopeError, match=r"tokens=array\(\[1, 2\]\): expected one of 'auto', 'all', 'prompt'"):
        ats.capture(shapes, PROMPT, seed=0, store=store, num_inference_steps=2, tokens=np.array([1, 2]))
    assert not store.exists()


def test_the_capture_command_says_how_many_steps_it_recorded(tmp_path):
    out = tmp_path / "x.zarr"
    done = cli("capture", "--prompt", "a red circle", "--out", out, "--steps", "3", "--capture-steps", "1:")
    assert done.exit_code == 0, done.stderr
    assert f"trace: {out}  (7 sites, 3 steps (2 recorded), 1 image)" in done.stdout  # was "3 steps, 1 images"
    assert ats.open_trace(out).attention(ats.open_trace(out).sites[0])["step"].values.tolist() == [1, 2]
    every = cli("capture", "--prompt", "a red circle", "--out", tmp_path / "y.zarr", "--steps", "2",
                "--images-per-prompt", "2")
    assert "(7 sites, 2 steps, 2 images)" in every.stdout


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_store_inside_another_trace_is_refused_and_the_trace_left_as_it_was(shapes, tmp_path):
    outer = tmp_path / "t.zarr"
    ats.capture(shapes, PROMPT, seed=0, store=outer, num_inference_steps=2)
    before = _files(outer)
    for inner in (outer / "x.zarr", outer / "images" / "x.zarr", outer / "images"):
        for overwrite in (False, True):
            with pytest.raises(AttnscopeError, match=rf"store '{inner}' is inside the trace '{outer}'; choose a "
                                                     r"store path outside any trace"):
                ats.capture(shapes, PROMPT, seed=0, store=inner, num_inference_steps=2, overwrite=overwrite)
    assert _files(outer) == before  # used to gain a stray trace group, deleted with it on overwrite


def test_a_file_at_the_store_path_is_not_offered_overwrite(shapes, tmp_path):
    # "exists; pass overwrite=True to replace it" sent the user to an option that refuses files
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(AttnscopeError, match=r"exists and is not an attnscope trace or an empty directory; "
                                                 r"overwrite=True only replaces traces"):
            ats.capture(shapes, PROMPT, seed=0, store=path, num_inference_steps=2, overwrite=overwrite)
    assert path.read_text() == "keep me"


def test_a_sweep_inside_a_trace_is_refused_before_anything_is_written(shapes, tmp_path):
    outer = tmp_path / "t.zarr"
    ats.capture(shapes, PROMPT, seed=0, store=outer, num_inference_steps=2)
    before = _files(outer)
    with pytest.raises(AttnscopeError, match=rf"out='{outer}/sweep' is inside the trace '{outer}'; expected a folder "
                                             r"outside any trace"):
        ats.sweep(shapes, [PROMPT], seeds=[0], out=outer / "sweep", num_inference_steps=2, progress=False)
    assert _files(outer) == before and not (outer / "sweep").exists()


@pytest.mark.parametrize("limit", [-1, "256MB", 1.5, True])
def test_a_recorder_queue_bound_that_is_no_byte_count_is_one_error_and_nothing_written(tmp_path, limit):
    with pytest.raises(AttnscopeError, match=rf"max_queue_bytes={limit!r}: expected an int >= 0"):
        ats.Recorder(tmp_path / "r.zarr", max_queue_bytes=limit)
    assert not (tmp_path / "r.zarr").exists()


def test_a_recorder_with_no_queue_writes_the_same_maps(shapes, tmp_path):
    import torch

    traces = []
    for limit in (0, np.int64(256 << 20)):
        rec = ats.Recorder(tmp_path / f"q{int(limit)}.zarr", max_queue_bytes=limit)
        with ats.hooks(shapes, rec):
            shapes(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
        traces.append(ats.open_trace(rec.path))
    for site in traces[0].sites:
        xr.testing.assert_identical(traces[0].attention(site).load(), traces[1].attention(site).load())


def test_a_sweep_given_numpy_counts_records_and_resumes_them_as_ints(shapes, tmp_path):
    import json

    out = tmp_path / "s"
    first = ats.sweep(shapes, [PROMPT], seeds=np.arange(2), out=out, num_inference_steps=np.int64(2), progress=False)
    assert json.loads((out / "sweep.json").read_text())["capture"] == {"num_inference_steps": 2}
    again = ats.sweep(shapes, [PROMPT], seeds=[0, 1], out=out, num_inference_steps=2, progress=False)  # same sweep
    assert again.df["trace_id"].tolist() == first.df["trace_id"].tolist()  # resumed: nothing redone


def _two_values(trace):
    return {"x": np.array([1.0, 2.0])}


def _one_value(trace):
    import torch

    return {"x": np.array([1.5]), "t": torch.tensor(2.5), "n": np.int64(3)}


def test_sweep_extra_columns_of_arrays_and_seeds_in_ascii_digits(shapes, tmp_path):
    # an array of several values failed the run with numpy's "can only convert an array of size 1", no column named
    with pytest.raises(AttnscopeError, match=r"every run failed; the first error: AttnscopeError: extra column 'x' = "
                                             r"array\(\[1\., 2\.\]\): expected a scalar"):
        ats.sweep(shapes, [PROMPT], seeds=[0], out=tmp_path / "a", num_inference_steps=2, progress=False,
                  extra=_two_values)
    cat = ats.sweep(shapes, [PROMPT], seeds=[0], out=tmp_path / "b", num_inference_steps=2, progress=False,
                    extra=_one_value)
    assert cat.df[["x", "t", "n"]].iloc[0].tolist() == [1.5, 2.5, 3]
    with pytest.raises(AttnscopeError, match=r"seeds='\u0663'"):  # an Arabic-Indic three was read as seed 3
        ats.sweep(shapes, [PROMPT], seeds="\u0663", out=tmp_path / "c", num_inference_steps=2, progress=False)
    assert not (tmp_path / "c").exists()
