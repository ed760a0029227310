"""Interventions used the way a demanding user uses them: reused across runs, rebuilt from their records, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.regulate import AttendAndExcite, AttentionRegulation, Reweight, SpatialTemporal, TGate, risk_above

PROMPT = "a red circle and a blue square"
OTHERS = ["a green triangle and a red square", "a blue circle and a green square"]
PHRASES = ["red circle", "blue square"]


def _phrases(prompt: str) -> list[str]:
    """The two object phrases of "a <colour> <shape> and a <colour> <shape>"."""
    words = prompt.split()
    return [" ".join(words[1:3]), " ".join(words[-2:])]


def _nouns(prompt: str) -> list[str]:
    words = prompt.split()
    return [words[2], words[-1]]


def _regulation() -> AttentionRegulation:
    return AttentionRegulation(_nouns, steps=None, iterations=2, when=risk_above(0.0, step=1, targets=_phrases))


def _live(pipe, reg, prompts):
    with ats.hooks(pipe, reg):
        pipe(
            prompts,
            num_inference_steps=4,
            generator=[torch.Generator().manual_seed(s) for s in range(len(prompts))],
            output_type="latent",
        )


# -- when=risk_above: decisions taken from a trace belong to the rerun of that trace -----------------------------
def test_a_gate_decided_from_a_trace_judges_later_runs_live(shapes, tmp_path):
    tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=4)
    reg = _regulation()
    rerun = ats.rerun(tr, [reg], store=tmp_path / "b.zarr")
    assert rerun.manifest["interventions"][0]["params"]["when"]["decided_from_trace"] is True
    prompts = [PROMPT, *OTHERS]
    _live(shapes, reg, prompts)  # three samples: the trace's one decision must not be applied to them
    fresh = _regulation()
    _live(shapes, fresh, prompts)
    assert len(reg.when.risk) == 3 and reg.when.risk == pytest.approx(fresh.when.risk, abs=1e-6)
    assert reg.when.at_risk == fresh.when.at_risk
    assert "decided_from_trace" not in reg.describe()["params"]["when"]


def test_decisions_from_a_trace_refuse_a_run_of_another_batch(shapes, tmp_path):
    tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=4)
    reg = _regulation()
    reg.decide_from_trace(tr)
    with pytest.raises(AttnscopeError, match=r"decided from a stored run of 1 sample.*this run has 3"):
        _live(shapes, reg, [PROMPT, *OTHERS])


def test_risk_above_refuses_targets_that_cannot_be_two_phrases():
    with pytest.raises(AttnscopeError, match=r"targets='circle'.*two or more object phrases"):
        risk_above(0.3, targets="circle")
    with pytest.raises(AttnscopeError, match=r"targets=\['circle'\].*two or more object phrases"):
        risk_above(0.3, targets=["circle"])
    risk_above(0.3, targets=PHRASES), risk_above(0.3, targets=_phrases), risk_above(0.3)  # accepted


# -- bad numbers: one clear error naming the input -----------------------------------------------------------------
@pytest.mark.parametrize("weights", [math.nan, math.inf, [[1.0, math.nan], [1.0, 1.0]]])
def test_spatial_weights_that_are_not_finite_are_refused(weights):
    with pytest.raises(AttnscopeError, match=r"weights=.*expected finite"):
        SpatialTemporal(weights=weights)


def test_spatial_layout_keys_must_be_phrases():
    with pytest.raises(AttnscopeError, match=r"layout key 3: expected an object phrase"):
        SpatialTemporal({"a red circle": (0.0, 0.0, 0.5, 1.0), 3: (0.5, 0.0, 1.0, 1.0)})


@pytest.mark.parametrize("name", ["step_size", "temperature", "sigma"])
@pytest.mark.parametrize("value", [True, math.inf, math.nan, 0, "1"])
def test_excite_numbers_must_be_positive_and_finite(name, value):
    with pytest.raises(AttnscopeError, match=rf"{name}={value!r}: expected a positive finite number"):
        AttendAndExcite(["circle", "square"], **{name: value})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop_guidance": "no"}, r"drop_guidance='no': expected True or False"),
        ({"drop_guidance": 0}, r"drop_guidance=0: expected True or False"),
        ({"tol": -0.1}, r"tol=-0.1: expected a positive finite number"),
        ({"tol": "0.05"}, r"tol='0.05': expected a positive finite number"),
    ],
)
def test_tgate_flags_and_tolerance_are_checked(kwargs, message):
    with pytest.raises(AttnscopeError, match=message):
        TGate(10, **kwargs)


# -- reprs that say what the object does, and rebuild it -------------------------------------------------------------
def _namespace():
    return {
        "TGate": TGate,
        "Reweight": Reweight,
        "AttendAndExcite": AttendAndExcite,
        "SpatialTemporal": SpatialTemporal,
        "slice": slice,
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda: TGate(10),
        lambda: TGate(0.4),
        lambda: TGate(8, sp_interval=3, warm_up=1, fi_interval=2),
        lambda: TGate(8, drop_guidance=False),
        lambda: Reweight("square", 2.0),
        lambda: Reweight(["red", "square"], 0.5, sites="up_blocks.*", steps=slice(0, 3)),
        lambda: AttendAndExcite(["circle", "square"]),
        lambda: AttendAndExcite(["circle", "square"], steps=[0, 1], step_size=5.0, max_refinement=2),
        lambda: SpatialTemporal(),
        lambda: SpatialTemporal({"a red circle": (0.0, 0.0, 0.5, 1.0)}, weights=0.5, radius=0.1, steps=slice(0, 2)),
    ],
)
def test_repr_rebuilds_an_equal_intervention(make):
    obj = make()
    again = eval(repr(obj), _namespace())  # noqa: S307 - the repr of our own object
    assert again.describe() == obj.describe(), repr(obj)


def test_tgate_repr_names_v2_and_the_ablation():
    assert repr(TGate(10)) == "TGate(10)"
    assert repr(TGate(8, sp_interval=3)) == "TGate(8, sp_interval=3)"
    assert repr(TGate(8, drop_guidance=False)) == "TGate(8, drop_guidance=False)"


def test_tgate_rebuilt_from_its_description_gates_the_same_steps(shapes):
    """A manifest's description (a fraction resolved for its run) rebuilds a gate that gates the same steps."""
    for gate in (TGate(0.4), TGate(3, sp_interval=2, warm_up=1), TGate(2, drop_guidance=False)):
        with ats.hooks(shapes, gate):
            shapes(PROMPT, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="latent")
        again = TGate.from_description(gate.describe())
        with ats.hooks(shapes, again):
            shapes(PROMPT, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="latent")
        assert again.gated_steps == gate.gated_steps and again.computed == gate.computed
        assert again.describe() == gate.describe()
    with pytest.raises(AttnscopeError, match="expected a TGate description"):
        TGate.from_description({"name": "Reweight", "params": {}})


