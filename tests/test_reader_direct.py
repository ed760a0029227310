"""Trace.attention / text_mass / coords read straight from Zarr (no DataTree) give exactly what xarray's own
DataTree view of the same store gives: values, dims, coordinates, attributes; for several prompts and images,
both branches, joint sites' text mass, a subset of steps, and an incomplete trace."""

import json
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr

import attnscope as ats
from attnscope.store._format import ROOT_COORDS, UNCOND_TOKEN_COORDS, site_group
from attnscope.testing import tiny_sd3_pipeline


def _through_tree(tr, site, array):
    """The site's array as xarray's DataTree reader gives it, with the trace's coordinates and attributes."""
    node = tr.tree[site_group(site)]
    da = node[array]
    uncond = array.endswith("_uncond")  # the uncond rows' tokens are the negative prompt's, stored apart
    source = {c: UNCOND_TOKEN_COORDS.get(c, c) if uncond else c for c in ROOT_COORDS}
    da = da.assign_coords({c: tr.tree[source[c]].variable for c in ROOT_COORDS
                           if source[c] in tr.tree.coords and set(tr.tree[source[c]].dims) <= set(da.dims)})
    da.attrs["site"] = dict(node.attrs.get("site", {}))
    da.attrs["tokens"] = tr.manifest["capture"]["tokens"]  # whether the token axis was cut to the prompt
    da.attrs["run_steps"] = tr.manifest["run"]["num_steps"]  # the run's steps, captured or not
    steps = [int(s) for s in node.attrs["steps"] if tr.complete or int(s) < tr.steps_written]
    return da.isel(step=steps)


def _same(tr, site, branch="cond", array="attention"):
    direct = (tr.attention if array.startswith("attention") else tr.text_mass)(site, branch)
    expected = _through_tree(tr, site, array)
    xr.testing.assert_identical(direct.load(), expected.load())
    assert direct.chunks == expected.chunks


def test_cross_attention_traces(tmp_path, sd_pipe):
    tr = ats.capture(sd_pipe, ["a red circle", "a blue square and a green triangle"], seed=[0, 1, 2, 3],
                     store=tmp_path / "a.zarr", num_inference_steps=4, height=32, width=32, num_images_per_prompt=2,
                     branch="both", heads="all", steps=[0, 2, 3])
    for site in tr.sites:
        _same(tr, site, "cond", "attention")
        _same(tr, site, "uncond", "attention_uncond")
    assert tr.tokens == [str(t) for t in tr.tree["token_text"].values[0]]
    assert np.array_equal(tr.timesteps, tr.tree["timestep"].values, equal_nan=True)
    assert sorted(tr.coords) == sorted(["step", "sample", "token", *ROOT_COORDS, *UNCOND_TOKEN_COORDS.values()])
    uncond = tr.attention(tr.sites[0], "uncond")
    assert uncond.token_text.values[0, :3].tolist() == ["<|startoftext|>", "<|endoftext|>", "<|endoftext|>"]
    for name, da in tr.coords.items():
        assert da.variable.identical(tr.tree[name].variable.load()), name
    assert [np.asarray(a).tolist() for a in tr.images] == tr.tree["images"].values.tolist()


def test_joint_sites_and_text_mass(tmp_path):
    pipe = tiny_sd3_pipeline()
    tr = ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "j.zarr", num_inference_steps=2, height=32, width=32)
    for site in tr.sites:
        _same(tr, site, "cond", "attention")
        _same(tr, site, "cond", "text_mass")


def test_incomplete_trace(tmp_path, sd_pipe):
    ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "c.zarr", num_inference_steps=4, height=32, width=32)
    shutil.copytree(tmp_path / "c.zarr", tmp_path / "i.zarr")
    root = json.loads((tmp_path / "i.zarr" / "zarr.json").read_text())
    root["attributes"].update(complete=False, steps_written=2)
    del root["consolidated_metadata"]
    (tmp_path / "i.zarr" / "zarr.json").write_text(json.dumps(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = ats.open_trace(tmp_path / "i.zarr")
        for site in tr.sites:
            _same(tr, site)
            assert tr.attention(site).sizes["step"] == 2


@pytest.mark.parametrize("name", ["token_text", "timestep"])
def test_damaged_coordinate_is_one_clear_error(tmp_path, sd_pipe, name):
    tr = ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "d.zarr", num_inference_steps=2,
                     height=32, width=32)
    chunk = next(p for p in (tmp_path / "d.zarr" / name).rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:3])
    with pytest.raises(ats.AttnscopeError, match=f"coordinate {name!r} cannot be read"):
        ats.open_trace(tr.path).attention(tr.sites[0])
