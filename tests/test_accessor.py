"""The ``.attn`` accessor against numpy computations on ``.values``, laziness, and a Zarr round trip."""

import dask.array
import numpy as np
import pytest
import xarray as xr
from PIL import Image

import attnscope as ats
import attnscope.stats  # noqa: F401  (registers DataArray.attn)
from attnscope.errors import AttnscopeError

PROMPTS = ["a red circle and a blue square", "a green triangle"]
# positions in the shapes model's CLIP tokenization, written out by hand (independent of resolve_targets)
CIRCLE, BLUE_SQUARE, TRIANGLE = [3], [6, 7], [3]


def bilinear(maps, size):
    """Bilinear resize of the last two axes with align_corners=False, PyTorch's convention, in plain numpy."""

    def weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        w = np.zeros((n_out, n_in))
        np.add.at(w, (np.arange(n_out), lo), 1 - (src - lo))
        np.add.at(w, (np.arange(n_out), hi), src - lo)
        return w

    return np.einsum("Yy,...yx,Xx->...YX", weights(maps.shape[-2], size[0]), maps, weights(maps.shape[-1], size[1]))


@pytest.fixture(scope="module")
def trace(shapes, tmp_path_factory):
    """The two PROMPTS, 3 steps, every head kept."""
    return ats.capture(shapes, PROMPTS, seed=0, store=tmp_path_factory.mktemp("acc") / "a.zarr",
                       num_inference_steps=3, heads="all")


@pytest.fixture(scope="module")
def da(trace):
    small = [s for s in trace.sites if trace.attention(s).sizes["y"] == 4][0]
    return trace.attention(small)


def test_fixture_tokens_are_the_hand_written_positions(trace):
    text = trace.tree["token_text"].values
    assert [text[0][i] for i in CIRCLE + BLUE_SQUARE] == ["circle</w>", "blue</w>", "square</w>"]
    assert text[1][TRIANGLE[0]] == "triangle</w>"


def test_words_sums_each_targets_token_positions(da):
    v = da.values.astype(np.float32)
    out = da.isel(sample=[0, 0]).attn.words(["circle", "blue square", 0])  # both samples of the first prompt
    assert isinstance(out.data, dask.array.Array)
    assert out.dims == ("step", "sample", "head", "y", "x", "word")
    v = v[:, [0, 0]]
    assert out["word"].values.tolist() == ["circle", "blue square", "0"]
    expected = np.stack([v[..., CIRCLE].sum(-1), v[..., BLUE_SQUARE].sum(-1), v[..., 0]], axis=-1)
    np.testing.assert_allclose(out.values, expected, rtol=1e-6)
    assert out.dtype == np.float32 and out.name == da.name and out.attrs == da.attrs
    assert "token_text" not in out.coords and "token" not in out.coords
    np.testing.assert_array_equal(out["timestep"].values, da["timestep"].values)
    assert out["prompt_index"].values.tolist() == [0, 0]


def test_words_uses_the_chosen_samples_text(da):
    with pytest.raises(AttnscopeError, match="different prompts.*sample="):
        da.attn.words(["circle"])
    v = da.values.astype(np.float32)
    np.testing.assert_allclose(da.attn.words("triangle", sample=1).values[..., 0], v[:, 1, ..., TRIANGLE[0]])
    with pytest.raises(AttnscopeError, match=r"'triangle' is not in the prompt; its words are: a, red, circle"):
        da.attn.words("triangle", sample=0)
    with pytest.raises(AttnscopeError, match=r"sample=7 is not in this DataArray; its samples are \[0, 1\]"):
        da.attn.words("circle", sample=7)
    one = da.sel(sample=1)  # token_text is then one row
    np.testing.assert_allclose(one.attn.words("green triangle").values[..., 0], v[:, 1][..., [2, 3]].sum(-1))


