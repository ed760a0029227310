"""``ats.rerun``, ``ats.compare`` and ``ats.report`` (audit 3, 2026-12-07): each test failed before its fix."""

import os
import subprocess
import sys

import pytest

import attnscope as ats
from attnscope import compare, rerun

from .test_rerun import edited_copy

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def parent(shapes, tmp_path_factory):
    """Guided, with a negative prompt that has the target words too (so the uncond branch has shares of them)."""
    return ats.capture(shapes, PROMPT, seed=3, store=tmp_path_factory.mktemp("parent") / "a.zarr",
                       num_inference_steps=2, negative_prompt="a blue square and a red circle")


# -- rerun ------------------------------------------------------------------------------------------------
def test_the_parent_link_is_absolute_when_the_trace_was_opened_by_a_relative_path(parent, tmp_path):
    """A trace opened as 'runs/a.zarr' was linked as 'runs/a.zarr': relative to the working directory of the rerun,
    so from any other directory the link named another store (or none)."""
    code = ("import torch, attnscope as ats; torch.set_num_threads(1); "
            "print(ats.rerun(ats.open_trace('a.zarr'), store='r.zarr').manifest['parent']['path'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=parent.path.parent, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip().splitlines()[-1]
    assert link == str(parent.path) and os.path.isabs(link)
    again = ats.open_trace(parent.path.parent / "r.zarr")
    assert ats.open_trace(again.manifest["parent"]["path"]).manifest == parent.manifest  # the link finds the parent


@pytest.mark.parametrize("store", [123, "", b"r.zarr"])
def test_a_store_that_is_not_a_path_is_one_clear_error(parent, shapes, tmp_path, monkeypatch, store):
    """store=123 failed with a TypeError from pathlib; store='' became '.', the working directory ("store '.'
    exists")."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ats.AttnscopeError, match=r"store=.*: expected the path of the trace store to create"):
        rerun(parent, pipe=shapes, store=store)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["bogus", "meta"])
def test_a_bad_device_with_a_given_pipe_is_one_clear_error_and_leaves_the_pipe(parent, tmp_path, device):
    """rerun(tr, pipe=p, device=...) moved p first: 'bogus' was a RuntimeError from torch, and 'meta' moved the
    user's pipeline there, its weights gone (then NotImplementedError), though device= without pipe= was checked."""
    pipe = ats.load_pipeline("shapes")  # a pipeline of its own: the shared one must not be touched if this fails
    before = ats.store.weights_fingerprint(pipe)
    with pytest.raises(ats.AttnscopeError, match=rf"cannot rerun trace '.*a\.zarr' on device '{device}': .*pass "
                                                 r"device='cpu'"):
        rerun(parent, pipe=pipe, device=device, store=tmp_path / "r.zarr")
    assert str(pipe.device) == "cpu" and ats.store.weights_fingerprint(pipe) == before
    assert not (tmp_path / "r.zarr").exists()
    assert rerun(parent, pipe=pipe, store=tmp_path / "r.zarr").complete  # and it still runs


@pytest.mark.parametrize(("value", "shown"), [("7.5", "'7.5'"), (float("nan"), "nan"), ([2.0], r"\[2\.0\]")])
def test_a_manifest_with_an_impossible_guidance_scale_is_one_clear_error(parent, shapes, tmp_path, value, shown):
    """A damaged or crafted guidance scale failed inside diffusers ('>' not supported between 'str' and 'int'), or,
    NaN, ran without guidance (nan > 1 is false) into a trace that recorded guidance_scale=nan."""
    def edit(attrs):
        attrs["manifest"]["run"]["pipeline_kwargs"]["guidance_scale"] = value

    copy = edited_copy(parent, tmp_path / "x.zarr", edit)
    with pytest.raises(ats.AttnscopeError, match=rf"trace '.*x\.zarr': guidance_scale={shown} in its manifest; "
                                                 r"expected a finite number"):
        rerun(copy, pipe=shapes, store=tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


# -- compare ----------------------------------------------------------------------------------------------
def test_compare_refuses_maps_of_another_guidance_branch(parent, shapes, tmp_path):
    """A rerun recording branch='uncond' (the negative prompt's maps) compared with its cond parent gave a table of
    'changes' that no intervention made (+0.02 on 'circle' for a rerun without any)."""
    uncond = rerun(parent, pipe=shapes, store=tmp_path / "u.zarr", branch="uncond")
    for a, b in ((parent, uncond), (uncond, parent)):
        with pytest.raises(ats.AttnscopeError, match=r"cannot compare .*: trace a holds the maps of the (un)?cond "
                                                     r"branch.*needs the maps of one branch") as err:
            compare(a, b, ["circle", "square"])
        assert "the cond branch (the prompt's)" in str(err.value) and "uncond branch only" in str(err.value)
    # the same branch on both sides still compares, and a plain rerun changes nothing there
    assert float(abs(compare(uncond, rerun(uncond, pipe=shapes), ["circle"]).stats.target_share).max()) == 0.0
    both = rerun(parent, pipe=shapes, store=tmp_path / "both.zarr", branch="both")  # holds the cond maps too
    assert float(abs(compare(parent, both, ["circle"]).stats.target_share).max()) == 0.0


def test_report_refuses_a_comparison_of_another_generation(parent, shapes, tmp_path):
    """ats.report(trace, compare=Comparison) wrote the before/after of two runs of another prompt into the
    report of ``trace``, without a word."""
    other = ats.capture(shapes, "a green triangle", seed=1, store=tmp_path / "o.zarr", num_inference_steps=2)
    unrelated = compare(other, rerun(other, pipe=shapes), ["triangle"])
    for write in (ats.report, ats.plot.report):  # ats.report hands a Comparison to plot.report, which checks it
        with pytest.raises(ats.AttnscopeError, match=r"compare=Comparison\('.*o\.zarr', '.*o-rerun\.zarr'\): "
                                                     r"cannot compare .*their prompts differ"):
            write(parent, tmp_path / "r.html", compare=unrelated)
        assert not (tmp_path / "r.html").exists()
