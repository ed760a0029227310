"""Audit of SpatialTemporal and TGate as a demanding user meets them: default layouts from punctuated and
repeated phrases, λ tables of another run's length, step specs outside the run beside a Recorder, the
disk on non-square maps, and TGate beside a Recorder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.regulate import SpatialTemporal, TGate, layout_from_prompt, region_mask

PROMPT = "a red circle to the left of a blue square"


def _run(pipe, *clients, prompt=PROMPT, steps=3, **kw):
    with ats.hooks(pipe, *clients):
        return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kw).images


# -- default layouts -------------------------------------------------------------------------------------
def test_punctuation_around_a_phrase_is_not_part_of_the_object():
    """'a blue square.' was an object phrase: the full stop's token joined the object and its local prompt."""
    assert layout_from_prompt("a red circle to the left of a blue square.") == layout_from_prompt(PROMPT)
    assert list(layout_from_prompt("a cat, a dog and a bird!")) == ["a cat", "a dog", "a bird"]


def test_the_default_layout_of_a_punctuated_prompt_places_only_the_object_tokens(sd_pipe):
    control = SpatialTemporal()
    _run(sd_pipe, control, prompt=PROMPT + ".", height=32, width=32)
    (plan,) = next(iter(control._plan.values()))
    tokens = sd_pipe.tokenizer.convert_ids_to_tokens(sd_pipe.tokenizer(PROMPT + ".").input_ids)
    assert plan.phrases == ("a red circle", "a blue square")
    assert [[tokens[p] for p in found] for found in plan.positions] == [["red</w>", "circle</w>"],
                                                                        ["blue</w>", "square</w>"]]


@pytest.mark.parametrize("prompt", ["a cat and a cat", "a cat to the left of a Cat"])
def test_a_phrase_named_twice_is_one_error_not_one_object(prompt):
    """The dict kept one 'a cat' with the second one's box and the first one's tokens: two objects became one."""
    with pytest.raises(AttnscopeError, match=r"names the object 'a [cC]at' twice"):
        layout_from_prompt(prompt)


def test_a_phrase_named_twice_fails_in_the_control_before_a_recorder_writes(shapes, tmp_path):
    recorder = ats.Recorder(tmp_path / "t.zarr", run_info={"num_inference_steps": 3})
    with pytest.raises(AttnscopeError, match="twice"):
        _run(shapes, SpatialTemporal(), recorder, prompt="a red circle and a red circle")
    assert not (tmp_path / "t.zarr").exists()


# -- λ tables and step specs ----------------------------------------------------------------------------------
def test_weights_for_a_longer_run_are_refused_not_truncated(shapes):
    """A (2, 6) table on a 3-step run used λ of steps 0–2 of a 6-step schedule, silently."""
    with pytest.raises(AttnscopeError, match=r"expected an array of shape \(objects=2, steps=3\), got \(2, 6\)"):
        _run(shapes, SpatialTemporal(weights=np.ones((2, 6))))


def test_optimised_weights_reused_on_a_shorter_run_are_refused(shapes):
    control = SpatialTemporal(objective="attention", epochs=1, lr=0.05)
    control.optimize(shapes, PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AttnscopeError, match=r"steps=3\), got \(2, 4\)"):
        _run(shapes, control, steps=3)
    _run(shapes, control, steps=4)                                              # the run it was optimised for


def test_steps_outside_the_run_fail_before_a_recorder_creates_its_store(shapes, tmp_path):
    """The step spec was resolved at the first attention call, after the Recorder had created its store."""
    recorder = ats.Recorder(tmp_path / "t.zarr", run_info={"num_inference_steps": 3})
    with pytest.raises(AttnscopeError, match=r"steps: \[10\] outside this run's steps 0..2"):
        _run(shapes, SpatialTemporal(steps=[10]), recorder)
    assert not (tmp_path / "t.zarr").exists()


def test_negative_steps_and_first_half_act_only_there(shapes):
    plain = _run(shapes, steps=4)
    late = _run(shapes, SpatialTemporal(steps=-1), steps=4)
    early = _run(shapes, SpatialTemporal(steps="first_half"), steps=4)
    table = np.zeros((2, 4))
    table[:, 3] = 1.0                                                           # λ only at the last step
    np.testing.assert_allclose(late, _run(shapes, SpatialTemporal(weights=table), steps=4), atol=1e-6)
    table = np.zeros((2, 4))
    table[:, :2] = 1.0
    np.testing.assert_allclose(early, _run(shapes, SpatialTemporal(weights=table), steps=4), atol=1e-6)
    assert not np.array_equal(late, plain)


# -- the disk on non-square maps --------------------------------------------------------------------------------
def test_a_disk_on_a_non_square_map_is_the_released_rule_per_axis_at_every_resolution():
    """Not a defect: the region is a disk in the layout's [0, 1]² coordinates — the released code's
    ``(x − cx)² + (y − cy)² < 0.2²`` with x over the width and y over the height — so on a 2:1 image it
    spans 0.4 of the width and 0.4 of the height (an ellipse in pixels), the same image region at every
    site's resolution, as boxes are."""
    centre = (0.5, 0.5)
    for h, w in ((32, 64), (16, 32), (8, 16)):
        mask = region_mask(centre, (h, w)).reshape(h, w).numpy().astype(bool)
        y, x = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
        assert np.array_equal(mask, (x[None] - 0.5) ** 2 + (y[:, None] - 0.5) ** 2 <= 0.2**2)
        assert mask.any(0).sum() / w == pytest.approx(mask.any(1).sum() / h, abs=1 / h)  # the same share per axis
    fine = region_mask(centre, (32, 64)).reshape(32, 64)
    coarse = region_mask(centre, (8, 16)).reshape(8, 16)
    assert float(fine.mean()) == pytest.approx(float(coarse.mean()), abs=0.02)  # the same area of the image


# -- TGate beside a Recorder ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"drop_guidance": False}, {"sp_interval": 2, "warm_up": 1}])
def test_tgate_beside_a_recorder_stores_what_was_computed(shapes, tmp_path, kwargs):
    gate = TGate(2, **kwargs)
    recorder = ats.Recorder(tmp_path / "g.zarr", run_info={"num_inference_steps": 4})
    with ats.hooks(shapes, recorder, gate):                                    # the recorder listed first
        recorder.add_images(shapes(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images)
    tr = ats.open_trace(recorder.path)
    assert tr.gated_steps == gate.gated_steps == [2, 3]
    for site in tr.sites:
        assert gate.computed[site] == [0, 1]
        maps = tr.attention(site).values
        assert np.isfinite(maps[:2]).all() and np.isnan(maps[2:]).all()


def test_a_numpy_integer_gate_step_is_an_integer():
    """TGate(np.int64(3)) was refused as 'expected ... an integer >= 1'."""
    gate = TGate(np.int64(3))
    assert gate.gate_step == 3 and type(gate.gate_step) is int and gate.resolve(8) == 3
    assert TGate.from_description(gate.describe()).gate_step == 3


def test_optimize_without_prompt_text_is_one_error_naming_it(shapes):
    """optimize(pipe, None, prompt_embeds=...) failed with a raw TypeError from list(None)."""
    control = SpatialTemporal({"a red circle": (0.0, 0.0, 0.5, 1.0)}, objective="attention", epochs=1)
    with pytest.raises(AttnscopeError, match=r"optimize\(prompt=None\): expected the prompt's text"):
        control.optimize(shapes, None, prompt_embeds=torch.zeros(1, 77, 32), num_inference_steps=2,
                         generator=torch.Generator().manual_seed(0))
