"""Audit of the statistics as a user meets them: site predicates as capture takes them, repeated targets,
hand-computed values on small made-up maps, NaN (gated) maps, one-step and batched traces, bad inputs."""

import math

import numpy as np
import pytest
import xarray as xr

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.store import SITE_DIMS
from attnscope.testing import tiny_sd3_pipeline

SOT, EOT = "<|startoftext|>", "<|endoftext|>"

# the predicates docs/capture.md shows, and ones on the other fields of a CrossAttentionSite
PREDICATES = {
    "level 1": lambda site: site.level == 1,
    "up block": lambda s: s.block == "up",
    "cross, deep": lambda s: s.kind == "cross" and s.depth >= 3,
    "family and widths": lambda s: (s.family == "unet" and s.level == 2 and s.heads * s.head_dim == 64
                                    and s.token_dim > 0 and s.text_layout == "" and s.patch == 1),
}


@pytest.fixture(scope="module")
def shapes_trace(shapes, tmp_path_factory):
    return ats.capture(shapes, "a red circle and a blue square", seed=0, num_inference_steps=6,
                       store=tmp_path_factory.mktemp("pred") / "all.zarr", output_change=True)


def _captured_sites(pipe, predicate, tmp_path, **run):
    """The sites capture records for ``sites=predicate``: what every statistic must select with it."""
    tr = ats.capture(pipe, "a red circle and a blue square", seed=0, store=tmp_path / "pred.zarr", sites=predicate,
                     overwrite=True, **run)
    return tr.sites


@pytest.mark.parametrize("label", list(PREDICATES))
def test_a_capture_site_predicate_selects_the_same_sites_in_every_statistic(shapes, shapes_trace, tmp_path, label):
    """sites=lambda site: site.level == 1 works in capture, whose predicate gets a CrossAttentionSite; the statistics
    gave it an object with only .name and raised. They must select the sites capture records."""
    predicate = PREDICATES[label]
    want = _captured_sites(shapes, predicate, tmp_path, num_inference_steps=2)
    assert 0 < len(want) < len(shapes_trace.sites)
    tr = shapes_trace
    targets = ["red circle", "blue square"]
    layout = {"a red circle": (0, 0, 0.5, 1), "a blue square": (0.5, 0, 1, 1)}
    got = {
        "dominance": ats.stats.dominance(tr, targets, sites=predicate),
        "map_shape": ats.stats.map_shape(tr, targets, sites=predicate),
        "region_share": ats.stats.region_share(tr, layout, sites=predicate),
        "convergence (maps)": ats.stats.convergence(tr, sites=predicate, of="maps"),
        "convergence (outputs)": ats.stats.convergence(tr, sites=predicate, of="outputs"),
        # the arrays as Trace.attention gives them: their attrs describe the site
        "dominance of arrays": ats.stats.dominance({n: tr.attention(n) for n in tr.sites}, targets, sites=predicate),
        "convergence of arrays": ats.stats.convergence({n: tr.attention(n) for n in tr.sites}, sites=predicate),
    }
    for what, ds in got.items():
        assert ds["site"].values.tolist() == want, what
    # the early-warning features average over the chosen sites: the same numbers as with the names
    by_predicate = ats.stats.neglect_features(tr, targets, step=3, sites=predicate)
    by_names = ats.stats.neglect_features(tr, targets, step=3, sites=want)
    xr.testing.assert_identical(by_predicate, by_names)
    assert (ats.stats.suggest_gate_step(tr, tol=0.5, sites=predicate)
            == ats.stats.suggest_gate_step(tr, tol=0.5, sites=want))


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3_pipeline()


def test_a_predicate_on_joint_sites_of_a_transformer(sd3_pipe, tmp_path):
    """SD3's joint sites: kind 'joint', block 'double', a text layout; the statistics see them as capture does."""
    pipe = sd3_pipe
    run = dict(num_inference_steps=2, height=32, width=32)
    predicate = lambda s: s.kind == "joint" and s.text_layout == "image_first" and s.depth == 1  # noqa: E731
    want = _captured_sites(pipe, predicate, tmp_path, **run)
    tr = ats.capture(pipe, "a red circle and a blue square", seed=0, store=tmp_path / "all.zarr", **run)
    assert len(want) == 1 and len(tr.sites) > 1
    assert ats.stats.dominance(tr, ["circle"], sites=predicate)["site"].values.tolist() == want


def test_a_predicate_on_arrays_without_descriptions_still_says_it_sees_names_only():
    maps = xr.DataArray(np.full((1, 1, 1, 2, 2, 3), 0.25), dims=SITE_DIMS,
                        coords={"token_text": ("token", [SOT, "circle</w>", EOT])})
    with pytest.raises(AttnscopeError, match=r"sites=.*'level'.*name only"):
        ats.stats.dominance({"up_blocks.0.attn2": maps}, ["circle"], sites=lambda s: s.level == 1)


def test_a_misspelt_attribute_lists_what_a_site_has(shapes_trace):
    with pytest.raises(AttnscopeError, match=r"sites=.*'levle'.*a site has: name, family, kind, block, level"):
        ats.stats.dominance(shapes_trace, ["circle"], sites=lambda s: s.levle == 1)


