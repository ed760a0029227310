"""Dominance statistics and convergence against values computed by hand on small made-up maps."""

import math

import numpy as np
import pytest
import xarray as xr

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.store import SITE_DIMS

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
TOKS = [SOT, "red</w>", "circle</w>", "square</w>", EOT]
# two pixels (y=1, x=2); columns: SOT, red, circle, square, EOT
PIX = [[0.5, 0.1, 0.3, 0.1, 0.0],
       [0.2, 0.2, 0.2, 0.4, 0.0]]


def maps_da(pixels, tokens=TOKS, steps=1, name="site"):
    """(step, sample=1, head=1, y=1, x=n, token) DataArray of the same pixels at every step."""
    a = np.asarray(pixels, float)[None, None, None, None].repeat(steps, 0)
    return xr.DataArray(a, dims=SITE_DIMS, name=name,
                        coords={"step": np.arange(steps), "token_text": (("sample", "token"), [tokens])})


def one(ds, var, **sel):
    return float(ds[var].isel(step=0, site=0, sample=0).sel(**sel)) if sel else float(ds[var].isel(step=0, site=0, sample=0))


def test_mass_share_ratio_entropy_gini_sink_coverage_by_hand():
    ds = ats.stats.dominance(maps_da(PIX), targets=["red", "circle"])
    # word masses: red 0.1+0.2, circle 0.3+0.2, square 0.1+0.4 -> 0.3, 0.5, 0.5 of 1.3
    assert list(ds.token.values) == [1, 2, 3] and list(ds.word.values) == ["red", "circle", "square"]
    np.testing.assert_allclose(ds.mass_share.isel(step=0, site=0, sample=0), [0.3 / 1.3, 0.5 / 1.3, 0.5 / 1.3])
    assert one(ds, "dominance_ratio") == pytest.approx(0.5 / 0.3)
    np.testing.assert_allclose(ds.target_share.isel(step=0, site=0, sample=0), [0.3 / 1.3, 0.5 / 1.3])
    # entropy: pixel 1 over words (0.1, 0.3, 0.1)/0.5, pixel 2 (0.2, 0.2, 0.4)/0.8
    h1 = -(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6))
    h2 = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert one(ds, "entropy") == pytest.approx((h1 + h2) / 2)
    # Gini of (3, 5, 5)/13: sum over ordered pairs |mi - mj| = 8/13, over 2 * 3 * 1
    assert one(ds, "gini") == pytest.approx((8 / 13) / 6)
    # sink: 2.0 total mass, 1.3 on words
    assert one(ds, "sink_share") == pytest.approx(1 - 1.3 / 2)
    # argmax over words: pixel 1 -> circle, pixel 2 -> square
    np.testing.assert_allclose(ds.argmax_coverage.isel(step=0, site=0, sample=0), [0.0, 0.5, 0.5])


def test_ties_single_target_and_a_zero_row():
    tied = ats.stats.dominance(maps_da(PIX), targets=["circle", "square"])
    assert one(tied, "dominance_ratio") == 1.0
    # an argmax tie (pixel 2: red = circle = 0.3) goes to the lower position
    cov = ats.stats.dominance(maps_da([[0.5, 0.1, 0.3, 0.1, 0.0], [0.1, 0.3, 0.3, 0.2, 0.1]]))
    np.testing.assert_allclose(cov.argmax_coverage.isel(step=0, site=0, sample=0), [0.5, 0.5, 0.0])
    single = ats.stats.dominance(maps_da(PIX), targets=["square"])
    assert math.isnan(one(single, "dominance_ratio"))
    assert one(single, "target_share", target="square") == pytest.approx(0.5 / 1.3)
    zero = ats.stats.dominance(maps_da([[1.0, 0, 0, 0, 0], [0.6, 0, 0, 0, 0.4]]), targets=["red", "square"])
    for var in ("dominance_ratio", "entropy", "gini"):
        assert math.isnan(one(zero, var)), var
    assert np.isnan(zero.mass_share).all() and np.isnan(zero.target_share).all()
    assert (zero.argmax_coverage == 0).all()
    assert one(zero, "sink_share") == 1.0
    # one target with all the mass, the other none: infinitely dominant
    inf = ats.stats.dominance(maps_da([[0.5, 0.5, 0, 0, 0], [0.5, 0.5, 0, 0, 0]]), targets=["red", "square"])
    assert one(inf, "dominance_ratio") == math.inf


