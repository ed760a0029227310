"""One step-spec parser for capture, statistics, plots and interventions: the same spec means the same steps."""

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.selection import index_positions, parse_step_text, select_captured_steps, select_steps

STEPS = 6
RUN = dict(num_inference_steps=STEPS, height=32, width=32)


@pytest.mark.parametrize("spec, expected", [
    (None, (0, 1, 2, 3, 4, 5)),
    (-1, (5,)),
    (0, (0,)),
    (slice(-3, None), (3, 4, 5)),
    (slice(None, 3), (0, 1, 2)),
    (slice(None, None, 2), (0, 2, 4)),
    (range(1, 3), (1, 2)),
    ([4, -1, 4], (4, 5)),
    (np.arange(2, 4), (2, 3)),
    (np.int64(-2), (4,)),
])
def test_select_steps_counts_the_run(spec, expected):
    assert select_steps(spec, STEPS) == expected


@pytest.mark.parametrize("spec, message", [
    (6, r"steps: \[6\] outside this run's steps 0..5"),
    (-7, r"steps: \[-7\] outside"),
    ("first", "expected an int, range, slice or list of ints"),
    (True, "expected an int, range, slice or list of ints"),
    ([1.5], "expected integers"),
    ([], "selects no step"),
])
def test_select_steps_refuses_what_it_cannot_resolve(spec, message):
    with pytest.raises(ats.AttnscopeError, match=message):
        select_steps(spec, STEPS)


def test_captured_steps_must_be_in_the_trace():
    assert select_captured_steps(-1, [0, 5], STEPS, "up") == [5]
    with pytest.raises(ats.AttnscopeError, match=r"steps \[4\] are not in this trace at up"):
        select_captured_steps([4], [0, 5], STEPS, "up")


@pytest.mark.parametrize("text, spec", [("-3:", slice(-3, None)), ("1:5:2", slice(1, 5, 2)), ("0,-1", [0, -1]),
                                        (":2", slice(None, 2))])
def test_command_line_text_becomes_the_same_spec(text, spec):
    assert parse_step_text(text) == spec


def test_command_line_text_errors_name_the_option():
    with pytest.raises(ats.AttnscopeError, match="--capture-steps '1:2:3:4'"):
        parse_step_text("1:2:3:4", "--capture-steps")


@pytest.mark.parametrize("text", ["1,,2", "", "0,", " , "])
def test_an_empty_list_item_is_an_error_not_skipped(text):
    with pytest.raises(ats.AttnscopeError, match="--steps .*comma-separated list of ints"):
        parse_step_text(text)


def test_numpy_integer_targets_are_token_positions():
    """An np.int64 position (a .values item) was passed through as an unresolved target, then refused."""
    kept = [0, 1, 2, 77, 78]
    assert index_positions([np.int64(78), "red", np.int32(1)], kept) == [4, "red", 1]
    assert all(type(t) is int for t in index_positions([np.int64(78), np.uint8(2)], kept))
    assert index_positions([True], kept) == [True]  # a bool is no position: resolve_targets refuses it
    with pytest.raises(ats.AttnscopeError, match="target 3: token position not on this trace's token axis"):
        index_positions([np.int64(3)], kept)


def _latents(pipe, *clients):
    """The latents after every step of one seeded run, with ``clients`` installed."""
    seen = []

    def keep(pipe_, step, timestep, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    with ats.hooks(pipe, *clients):
        pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0),
             callback_on_step_end=keep, output_type="latent", **RUN)
    return seen


@pytest.mark.parametrize("spec", [-1, slice(-3, None), [1, -2], slice(None, None, 2), range(2, 4), 3])
def test_an_intervention_acts_exactly_at_the_steps_capture_would_record(sd_pipe, spec):
    """Reweight(steps=spec) leaves every step before the first selected one bit-identical and changes that one."""
    plain = _latents(sd_pipe)
    edited = _latents(sd_pipe, ats.regulate.Reweight("square", 4.0, steps=spec))
    first = select_steps(spec, STEPS)[0]
    for step in range(first):
        assert torch.equal(edited[step], plain[step]), f"steps={spec!r} changed step {step}"
    assert not torch.equal(edited[first], plain[first]), f"steps={spec!r} did not act at step {first}"


@pytest.mark.parametrize("spec", [-1, slice(-3, None), [1, -2]])
def test_an_intervention_is_active_at_the_selected_steps_only(sd_pipe, spec):
    active: list[int] = []
    reweight = ats.regulate.Reweight("square", 2.0, steps=spec)

    class Spy:  # asks the intervention at every call which steps it acts at
        def stages(self, ctx):
            if reweight.stages(ctx) and ctx.step not in active:
                active.append(ctx.step)
            return ()

    _latents(sd_pipe, reweight, Spy())
    assert tuple(active) == select_steps(spec, STEPS)


def test_first_half_and_unknown_specs_of_an_intervention(sd_pipe):
    scope = ats.regulate.InterventionScope("square", steps="first_half")
    assert scope.steps_of_run(STEPS) == (0, 1, 2) and scope.steps_of_run(5) == (0, 1, 2)
    with pytest.raises(ats.AttnscopeError, match=r"steps: \[9\] outside this run's steps 0..5"):
        _latents(sd_pipe, ats.regulate.Reweight("square", 2.0, steps=9))


def test_capture_stats_and_plots_read_the_same_spec(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, "a red circle and a blue square", seed=0, store=tmp_path / "a.zarr",
                     steps=slice(-3, None), sites="up_blocks.1.*", **RUN)
    site = tr.sites[0]
    assert tr.attention(site)["step"].values.tolist() == [3, 4, 5]
    ds = ats.stats.dominance(tr, ["circle", "square"], steps=-1)
    assert ds["step"].values.tolist() == [5]
    last_two = ats.stats.dominance(tr, ["circle", "square"], steps=slice(-2, None))
    assert last_two["step"].values.tolist() == [4, 5]
    np.testing.assert_array_equal(last_two.target_share.sel(step=5).values, ds.target_share.sel(step=5).values)
    fig = ats.plot.heatmaps(tr, ["circle"], steps=-1)
    assert fig.axes
    with pytest.raises(ats.AttnscopeError, match=r"steps \[0\] are not in this trace"):
        ats.stats.dominance(tr, ["circle"], steps=0)
