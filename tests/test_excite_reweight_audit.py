"""Audit of Attend-and-Excite and Reweight: each test failed before its fix (except the last, which pins what the
trace of a reweighted run shows)."""

import math

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.regulate import AttendAndExcite, Reweight, excite_loss, smoothing_kernel

PROMPT = "a red circle and a blue square"


@pytest.fixture
def pipe(shapes):
    return shapes


def test_without_a_generator_the_start_noise_is_the_global_rngs_next_draw(pipe):
    """Without a generator the pipeline draws its start noise from torch's global RNG; prepare's cut-short call drew
    it once and prepare a second time, so the run started from other noise than the plain call after the same
    torch.manual_seed (with step 0 not moved, the start latents must be exactly that draw)."""
    side = pipe.unet.config.sample_size
    torch.manual_seed(0)
    expected = torch.randn(1, pipe.unet.config.in_channels, side, side)     # DDIM: init_noise_sigma is 1
    excite = AttendAndExcite(["circle", "square"], steps=[1], thresholds={})
    call = {"prompt": PROMPT, "num_inference_steps": 4}
    torch.manual_seed(0)
    excite.prepare(pipe, call)
    torch.testing.assert_close(call["latents"], expected, atol=0, rtol=0)


def test_a_failed_prepare_leaves_it_unprepared(pipe):
    """A prepare that failed left the object (or an earlier preparation) in place: hooks then installed without
    complaint and the call ran without being moved at all."""
    two_sizes = AttendAndExcite(["circle", "square"], sites=["down_blocks.1.*", "down_blocks.2.*"])  # 8x8 and 4x4
    with pytest.raises(AttnscopeError, match="different sizes"):
        two_sizes.prepare(pipe, {"prompt": PROMPT, "num_inference_steps": 4, "generator": torch.Generator()})
    with pytest.raises(AttnscopeError, match="needs the pipeline call"), ats.hooks(pipe, two_sizes):
        pass
    excite = AttendAndExcite(["circle", "square"])
    excite.prepare(pipe, {"prompt": PROMPT, "num_inference_steps": 4, "generator": torch.Generator()})
    other = {"prompt": "a green triangle", "num_inference_steps": 4, "generator": torch.Generator()}
    with pytest.raises(AttnscopeError, match="'circle' is not in the prompt"):
        excite.prepare(pipe, other)                                         # the first preparation is void now
    with pytest.raises(AttnscopeError, match="needs the pipeline call"), ats.hooks(pipe, excite):
        pipe(**other)


def test_thresholds_landing_on_one_step_do_not_depend_on_their_order(pipe):
    """Shares 0 and 0.1 of a 4-step run are both step 0: the later share's threshold applies, whatever the order
    of the mapping (before, the last key written won: {0.0: 0.0, 0.1: 1.0} refined, its reverse did not)."""
    def history(thresholds):
        excite = AttendAndExcite(["circle", "square"], steps=[0], thresholds=thresholds, max_refinement=2)
        excite.prepare(pipe, {"prompt": PROMPT, "num_inference_steps": 4, "generator": torch.Generator().manual_seed(0)})
        return excite.history[0]

    expected = history({0.0: 1.0})                                         # threshold 1: refine to loss 0 (2 updates)
    assert expected[1][0] < expected[0][0]
    assert history({0.0: 0.0, 0.1: 1.0}) == expected
    assert history({0.1: 1.0, 0.0: 0.0}) == expected


def test_the_manifest_params_rebuild_it():
    """describe() writes the thresholds' shares as strings (JSON keys); AttendAndExcite(**params) refused them."""
    excite = AttendAndExcite(["circle", "square"], steps=slice(0, 2), thresholds={0.4: 0.8, 0.0: 0.05}, probe_batch=2)
    params = excite.describe()["params"]
    assert params["thresholds"] == {"0.0": 0.05, "0.4": 0.8}
    again = AttendAndExcite(**params)
    assert again.describe() == excite.describe() and repr(again) == repr(excite)
    assert again.thresholds == {0.0: 0.05, 0.4: 0.8}
    with pytest.raises(AttnscopeError, match=r"thresholds=.*: expected \{share of the run"):
        AttendAndExcite(["circle"], thresholds={"0.0": 0.05, 0.0: 0.5})     # one share given twice