def test_heads_are_averaged_before_the_statistics():
    other = np.array([[0.1, 0.5, 0.1, 0.3, 0.0], [0.0, 0.6, 0.2, 0.2, 0.0]])
    heads = np.stack([np.asarray(PIX), other]).reshape(1, 1, 2, 1, 2, 5)  # step, sample, head, y, x, token
    two = xr.DataArray(heads, dims=SITE_DIMS, coords={"step": [0], "token_text": (("sample", "token"), [TOKS])})
    mean = maps_da((np.asarray(PIX) + other) / 2)
    for var in ("mass_share", "entropy", "gini", "argmax_coverage"):
        np.testing.assert_allclose(ats.stats.dominance(two)[var], ats.stats.dominance(mean)[var])


def test_phrases_repeated_words_and_word_pieces():
    toks = [SOT, "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>", "squ", "are</w>", EOT, EOT]
    rng = np.random.default_rng(0)
    p = rng.random((6, len(toks)))
    p /= p.sum(-1, keepdims=True)
    ds = ats.stats.dominance(maps_da(p, toks), targets=["blue square", "a", "circle"])
    words = p[:, 1:9].sum(0)
    share = words / words.sum()  # positions 1..8
    expected = [share[5] + share[6] + share[7], share[0] + share[4], share[2]]
    np.testing.assert_allclose(ds.target_share.isel(step=0, site=0, sample=0), expected)
    assert list(ds.word.values) == ["a", "red", "circle", "and", "a", "blue", "square", "square"]
    with pytest.raises(AttnscopeError, match=r"'triangle' is not in the prompt; its words are: a, red, circle, and, blue, square"):
        ats.stats.dominance(maps_da(p, toks), targets=["triangle"])


def test_include_special_counts_sot_and_eot():
    ds = ats.stats.dominance(maps_da(PIX), targets=["circle"], include_special=True)
    assert list(ds.token.values) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(ds.mass_share.isel(step=0, site=0, sample=0), [0.35, 0.15, 0.25, 0.25, 0.0])


def test_prompts_that_differ_per_sample():
    other = [SOT, "red</w>", "triangle</w>", "square</w>", EOT]
    a = np.asarray(PIX, float)[None, None, None, None].repeat(2, 1)
    da = xr.DataArray(a, dims=SITE_DIMS, coords={"step": [0], "token_text": (("sample", "token"), [TOKS, other])})
    ds = ats.stats.dominance(da, targets=["circle", "square"])
    assert ds.word.dims == ("sample", "token") and list(ds.word.values[1]) == ["red", "triangle", "square"]
    share = ds.target_share.isel(step=0, site=0)
    assert share.values[0].tolist() == pytest.approx([0.5 / 1.3, 0.5 / 1.3])
    assert math.isnan(share.values[1][0]) and share.values[1][1] == pytest.approx(0.5 / 1.3)