# ----------------------------------------------------------------------------- a target listed twice

TWO = [SOT, "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "red</w>", "circle</w>", EOT]
#          SOT   a    red  circ and  a    red  circ EOT     (four pixels of a 2 x 2 map)
TWO_PIX = [[0.4, 0.0, 0.1, 0.4, 0.0, 0.0, 0.0, 0.1, 0.0],   # top-left: the first circle
           [0.4, 0.1, 0.0, 0.3, 0.0, 0.0, 0.1, 0.1, 0.0],   # top-right
           [0.5, 0.0, 0.0, 0.1, 0.1, 0.0, 0.1, 0.2, 0.0],   # bottom-left
           [0.4, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.5, 0.0]]   # bottom-right: the second circle


def two_circles(samples=1):
    a = np.asarray(TWO_PIX, float).reshape(1, 1, 1, 2, 2, len(TWO)).repeat(samples, 1)
    return xr.DataArray(a, dims=SITE_DIMS, name="site", coords={"step": [0], "token_text": ("token", TWO)})


def test_a_target_listed_twice_is_its_first_and_its_second_occurrence():
    """"a red circle and a red circle": targets=["red circle", "red circle"] gave both entries the merged share of
    both circles (and two equal labels), so the ratio was 1 whatever the maps. The k-th listing is the k-th
    occurrence, as AttentionRegulation takes a repeated word."""
    ds = ats.stats.dominance(two_circles(), targets=["red circle", "red circle"])
    # word masses by column: a .1, red .1, circle .8, and .1, a .1, red .2, circle .9 -> 2.3 over the words
    words = 2.3
    np.testing.assert_allclose(ds.target_share.isel(step=0, site=0, sample=0), [0.9 / words, 1.1 / words])
    assert ds["target"].values.tolist() == ["red circle #1", "red circle #2"]
    assert one_value(ds, "dominance_ratio") == pytest.approx(1.1 / 0.9)
    assert ds.target_tokens.isel(sample=0).sel(token=[2, 3, 6, 7]).values.tolist() == [
        [True, True, False, False], [False, False, True, True]]
    # a word alone names every occurrence, a word listed twice its occurrences one by one
    both = ats.stats.dominance(two_circles(), targets=["circle", "red"])
    np.testing.assert_allclose(both.target_share.isel(step=0, site=0, sample=0), [1.7 / words, 0.3 / words])
    apart = ats.stats.dominance(two_circles(), targets=["Circle", "circle", "red"])
    np.testing.assert_allclose(apart.target_share.isel(step=0, site=0, sample=0),
                               [0.8 / words, 0.9 / words, 0.3 / words])


def test_a_repeated_target_on_sd3_is_the_k_th_occurrence_in_each_copy_of_the_prompt(sd3_pipe, tmp_path):
    """SD3 spells the prompt twice (CLIP, then T5 from position 77): the k-th listing is the k-th occurrence in each."""
    tr = ats.capture(sd3_pipe, "a red circle and a blue circle", seed=0, store=tmp_path / "a.zarr", tokens="prompt",
                     num_inference_steps=2, height=32, width=32)
    ds = ats.stats.dominance(tr, ["circle", "circle", "blue circle"])
    member = ds.target_tokens.isel(sample=0)
    chosen = {str(t): ds.token.values[member.sel(target=t).values].tolist() for t in ds.target.values}
    assert chosen == {"circle #1": [3, 79], "circle #2": [7, 83], "blue circle": [6, 7, 82, 83]}


def test_a_target_listed_more_often_than_it_occurs_is_an_error():
    with pytest.raises(AttnscopeError, match=r"target 'circle' is listed 3 times but occurs 2 time\(s\) in the prompt"):
        ats.stats.dominance(two_circles(), targets=["circle", "circle", "circle"])
    with pytest.raises(AttnscopeError, match=r"target 3 is listed 2 times"):
        ats.stats.dominance(two_circles(), targets=[3, 3])


def test_map_shape_and_the_early_warning_tell_two_identical_objects_apart():
    """neglect_features(["red circle", "red circle"]) for two identical objects compared an object with itself:
    share_ratio 1, overlap 1, centre_dist 0 whatever the maps."""
    shape = ats.stats.map_shape(two_circles(), ["red circle", "red circle"])
    assert shape["pair"].values.tolist() == ["red circle #1|red circle #2"]
    # circle 1's map (red + circle): .5 .3 / .1 0 ; circle 2's: .1 .2 / .3 .5 (x right, y down)
    a, b = np.array([[0.5, 0.3], [0.1, 0.0]]), np.array([[0.1, 0.2], [0.3, 0.5]])
    a, b = a / a.sum(), b / b.sum()
    centre = np.array([0.25, 0.75])
    ca = np.array([(a.sum(0) * centre).sum(), (a.sum(1) * centre).sum()])
    cb = np.array([(b.sum(0) * centre).sum(), (b.sum(1) * centre).sum()])
    assert float(shape.overlap.squeeze()) == pytest.approx(np.minimum(a, b).sum())
    f = ats.stats.neglect_features(two_circles(), ["red circle", "red circle"], step=0)
    assert float(f.share_ratio[0]) == pytest.approx(0.9 / 1.1)
    assert float(f.share_min[0]) == pytest.approx(0.9 / 2.3)
    assert float(f.overlap[0]) == pytest.approx(np.minimum(a, b).sum())
    assert float(f.centre_dist[0]) == pytest.approx(np.hypot(*(ca - cb)))
    risk = ats.stats.neglect_risk(two_circles(), ["red circle", "red circle"], step=0)
    assert 0 < float(risk[0]) < 1


def one_value(ds, var):
    return float(ds[var].isel(step=0, site=0, sample=0))


# ----------------------------------------------------------------------------- bad inputs, one clear error each

TOKS = [SOT, "red</w>", "circle</w>", "square</w>", EOT]


def small_maps(steps=2):
    a = np.full((steps, 1, 1, 1, 2, len(TOKS)), 0.2)
    return xr.DataArray(a, dims=SITE_DIMS, name="site", coords={"step": np.arange(steps), "token_text": ("token", TOKS)})


def test_a_mapping_of_plain_arrays_is_refused_naming_the_site():
    """{name: numpy array} raised AttributeError: 'numpy.ndarray' object has no attribute 'dims'."""
    for stat in (lambda src: ats.stats.dominance(src, ["red"]), lambda src: ats.stats.convergence(src)):
        with pytest.raises(AttnscopeError, match=r"site 'up\.attn2': a ndarray; expected an xarray\.DataArray with "
                                                 r"dims \(step, sample, head, y, x, token\)"):
            stat({"up.attn2": small_maps().values})


def test_maps_without_a_step_are_refused():
    """An array with no step (an empty selection) raised IndexError from torch deep in the reduction."""
    empty = small_maps().isel(step=[])
    with pytest.raises(AttnscopeError, match=r"site 'site': the array has no step"):
        ats.stats.dominance(empty, ["red"])
    with pytest.raises(AttnscopeError, match=r"site 'site': the array has no step"):
        ats.stats.map_shape(empty, ["red"])


def test_include_special_must_be_a_bool():
    """include_special="no" was taken as True (a non-empty string)."""
    with pytest.raises(AttnscopeError, match=r"include_special='no': expected True or False"):
        ats.stats.dominance(small_maps(), ["red"], include_special="no")


@pytest.mark.parametrize("step", [0.5, True, "1", [0, 1.5], None])
def test_the_early_warning_step_must_be_steps(step):
    """step=0.5 and step=True raised TypeError ('float' object is not iterable); step="1" was read as [1] ("12" as
    steps 1 and 2)."""
    with pytest.raises(AttnscopeError, match=r"step=.*: expected a step \(an int\) or a list of steps"):
        ats.stats.neglect_features(small_maps(), ["red", "circle"], step=step)


def test_the_risk_takes_numpy_ints_as_the_features_do():
    """neglect_features(step=np.int64(1)) works, neglect_risk(step=np.int64(1)) said 'expected an int'."""
    model = {"features": list(ats.stats.NEGLECT_FEATURES),
             "steps": {"1": {"mean": [0.0] * 11, "std": [1.0] * 11, "weights": [0.5] + [0.0] * 11}}}
    risk = ats.stats.neglect_risk(small_maps(), ["red", "circle"], step=np.int64(1), model=model)
    assert float(risk[0]) == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert risk.attrs["step"] == 1 and type(risk.attrs["step"]) is int


@pytest.mark.parametrize("model", ["neglect_risk.json", ["weights"], 3])
def test_a_model_that_is_not_a_dict_is_named_in_the_error(model):
    """model="x" said "step=5: the risk model has weights for steps []": the step was blamed, not the model."""
    with pytest.raises(AttnscopeError, match=r"model=.*: expected a risk model: a dict with 'features' and 'steps'"):
        ats.stats.neglect_risk(small_maps(), ["red", "circle"], step=1, model=model)


def test_arrays_of_a_trace_captured_with_a_step_subset_know_the_runs_steps(sd_pipe, tmp_path):
    """Given a trace's arrays instead of the trace, the run's length came from the last captured step: a 4-step run
    captured at steps 0 and 1 was taken for a 2-step one ("outside this run's steps 0..1"), and step=-1 meant 1."""
    tr = ats.capture(sd_pipe, "a red circle and a blue square", seed=0, store=tmp_path / "a.zarr", steps=[0, 1],
                     num_inference_steps=4, height=32, width=32)
    arrays = {s: tr.attention(s) for s in tr.sites}
    for source in (tr, arrays):
        with pytest.raises(AttnscopeError, match=r"steps \[3\] are not in this trace .* captured steps: \[0, 1\]"):
            ats.stats.neglect_risk(source, ["red circle", "blue square"], step=3)
        with pytest.raises(AttnscopeError, match=r"steps \[3\] are not in this trace"):
            ats.stats.dominance(source, ["red circle", "blue square"], steps=-1)