def test_sample_selects_that_sample_with_its_own_words(da):
    """sample=k returned every sample's maps summed over sample k's positions: sample 1's "triangle" (position 3)
    was also read off sample 0's maps, whose position 3 is "circle"."""
    v = da.values.astype(np.float32)  # step, sample, head, y, x, token
    circle, triangle = da.attn.words("circle", sample=0), da.attn.words(["green triangle", "a"], sample=1)
    assert circle.dims == triangle.dims == ("step", "head", "y", "x", "word")  # as da.sel(sample=k)
    assert int(circle["sample"]) == 0 and int(triangle["sample"]) == 1
    assert int(triangle["prompt_index"]) == 1
    np.testing.assert_allclose(circle.values[..., 0], v[:, 0, ..., CIRCLE[0]])
    np.testing.assert_allclose(triangle.values, np.stack([v[:, 1, ..., 2] + v[:, 1, ..., 3], v[:, 1, ..., 1]], -1),
                               rtol=1e-6)  # "a green triangle": a = 1, green = 2, triangle = 3
    xr.testing.assert_identical(triangle, da.sel(sample=1).attn.words(["green triangle", "a"]))
    hm = da.attn.heatmap("circle", size=(8, 8), sample=0)
    assert hm.dims == ("y", "x", "word") and int(hm["sample"]) == 0
    one = da.sel(sample=1)
    xr.testing.assert_identical(one.attn.words("triangle", sample=1), one.attn.words("triangle"))
    with pytest.raises(AttnscopeError, match=r"sample=0: this DataArray has no sample dim \(it holds sample 1\)"):
        one.attn.words("triangle", sample=0)


def test_words_on_a_subset_token_axis_uses_positions(da):
    part = da.sel(sample=0).isel(token=slice(2, 9))
    v = da.sel(sample=0).values.astype(np.float32)
    np.testing.assert_allclose(part.attn.words(["blue square", 3]).values,
                               np.stack([v[..., BLUE_SQUARE].sum(-1), v[..., 3]], axis=-1), rtol=1e-6)
    with pytest.raises(AttnscopeError, match=r"token positions \[0\] are not on this DataArray's token axis"):
        part.attn.words([0])


def test_words_without_token_text_accepts_positions_only():
    plain = xr.DataArray(np.arange(24.0).reshape(2, 3, 4), dims=("y", "x", "token"))
    np.testing.assert_array_equal(plain.attn.words([1, 3]).values, plain.values[..., [1, 3]])
    with pytest.raises(AttnscopeError, match="'circle' is not in the prompt.*no token text"):
        plain.attn.words("circle")
    with pytest.raises(AttnscopeError, match=r"dims \['token'\] are not in this DataArray; its dims are \['y', 'x'\]"):
        plain.isel(token=0).attn.words([0])