def test_numpy_numbers_are_numbers():
    """np.float32 / np.int64 settings (read from an array) were refused as not "a finite non-negative number"."""
    assert Reweight("square", np.float32(2.5)).factor == 2.5
    assert Reweight("square", np.int64(2)).describe()["params"]["factor"] == 2.0
    excite = AttendAndExcite(["circle"], step_size=np.float32(10), max_refinement=np.int64(3), probe_batch=np.int64(2),
                             thresholds={np.float64(0.0): np.float32(0.5)})
    assert (excite.step_size, excite.max_refinement, excite.probe_batch, excite.thresholds) == (10.0, 3, 2, {0.0: 0.5})
    assert type(excite.max_refinement) is int and type(excite.describe()["params"]["thresholds"]["0.0"]) is float
    for bad in (np.float32("nan"), -1, True, "2"):
        with pytest.raises(AttnscopeError, match="factor=.*expected a finite non-negative number"):
            Reweight("square", bad)


def test_excite_loss_on_maps_one_pixel_high_or_wide():
    """A side too short for reflect padding (1 pixel: a thin image at the deepest sites) made the 3x3 smoothing a
    raw torch error; the short side now repeats its edge, so along it the kernel's column sums apply."""
    rng = np.random.default_rng(1)
    row = rng.dirichlet(np.ones(4), size=(1, 5))                          # (1, 5, tokens)
    prompt, targets = [1, 2, 3], [[1], [2, 3]]
    z = row[0][:, prompt] * 100.0
    share = np.exp(z - z.max(-1, keepdims=True))
    share /= share.sum(-1, keepdims=True)                                 # (5, 3)
    along_x = smoothing_kernel(3, 0.5).numpy().sum(0)                    # a 1-pixel column: the kernel's column sums
    losses = []
    for cols in targets:
        line = np.pad(sum(share[:, prompt.index(c)] for c in cols), 1, mode="reflect")
        losses.append(1 - max(float(np.dot(line[x:x + 3], along_x)) for x in range(5)))
    expected = max(0.0, max(losses))
    assert float(excite_loss(torch.tensor(row), prompt, targets)) == pytest.approx(expected, rel=1e-9)
    column = torch.tensor(row).transpose(0, 1)                           # (5, 1, tokens): the same by symmetry
    assert float(excite_loss(column, prompt, targets)) == pytest.approx(expected, rel=1e-9)
    pixel = torch.tensor([[[0.0, 0.3, 0.2]]], dtype=torch.float64)  # one pixel: no smoothing at all
    assert float(excite_loss(pixel, [1, 2], [[2]])) == pytest.approx(1 - 1 / (1 + math.exp(10)), rel=1e-9)


def test_a_target_missing_from_one_prompt_of_a_batch_names_that_prompt(pipe):
    """Regulation's error names the prompt of a batch a target is missing from; Attend-and-Excite's did not."""
    call = {"prompt": [PROMPT, "a green triangle and a green square"], "num_inference_steps": 2}
    with pytest.raises(AttnscopeError, match=r"prompt 1 of 2 \('a green triangle and a green square'\): target "
                                             r"'circle' is not in the prompt.*as a function of the prompt"):
        AttendAndExcite(["circle", "square"]).prepare(pipe, call)


def test_a_reweighted_trace_records_the_scaled_attention(pipe, tmp_path):
    """Not a fix: pins that a Recorder beside Reweight stores what the model computed. At step 0 the first site
    (its input is not yet changed by any edit) records exactly factor times the plain run's "square" column and the
    plain run's other columns; a word given twice is scaled once; the manifest params rebuild it."""
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=2)
    first = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    plain = tr.attention(first).isel(step=0).values.astype(np.float64)
    square = tr.words["square"]
    for name, client in (("x3", Reweight("square", 3.0)), ("twice", Reweight(["square", "square"], 3.0))):
        out = ats.rerun(tr, [client], store=tmp_path / f"{name}.zarr")
        got = out.attention(first).isel(step=0).values.astype(np.float64)
        np.testing.assert_allclose(got[..., square], 3.0 * plain[..., square], rtol=2e-3)   # float16 storage
        others = [i for i in range(plain.shape[-1]) if i not in square]
        np.testing.assert_allclose(got[..., others], plain[..., others], rtol=2e-3, atol=1e-6)
        assert repr(Reweight(**out.manifest["interventions"][0]["params"])) == repr(client)