def test_reweight_params_rebuild_it():
    rw = Reweight("square", 2.0, steps=slice(-2, None))
    assert Reweight(**rw.describe()["params"]).describe() == rw.describe()


def test_one_tgate_serves_runs_of_other_batches_and_lengths(shapes):
    """Reused across runs, a gate's cache is the run's own: a sample is what a fresh gate makes of it."""
    gate = TGate(0.5)

    def run(g, prompts, steps):
        with ats.hooks(shapes, g):
            return shapes(
                prompts,
                num_inference_steps=steps,
                output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in range(len(prompts))],
            ).images

    run(gate, [PROMPT, *OTHERS], 6)
    reused = run(gate, [PROMPT], 4)
    np.testing.assert_array_equal(reused, run(TGate(0.5), [PROMPT], 4))
    assert gate.gated_steps == [2, 3]


def test_risk_above_refuses_a_model_that_is_not_a_risk_model_for_its_step():
    """`risk_above(0.3, model="x")` was accepted and failed only at the run's decision step, inside neglect_risk."""
    with pytest.raises(ats.AttnscopeError, match=r"model='x': expected a risk model"):
        ats.regulate.risk_above(0.3, model="x")
    shipped = ats.stats.neglect_model()
    without_7 = {**shipped, "steps": {k: v for k, v in shipped["steps"].items() if k != "7"}}
    with pytest.raises(ats.AttnscopeError, match=r"risk_above: the model has no weights for step 7"):
        ats.regulate.risk_above(0.3, step=7, model=without_7)
    ats.regulate.risk_above(0.3, step=7, model=ats.stats.neglect_model())


@pytest.mark.parametrize("break_it, expected", [
    (lambda m: m["steps"]["5"].pop("std"), r"step 5: expected 'mean', 'std' and 'weights'"),
    (lambda m: m["steps"]["5"].update(mean=[0.0]), r"step 5: expected mean and std of 11 values and 12 weights"),
    (lambda m: m.update(features=["x"]), r"model\['features'\] = \['x'\]"),
    (lambda m: m["steps"]["5"]["std"].__setitem__(0, 0.0), r"step 5: its std must be positive and finite"),
    (lambda m: m["steps"]["5"]["weights"].__setitem__(3, float("nan")), r"step 5: .* not finite"),
    (lambda m: m["steps"]["5"]["weights"].__setitem__(3, "a"), r"step 5: expected numbers"),
])
def test_risk_above_refuses_a_malformed_risk_model_when_made(break_it, expected):
    """A model whose step-5 entry lacked 'std' was accepted by risk_above and raised KeyError('std') in the middle
    of the generation, at the decision step; wrong features or shapes likewise failed only then."""
    model = ats.stats.neglect_model()
    break_it(model)
    with pytest.raises(ats.AttnscopeError, match=expected):
        ats.regulate.risk_above(0.3, step=5, model=model)
