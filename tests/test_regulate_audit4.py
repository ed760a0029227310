"""Audit of the interventions against SEEDS.md and their docs, as a demanding user meets them: a spatial region that
holds no pixel of any map, numpy's numbers as the settings of SpatialTemporal, TGate and risk_above, and the public
loss helpers given shapes that do not fit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.regulate import (
    SpatialTemporal,
    TGate,
    excite_loss,
    gaussian_basis,
    region_mask,
    regulation_loss,
    risk_above,
    smoothing_kernel,
)

PROMPT = "a red circle and a blue square"


def _run(pipe, *clients, steps=3, **kw):
    with ats.hooks(pipe, *clients):
        return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kw).images


# -- SpatialTemporal: a region that holds no pixel -----------------------------------------------------------


@pytest.mark.parametrize("region, radius", [((0.5, 0.5, 0.51, 0.51), 0.2), ((0.5, 0.5), 0.01)])
def test_a_region_between_the_pixel_centres_of_every_map_is_one_error_before_a_recorder_writes(shapes, tmp_path,
                                                                                               region, radius):
    """The shapes model's maps are 8×8 and 4×4: pixel centres at (k + ½)/8 and (k + ½)/4, none in [0.5, 0.51] nor
    within 0.01 of 0.5. The control used to run without touching the object (the image was the plain one, bit for
    bit); now it names the phrase and the maps, before a Recorder beside it creates its store."""
    assert not any(region_mask(region, (n, n), radius).any() for n in (4, 8))  # the premise, by the rule
    recorder = ats.Recorder(tmp_path / "t.zarr", run_info={"num_inference_steps": 3})
    with pytest.raises(AttnscopeError, match=r"layout\['a red circle'\] = .*holds no pixel centre of any map the "
                                             r"control acts on \(4×4, 8×8\)"):
        _run(shapes, SpatialTemporal({"a red circle": region}, radius=radius), recorder)
    assert not (tmp_path / "t.zarr").exists()


def test_a_region_with_pixels_at_one_resolution_only_still_acts(shapes):
    """(0.4, 0.45) holds the 8×8 centre 0.4375 on each axis and no 4×4 centre (0.375, 0.625): the rule acts where
    the region has pixels, as the released code does at every resolution."""
    region = (0.4, 0.4, 0.45, 0.45)
    assert region_mask(region, (8, 8)).sum() == 1 and not region_mask(region, (4, 4)).any()
    plain = _run(shapes)
    placed = _run(shapes, SpatialTemporal({"a red circle": region}))
    assert np.abs(placed - plain).max() > 0


def test_a_region_check_counts_only_the_sites_the_control_acts_at(shapes):
    """With sites= the 4×4 sites only, the region that holds an 8×8 pixel holds none where the control acts."""
    control = SpatialTemporal({"a red circle": (0.4, 0.4, 0.45, 0.45)}, sites=["down_blocks.2.*", "mid_block.*",
                                                                                "up_blocks.0.*"])
    with pytest.raises(AttnscopeError, match=r"any map the control acts on \(4×4\)"):
        _run(shapes, control)


# -- numpy's numbers are numbers -----------------------------------------------------------------------------


def test_spatial_settings_take_numpy_numbers_as_the_numbers_they_are(shapes):
    """λ = np.float32(0.5) used to be refused as "an array of shape ()"; radius, epochs and lr as not numbers."""
    layout = {"a red circle": (0.0, 0.0, 0.5, 1.0)}
    given = SpatialTemporal(layout, weights=np.float32(0.5), radius=np.float32(0.25), epochs=np.int64(2),
                            lr=np.float64(0.01))
    plain = SpatialTemporal(layout, weights=0.5, radius=0.25, epochs=2, lr=0.01)
    assert given.describe() == plain.describe()                 # 0.5 and 0.25 are exact in float32
    json.dumps(given.describe())
    assert np.array_equal(_run(shapes, given), _run(shapes, plain))
    assert SpatialTemporal(layout, weights=np.int64(1)).weights == 1.0
    assert SpatialTemporal(layout, weights=np.array(2.0)).weights == 2.0   # a 0-d array is one number


def test_tgate_takes_numpy_numbers_as_the_numbers_they_are(shapes):
    gate = TGate(np.float32(0.5), tol=np.float32(0.1), sp_interval=np.int64(2), warm_up=np.int64(1),
                 fi_interval=np.int64(1), drop_guidance=np.bool_(True))
    assert gate.resolve(6) == 3                                 # half of 6 steps
    json.dumps(gate.describe())
    reference = TGate(0.5, tol=0.1, sp_interval=2, warm_up=1, fi_interval=1)
    a, b = _run(shapes, gate, steps=6), _run(shapes, reference, steps=6)
    assert gate.gated_steps == reference.gated_steps == [3, 4, 5]
    assert np.array_equal(a, b)
    assert gate.computed == reference.computed


def test_risk_above_takes_numpy_numbers():
    gate = risk_above(np.float64(0.25), step=np.int64(5))
    assert (gate.threshold, gate.step) == (0.25, 5) and type(gate.step) is int
    json.dumps(gate.describe())
    for threshold, step, message in ((np.float32(1.5), 5, r"threshold=.*1\.5.*: expected a probability"),
                                     (0.3, np.int64(-1), r"step=.*-1.*: expected the decision step"),
                                     (np.bool_(True), 5, r"threshold=.*True.*: expected a probability")):
        with pytest.raises(AttnscopeError, match=message):
            risk_above(threshold, step=step)


# -- the public loss helpers: one error naming the input -----------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: regulation_loss(torch.rand(4, 10, 2), torch.rand(4, 3, 2), 0.4, groups=3),
     r"groups=3: expected a positive int dividing the 4 rows"),
    (lambda: regulation_loss(torch.rand(4, 10), torch.rand(4, 3, 2), 0.4), r"maps \(4, 10\), weights \(4, 3, 2\)"),
    (lambda: regulation_loss(torch.rand(4, 10, 2), torch.rand(2, 3, 2), 0.4), r"the same rows and n"),
    (lambda: regulation_loss(torch.rand(4, 10, 2), torch.rand(4, 3, 2), 0.4, quantile=2.0), r"quantile=2.0"),
    (lambda: excite_loss(torch.rand(4, 4, 6), [1, 2], [[3]]), r"targets=\[\[3\]\]: .* among prompt=\[1, 2\]"),
    (lambda: excite_loss(torch.rand(4, 4, 6), [1, 2], []), r"targets=\[\]"),
    (lambda: excite_loss(torch.rand(4, 4, 6), [], [[1]]), r"prompt=\[\]"),
    (lambda: excite_loss(torch.rand(4, 6), [1, 2], [[1]]), r"maps \(4, 6\): expected a tensor \(h, w, tokens\)"),
    (lambda: gaussian_basis(0, 16), r"height=0: expected a map side"),
    (lambda: gaussian_basis(8, 2.5), r"width=2.5: expected a map side"),
    (lambda: smoothing_kernel(3, 0.0), r"sigma=0.0"),
    (lambda: smoothing_kernel(2), r"size=2: expected an odd int"),
])
def test_public_helpers_given_what_does_not_fit_raise_one_error_naming_it(call, message):
    with pytest.raises(AttnscopeError, match=message):
        call()


def test_public_helpers_keep_their_numbers_with_numpy_arguments():
    """The checks take numpy's ints as ints, and the values are the formulas' (checked by hand)."""
    a = torch.tensor([[[0.2], [0.4]]], dtype=torch.float64)
    w = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    expected = (0.38 - 0.9) ** 2 + 80 * (0.3 - 0.2) ** 2 + 0.09 * 5   # q_0.9 of (0.2, 0.4) = 0.38
    assert float(regulation_loss(a, w, 0.2, groups=np.int64(1))[0]) == pytest.approx(expected)
    g = gaussian_basis(np.int64(8), 8)
    assert tuple(g.shape) == (9, 8, 8) and float(g[0, 2, 3]) == pytest.approx(math.exp(-0.5))
    maps = torch.zeros(2, 2, 4)
    maps[..., 1], maps[..., 2] = 0.5, 0.2
    maps[0, 0, 2] = 0.52
    loss = excite_loss(maps, [np.int64(1), 2], [[1], [np.int64(2)]], kernel=torch.ones(1, 1))
    assert float(loss) == pytest.approx(1 - 1 / (1 + math.exp(-2)), rel=1e-5)