def _sums_by_loops(maps, prompt, words):
    """map_sums of one (head, y, x, token) block, pixel by pixel in float64: the reference."""
    heads, tokens = maps.shape[0], maps.shape[-1]
    a = maps.astype(np.float64).reshape(heads, -1, tokens)
    sums, counts, ent, hit = a.sum((0, 1)) / heads, np.zeros(tokens), 0.0, 0
    for px in a.mean(0):
        on = px[prompt]
        if not on.sum() > 0:
            continue
        hit += 1
        counts[np.flatnonzero(prompt)[np.argmax(on)]] += 1  # np.argmax: the first maximum
        q = on / on.sum()
        ent -= sum(v * math.log(v) for v in q if v > 0)
    return np.concatenate([sums, counts, [ent, hit, a.shape[1], sums.sum()]])


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_map_sums_equal_a_pixel_by_pixel_loop(heads, dtype):
    from attnscope.stats._formulas import map_sums

    rng = np.random.default_rng(heads)
    maps = rng.random((2, 3, heads, 4, 5, 7))  # step, sample, head, y, x, token
    maps[0, 1] = np.round(maps[0, 1] * 2) / 2  # argmax ties
    maps[1, 0, ..., 2:5] = 0  # pixels with no mass on a sample's words
    maps = maps.astype(dtype)
    prompt = np.array([[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0]], bool)  # per sample
    words = prompt | np.eye(7, dtype=bool)[5]
    got = map_sums(maps, prompt[None], words[None])
    for step in range(2):
        for sample in range(3):
            want = _sums_by_loops(maps[step, sample], prompt[sample], words[sample])
            np.testing.assert_allclose(got[step, sample], want, rtol=2e-3 if dtype == np.float16 else 1e-5,
                                       err_msg=f"step {step}, sample {sample}")
    nan = maps.astype(np.float64)
    nan[1] = np.nan  # a gated step stored as NaN: its sums stay NaN, it counts no pixel
    out = map_sums(nan, prompt[None], words[None])
    assert np.isnan(out[1, :, -4]).all() and (out[1, :, 7:14] == 0).all() and (out[1, :, -3] == 0).all()


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    pipe = ats.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    d = tmp_path_factory.mktemp("stats")
    full = ats.capture(pipe, "a red circle and a blue square", seed=1, store=d / "full.zarr", num_inference_steps=12,
                       heads="all")
    cut = ats.capture(pipe, "a red circle and a blue square", seed=1, store=d / "cut.zarr", num_inference_steps=12,
                      heads="all", tokens="prompt")
    return full, cut