@pytest.mark.parametrize("how", ["mean", "sum", "max"])
def test_aggregate_matches_numpy(da, how):
    v = da.values.astype(np.float32)
    out = da.attn.aggregate(("step", "head"), how=how)
    assert isinstance(out.data, dask.array.Array)
    assert out.dims == ("sample", "y", "x", "token") and out.attrs == da.attrs
    np.testing.assert_allclose(out.values, getattr(np, how)(v, axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(da.attn.aggregate("sample", how).values, getattr(np, how)(v, axis=1), rtol=1e-6)


def test_aggregate_errors_name_the_dims(da):
    with pytest.raises(AttnscopeError, match=r"dims \['layer'\] are not in this DataArray; its dims are "
                                             r"\['step', 'sample', 'head', 'y', 'x', 'token'\]"):
        da.attn.aggregate(["step", "layer"])
    with pytest.raises(AttnscopeError, match="how='median': expected one of 'mean', 'sum', 'max'"):
        da.attn.aggregate(how="median")


def test_upsample_is_bilinear_without_corner_alignment(da, trace):
    v = da.values.astype(np.float32)
    out = da.attn.upsample((12, 20))  # non-square, non-integer scale in y
    assert isinstance(out.data, dask.array.Array)
    assert out.dims == da.dims and out.attrs == da.attrs
    assert out["y"].values.tolist() == list(range(12)) and out["x"].values.tolist() == list(range(20))
    np.testing.assert_allclose(out.values, np.moveaxis(bilinear(np.moveaxis(v, -1, 0), (12, 20)), 0, -1), atol=1e-6)
    assert out["token_text"].dims == ("sample", "token")
    assert dict(da.attn.upsample(Image.new("RGB", (20, 12))).sizes) == dict(out.sizes)
    assert da.attn.upsample(trace).sizes["y"] == trace.images[0].size[1] == 32
    with pytest.raises(AttnscopeError, match=r"size=\(0, 5\): expected \(height, width\)"):
        da.attn.upsample((0, 5))


@pytest.mark.parametrize("how", ["max", "sum", "minmax"])
def test_normalize_matches_numpy_and_is_zero_safe(da, how):
    v = da.values.astype(np.float32)
    v[0, 0, 0, :, :, 0] = 0.0  # one all-zero map
    data = da.copy(data=v.astype(np.float16)).chunk()
    out = data.attn.normalize(how)
    assert isinstance(out.data, dask.array.Array) and out.dims == da.dims
    x = v.astype(np.float16).astype(np.float32)
    if how == "minmax":
        x = x - x.min(axis=(3, 4), keepdims=True)
    den = x.sum(axis=(3, 4), keepdims=True) if how == "sum" else x.max(axis=(3, 4), keepdims=True)
    expected = np.divide(x, den, out=np.zeros_like(x), where=den != 0)
    np.testing.assert_allclose(out.values, expected, rtol=1e-6)
    assert not np.isnan(out.values).any() and (out.values[0, 0, 0, :, :, 0] == 0).all()


def test_normalize_rejects_unknown_how(da):
    with pytest.raises(AttnscopeError, match="how='l2': expected one of 'max', 'sum', 'minmax'"):
        da.attn.normalize("l2")


def test_heatmap_is_the_chain_computed_by_hand(da):
    first = da.sel(sample=0)
    out = first.attn.heatmap(["circle", "blue square"], size=(32, 32), over=("step", "head"))
    assert out.dims == ("y", "x", "word")
    v = first.values.astype(np.float32)
    word = np.stack([v[..., CIRCLE].sum(-1), v[..., BLUE_SQUARE].sum(-1)], axis=1)  # step, word, head, y, x
    maps = bilinear(word.mean(axis=(0, 2)), (32, 32))  # word, Y, X
    lo, hi = maps.min(axis=(-2, -1), keepdims=True), maps.max(axis=(-2, -1), keepdims=True)
    expected = np.moveaxis((maps - lo) / (hi - lo), 0, -1)
    np.testing.assert_allclose(out.values, expected, atol=1e-5)


def test_methods_stay_lazy_until_computed(da):
    def boom(block):
        raise RuntimeError("attention values were read")

    lazy = da.copy(data=da.data.map_blocks(boom, dtype=da.dtype)).sel(sample=0)
    results = [lazy.attn.words(["circle"]), lazy.attn.aggregate(), lazy.attn.upsample((8, 8)),
               lazy.attn.normalize("minmax"), lazy.attn.heatmap("circle", (8, 8))]  # none of these reads values
    with pytest.raises(RuntimeError, match="attention values were read"):
        results[-1].compute()


def test_results_round_trip_through_zarr(da, tmp_path):
    results = {"words": da.attn.words(["circle", "blue square"], sample=0),
               "heatmap": da.sel(sample=0).attn.heatmap(["circle", "blue square"], (16, 16)),
               "upsampled": da.attn.aggregate("head").attn.upsample((6, 10))}
    for name, result in results.items():
        result.to_dataset(name="maps").to_zarr(tmp_path / f"{name}.zarr", consolidated=False)
        back = xr.open_zarr(tmp_path / f"{name}.zarr", consolidated=False)["maps"]
        xr.testing.assert_identical(back.compute(), result.rename("maps").compute())


def test_a_nan_map_stays_nan_in_words_so_step_means_leave_it_out(da):
    """A gated step's maps are NaN: words() summed them to 0 and a mean over steps halved the heat map."""
    gated = da.sel(sample=1).copy(data=da.sel(sample=1).values.astype(np.float32))
    gated[2] = np.nan                                              # the last of 3 steps, as TGATE stores it
    w = gated.attn.words("triangle")
    assert np.isnan(w.isel(step=2)).all() and not np.isnan(w.isel(step=[0, 1])).any()
    v = gated.values[:2, ..., TRIANGLE[0]].mean(axis=(0, 1))     # mean over the computed steps and the heads
    np.testing.assert_allclose(w.attn.aggregate(["step", "head"], "mean").values[..., 0], v, rtol=1e-6)


def test_heatmap_takes_the_sample_whose_words_to_use(da, trace):
    with pytest.raises(AttnscopeError, match="different prompts.*sample="):
        da.attn.heatmap("triangle", size=(8, 8))
    hm = da.attn.heatmap("triangle", size=(8, 8), sample=1)
    assert hm.dims == ("y", "x", "word")
    by_hand = bilinear(da.values[:, 1, ..., TRIANGLE[0]].astype(np.float64).mean(axis=(0, 1)), (8, 8))
    by_hand = (by_hand - by_hand.min()) / (by_hand.max() - by_hand.min())
    np.testing.assert_allclose(hm.values[..., 0], by_hand, atol=1e-5)