def test_store_in_many_chunks_equals_the_same_data_in_memory(traces):
    tr, _ = traces
    assert any(len(tr.attention(s).chunks[0]) > 1 for s in tr.sites)  # several step chunks on disk
    lazy = ats.stats.dominance(tr, targets=["circle", "square"])
    loaded = {s: tr.attention(s).load() for s in tr.sites}
    eager = ats.stats.dominance(loaded, targets=["circle", "square"])
    xr.testing.assert_allclose(lazy.drop_vars("timestep"), eager.drop_vars("timestep"))
    # and mass share from first principles with numpy
    site = tr.sites[3]
    a = loaded[site].values.astype(np.float64).mean(2).sum((2, 3))  # step, sample, token
    words = a[..., 1:8]
    np.testing.assert_allclose(lazy.mass_share.sel(site=site).values, words / words.sum(-1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("statistic", ["dominance", "region_share", "map_shape"])
def test_sites_read_whole_or_chunk_by_chunk_give_the_same_numbers(traces, statistic, monkeypatch):
    import attnscope.stats._sites as sites_module

    tr, _ = traces
    run = {"dominance": lambda: ats.stats.dominance(tr, targets=["circle", "square"]),
           "region_share": lambda: ats.stats.region_share(tr, {"a red circle": (0, 0, 0.5, 1), "a blue square": (0.7, 0.5)}),
           "map_shape": lambda: ats.stats.map_shape(tr, ["circle", "square"])}
    chunked = []
    original = sites_module._by_chunk
    monkeypatch.setattr(sites_module, "_by_chunk", lambda *a: chunked.append(1) or original(*a))
    whole = run[statistic]()  # the shapes model's sites are a few kB: read whole
    assert chunked == []
    monkeypatch.setattr(sites_module, "SMALL_SITE_BYTES", 0)
    by_chunk = run[statistic]()
    assert len(chunked) == len(tr.sites)
    xr.testing.assert_allclose(whole, by_chunk, rtol=1e-12, atol=0)
    assert whole.attrs == by_chunk.attrs and list(whole.coords) == list(by_chunk.coords)


def test_sites_with_different_steps_are_joined_on_the_union_of_steps(traces):
    tr, _ = traces
    a, b = tr.sites[:2]
    arrays = {a: tr.attention(a).isel(step=[0, 1, 2]), b: tr.attention(b).isel(step=[1, 2, 3])}
    ds = ats.stats.dominance(arrays, targets=["circle", "square"])
    assert ds.step.values.tolist() == [0, 1, 2, 3]
    assert np.isnan(ds.target_share.sel(site=a, step=3)).all() and np.isnan(ds.target_share.sel(site=b, step=0)).all()
    alone = ats.stats.dominance({b: arrays[b]}, targets=["circle", "square"])
    np.testing.assert_array_equal(ds.target_share.sel(site=b, step=[1, 2, 3]), alone.target_share.sel(site=b))


def test_sites_steps_selection_and_errors(traces):
    tr, _ = traces
    ds = ats.stats.dominance(tr, targets=["circle", "square"], sites="up_blocks.*", steps=[0, 5, 11])
    assert list(ds.step.values) == [0, 5, 11] and all(s.startswith("up_blocks.") for s in ds.site.values)
    assert "timestep" in ds.coords
    with pytest.raises(AttnscopeError, match="matches no cross-attention site"):
        ats.stats.dominance(tr, sites="nowhere.*")
    with pytest.raises(AttnscopeError, match=r"steps: \[40\] outside this run.s steps 0..11"):
        ats.stats.dominance(tr, steps=[0, 40])
    with pytest.raises(AttnscopeError, match="lacks"):
        ats.stats.dominance(xr.DataArray(np.zeros((2, 3)), dims=("y", "x")))
    with pytest.raises(AttnscopeError, match="expected a Trace"):
        ats.stats.dominance([1, 2])


def test_prompt_only_token_axis_keeps_the_sink_share(traces):
    full, cut = traces
    a = ats.stats.dominance(full, targets=["circle", "square"])
    b = ats.stats.dominance(cut, targets=["circle", "square"])
    assert full.attention(full.sites[0]).sizes["token"] == 16 and cut.attention(cut.sites[0]).sizes["token"] == 9
    np.testing.assert_allclose(a.sink_share, b.sink_share, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(a.mass_share, b.mass_share, atol=1e-6)


def test_convergence_on_a_hand_made_sequence():
    x = np.random.default_rng(1).random((1, 1, 1, 2, 2, 3))
    seq = np.concatenate([x, 2 * x, 2 * x, 2.02 * x])  # change 0.5, 0, 0.01 / 1.01
    moving = xr.DataArray(seq, dims=SITE_DIMS, coords={"step": np.arange(4)})
    still = xr.DataArray(np.repeat(x, 4, 0), dims=SITE_DIMS, coords={"step": np.arange(4)})
    ds = ats.stats.convergence({"moving": moving, "still": still}, tol=0.05)
    # computed in float32, like the float16 maps of a store
    np.testing.assert_allclose(ds.convergence.sel(site="moving", sample=0), [np.nan, 0.5, 0.0, 0.01 / 1.01], rtol=1e-6)
    np.testing.assert_allclose(ds.convergence.sel(site="still", sample=0), [np.nan, 0, 0, 0])
    np.testing.assert_allclose(ds.mean_convergence.sel(sample=0), [np.nan, 0.25, 0.0, 0.005 / 1.01], rtol=1e-6)
    assert int(ds.stable_step[0]) == 2 and ds.attrs["tol"] == 0.05
    assert int(ats.stats.convergence({"moving": moving}, tol=0.001).stable_step[0]) == -1
    with pytest.raises(AttnscopeError, match="tol=0"):
        ats.stats.convergence({"moving": moving}, tol=0)


def test_convergence_of_a_real_trace_settles(traces):
    tr, _ = traces
    ds = ats.stats.convergence(tr)
    curve = ds.mean_convergence.isel(sample=0).values
    assert np.isnan(curve[0]) and np.all(curve[1:] >= 0)
    assert curve[-3:].mean() < curve[1:4].mean()  # maps change less late in sampling


def test_target_resolution_edge_cases():
    from attnscope.tokens import resolve_targets, token_roles, token_words

    toks = [SOT, "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>", "squ", "are</w>", EOT, EOT]
    assert token_roles(toks) == ["sot"] + ["word"] * 8 + ["eot", "pad"]
    assert token_words(toks)[7:9] == ["square", "square"]
    assert resolve_targets(toks, "Blue SQUARE") == {"Blue SQUARE": [6, 7, 8]}      # case-insensitive, pieces merged
    with pytest.raises(AttnscopeError, match="'red square' is not in the prompt"):   # words, but not consecutive
        resolve_targets(toks, ["red square"])
    assert resolve_targets(toks, [0, 9]) == {"0": [0], "9": [9]}                     # positions reach SOT/EOT
    with pytest.raises(AttnscopeError, match="position out of range 0..10"):
        resolve_targets(toks, [11])
    with pytest.raises(AttnscopeError, match="expected a word, a phrase or a token position"):
        resolve_targets(toks, [True])
    with pytest.raises(AttnscopeError, match=r"targets=\[\]"):
        resolve_targets(toks, [])
    with pytest.raises(AttnscopeError, match="no token text"):
        resolve_targets([""] * 4, ["circle"])


def test_target_tokens_mark_each_targets_positions():
    toks = [SOT, "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>", "squ", "are</w>", EOT, EOT]
    p = np.full((2, len(toks)), 1 / len(toks))
    ds = ats.stats.dominance(maps_da(p, toks), targets=["blue square", "a"])
    mask = ds.target_tokens.isel(sample=0)
    assert ds.token.values[mask.sel(target="blue square").values].tolist() == [6, 7, 8]
    assert ds.token.values[mask.sel(target="a").values].tolist() == [1, 5]


# -- defects found by an audit (2026-12-06), each on a hand-made tensor ---------------------------------------
def _stored(a, texts, positions, **attrs):
    """A DataArray whose token coordinate holds the kept positions (a ``tokens="prompt"`` trace)."""
    return xr.DataArray(np.asarray(a, float), dims=SITE_DIMS, name="site", attrs=attrs,
                        coords={"step": np.arange(len(a)), "token": positions,
                                "token_text": (("sample", "token"), [texts])})


def test_int_targets_are_token_positions_of_the_token_coordinate():
    """On SD3's kept positions 0, 1, 2, 77, 78 the target 78 is the T5 "red"; it was read as an index (78 was out
    of range, 4 was accepted as "4")."""
    toks = [SOT, "red</w>", EOT, "▁red", "</s>"]
    a = np.zeros((1, 1, 1, 1, 2, 5))
    a[..., 0, :] = [0.1, 0.2, 0.1, 0.5, 0.1]  # pixel 0: T5 red has 0.5
    a[..., 1, :] = [0.3, 0.4, 0.1, 0.1, 0.1]
    da = _stored(a, toks, [0, 1, 2, 77, 78])
    ds = ats.stats.dominance(da, targets=["red", 77, 1])
    # mass shares over the words (positions 1 and 77): S = 0.6, 0.6
    assert ds.target.values.tolist() == ["red", "77", "1"]
    np.testing.assert_allclose(ds.target_share.isel(step=0, site=0, sample=0), [1.0, 0.5, 0.5])
    with pytest.raises(AttnscopeError, match=r"target 3: token position not on this trace's token axis; its "
                                             r"positions are 0–2, 77–78"):
        ats.stats.dominance(da, targets=[3])


def test_map_shape_reads_the_targets_columns_by_index_whatever_the_positions():
    """map_shape matched the resolved indices against the stored positions: on a cut token axis it dropped the
    T5 pieces (or read nothing: NaN)."""
    toks = [SOT, "red</w>", EOT, "▁red", "</s>"]
    a = np.zeros((1, 1, 1, 1, 2, 5))
    a[..., 0, 1] = 1.0   # CLIP red on pixel 0
    a[..., 1, 3] = 3.0   # T5 red on pixel 1
    shape = ats.stats.map_shape(_stored(a, toks, [0, 1, 2, 77, 78]), ["red"])
    # the map of "red" is [1, 3] over x centres 1/4, 3/4: centre (1/4 + 9/4) / 4 = 0.625; peak-to-mean 3 / 2
    assert float(shape.centre_x.squeeze()) == pytest.approx(0.625)
    assert float(shape.peak_to_mean.squeeze()) == pytest.approx(1.5)
    same = ats.stats.map_shape(_stored(a, toks, [0, 1, 2, 3, 4]), ["red"])
    assert float(same.centre_x.squeeze()) == pytest.approx(0.625)


def test_sink_share_of_a_cut_token_axis_counts_the_rows_total():
    """A cross site's row sums to 1; with the token axis cut to the prompt (the array's ``tokens`` attribute,
    as Trace.attention sets it) the sink share is over the pixel count, whether given as a trace or an array."""
    toks = [SOT, "red</w>", EOT]
    a = np.zeros((1, 1, 1, 1, 2, 3))
    a[..., 0, :] = [0.2, 0.3, 0.1]   # 0.4 of this row went to padding that was not kept
    a[..., 1, :] = [0.1, 0.5, 0.4]
    cut = ats.stats.dominance(_stored(a, toks, [0, 1, 2], tokens="prompt"))
    assert one(cut, "sink_share") == pytest.approx(1 - 0.8 / 2)
    kept = ats.stats.dominance(_stored(a, toks, [0, 1, 2]))      # no attribute: the stored columns are the total
    assert one(kept, "sink_share") == pytest.approx(1 - 0.8 / 1.6)


def test_argmax_coverage_is_nan_at_a_nan_map_like_every_other_statistic():
    a = np.zeros((2, 1, 1, 1, 2, 4))
    a[0, ..., 0, :] = [0.5, 0.3, 0.2, 0.0]
    a[0, ..., 1, :] = [0.5, 0.1, 0.4, 0.0]
    a[1] = np.nan                                                 # a gated step
    ds = ats.stats.dominance(maps_da_steps(a))
    assert ds.argmax_coverage.isel(step=0, site=0, sample=0).values.tolist() == [0.5, 0.5]
    assert np.isnan(ds.argmax_coverage.isel(step=1)).all() and np.isnan(ds.mass_share.isel(step=1)).all()
    np.testing.assert_allclose(ds.argmax_coverage.mean("step").squeeze(), [0.5, 0.5])  # not diluted to 0.25


def maps_da_steps(a):
    return xr.DataArray(a, dims=SITE_DIMS, coords={"step": np.arange(len(a)),
                                                    "token_text": (("sample", "token"), [[SOT, "red</w>", "circle</w>", EOT]])})


def test_convergence_of_chosen_steps_compares_with_the_previous_captured_step():
    x = np.random.default_rng(2).random((1, 1, 1, 2, 2, 3))
    seq = np.concatenate([x, 2 * x, 3 * x, 3.3 * x, 3.3 * x])   # changes 1/2, 1/3, 0.3/3.3, 0
    moving = xr.DataArray(seq, dims=SITE_DIMS, coords={"step": np.arange(5)})
    ds = ats.stats.convergence({"m": moving}, steps=[0, 2, 4])
    assert ds.step.values.tolist() == [0, 2, 4]
    np.testing.assert_allclose(ds.convergence.sel(site="m", sample=0), [np.nan, 1 / 3, 0.0], rtol=1e-6, atol=1e-7)


def test_top_share_takes_the_ceiling_of_the_exact_count():
    from attnscope.stats import top_share

    m = np.arange(100.0).reshape(10, 10)
    assert top_share(m, 0.07) == pytest.approx(sum(range(93, 100)) / m.sum())   # 7 pixels, not 8


# -- defects found by an audit (2026-12-07) -------------------------------------------------------------------
def test_numpy_integer_targets_are_positions_in_every_statistic():
    """np.int64(3) (a .values item) was refused as a target by dominance, map_shape and the accessor."""
    toks = [SOT, "red</w>", "circle</w>", "square</w>", EOT]
    da = maps_da(PIX, toks)
    by_int = ats.stats.dominance(da, targets=[2, 3])
    by_numpy = ats.stats.dominance(da, targets=[np.int64(2), np.int32(3)])
    assert by_numpy.target.values.tolist() == ["2", "3"]
    np.testing.assert_array_equal(by_numpy.target_share, by_int.target_share)
    # circle (column 2): S = 0.3 + 0.2 over the words' 1.3
    assert one(ats.stats.dominance(da, targets=np.int64(2)), "target_share", target="2") == pytest.approx(0.5 / 1.3)
    shape = ats.stats.map_shape(da, np.int64(3))  # square: 0.1, 0.4 over x centres 1/4, 3/4
    assert float(shape.centre_x.squeeze()) == pytest.approx((0.1 * 0.25 + 0.4 * 0.75) / 0.5)
    np.testing.assert_array_equal(da.attn.words(np.int64(3)).values[..., 0], da.values[..., 3])


PIXART_KW = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, use_resolution_binning=False,
                 clean_caption=False)


@pytest.fixture(scope="module")
def pixart_runs(tmp_path_factory):
    """A tiny PixArt run captured with the prompt's tokens only and with every token, and reruns of the first."""
    from attnscope.testing import tiny_pixart_pipeline

    pipe, d = tiny_pixart_pipeline(), tmp_path_factory.mktemp("pixart")
    prompt = "a red circle and a blue square"
    runs = {"cut": ats.capture(pipe, prompt, seed=0, store=d / "cut.zarr", tokens="prompt", **PIXART_KW),
            "full": ats.capture(pipe, prompt, seed=0, store=d / "full.zarr", tokens="all", **PIXART_KW)}
    reweight = ats.regulate.Reweight("circle", 5.0)
    runs["plain rerun"] = ats.rerun(runs["cut"], pipe=pipe, store=d / "plain.zarr")
    runs["reweighted"] = ats.rerun(runs["cut"], [reweight], pipe=pipe, store=d / "rw.zarr")
    runs["reweighted, all tokens"] = ats.rerun(runs["cut"], [reweight], pipe=pipe, store=d / "rwall.zarr", tokens="all")
    return runs


def _sink_by_hand(tr):
    """1 − (mass on the words) / (mass on every token) per step, site and sample, from the stored maps."""
    words = tr.attention(tr.sites[0])["token_role"].values[0] == "word"
    out = []
    for site in tr.sites:
        s = tr.attention(site).values.astype(np.float64).mean(2).sum((2, 3))  # step, sample, token
        out.append(1 - s[..., words].sum(-1) / s.sum(-1))
    return np.stack(out, 1)  # step, site, sample


def test_sink_share_of_a_cut_token_axis_is_nan_after_an_intervention_that_edits_the_probabilities(pixart_runs):
    """Reweight scales probabilities after the softmax, so a row need not sum to 1: with the padding cut off the
    sink share was 1 − (prompt mass) / (pixel count), negative where "circle" got 5 times its mass."""
    reweighted = pixart_runs["reweighted"]
    assert reweighted.manifest["interventions"][0]["name"] == "Reweight"
    ds = ats.stats.dominance(reweighted, ["circle", "square"])
    assert ds.sink_share.isnull().all()
    assert "Reweight" in ds.attrs["sink_share"] and "tokens='all'" in ds.attrs["sink_share"]
    assert np.isfinite(ds.target_share).all()  # the other statistics stand
    # with every token kept the total is known: the same run's sink share, by hand from its maps
    full = pixart_runs["reweighted, all tokens"]
    kept = ats.stats.dominance(full, ["circle", "square"])
    np.testing.assert_allclose(kept.sink_share.values, _sink_by_hand(full), atol=1e-6)
    assert "sink_share" not in kept.attrs


def test_sink_share_of_a_cut_token_axis_without_interventions_equals_the_full_capture(pixart_runs):
    by_hand = _sink_by_hand(pixart_runs["full"])
    assert (by_hand > 0).all()  # the </s> token takes some mass (the padding is masked)
    for name in ("cut", "plain rerun"):  # a rerun records interventions=[]: the rows still sum to 1
        ds = ats.stats.dominance(pixart_runs[name], ["circle", "square"])
        np.testing.assert_allclose(ds.sink_share.values, by_hand, atol=2e-3)  # float16 storage


def test_interventions_that_leave_the_rows_alone_keep_the_sink_share():
    from attnscope.stats._dominance import row_editing_interventions

    class Run:
        def __init__(self, *names):
            self.manifest = {"interventions": [{"name": n, "params": {}} for n in names]}

    assert row_editing_interventions(Run("TGate", "SpatialTemporal", "AttendAndExcite")) == []
    assert row_editing_interventions(Run("AttentionRegulation", "TGate", "MyEdit")) == ["AttentionRegulation", "MyEdit"]
    assert row_editing_interventions(Run()) == [] and row_editing_interventions(xr.DataArray(0)) == []
