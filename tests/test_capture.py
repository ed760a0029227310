"""Capture into a store and read it back: values, layout, options, bad input."""

import json
import threading

import numpy as np
import pytest
import xarray as xr
import zarr

import attnscope as ats

from .conftest import RUN, AttnInputs, generate, reference_probs

PROMPT = "a red circle and a blue square"


def store(tmp_path, name="run"):
    return tmp_path / f"{name}.zarr"


@pytest.mark.parametrize("pipe_name", ["sd", "sd2", "sdxl"])
def test_stored_probs_match_independent_reference(pipe_name, sd_pipe, sd2_pipe, sdxl_pipe, tmp_path):
    pipe = {"sd": sd_pipe, "sd2": sd2_pipe, "sdxl": sdxl_pipe}[pipe_name]
    with AttnInputs(pipe) as inputs:
        per_head = ats.capture(pipe, PROMPT, seed=1, store=store(tmp_path, "all"), heads="all", branch="both", **RUN)
    mean = ats.capture(pipe, PROMPT, seed=1, store=store(tmp_path, "mean"), heads="mean", branch="both", **RUN)
    checked = 0
    for site in per_head.sites:
        module = pipe.unet.get_submodule(site)
        for step in range(RUN["num_inference_steps"]):
            hidden, text = inputs.calls[site][step]
            ref = reference_probs(module, hidden, text)  # (2, heads, q, tokens): rows [uncond, cond]
            for branch, row in (("uncond", 0), ("cond", 1)):
                heads_da = per_head.attention(site, branch).sel(step=step).isel(sample=0)
                got = heads_da.values.reshape(ref.shape[1], -1, ref.shape[-1]).astype(np.float64)
                np.testing.assert_allclose(got, ref[row], atol=2e-3, rtol=1e-2)
                mean_da = mean.attention(site, branch).sel(step=step).isel(sample=0, head=0)
                np.testing.assert_allclose(mean_da.values.reshape(-1, ref.shape[-1]), ref[row].mean(0), atol=2e-3, rtol=1e-2)
                checked += 1
    assert checked == len(per_head.sites) * 3 * 2
    # the two branches really are different tensors
    site = per_head.sites[0]
    assert not np.allclose(per_head.attention(site, "cond").values, per_head.attention(site, "uncond").values)


def test_each_sample_keeps_its_own_prompt_and_image(sd_pipe, tmp_path):
    prompts, seeds = ["a red circle", "a blue dog"], [10, 11, 12, 13]
    batch = ats.capture(sd_pipe, prompts, seed=seeds, store=store(tmp_path, "batch"), num_images_per_prompt=2, **RUN)
    site = batch.sites[1]
    da = batch.attention(site)
    assert da.sizes["sample"] == 4 and len(batch.images) == 4
    assert da.prompt_index.values.tolist() == [0, 0, 1, 1] and da.image_index.values.tolist() == [0, 1, 0, 1]
    singles = [ats.capture(sd_pipe, prompt, seed=[seed], store=store(tmp_path, f"s{i}"), **RUN)
               for i, (prompt, seed) in enumerate(zip([p for p in prompts for _ in range(2)], seeds))]
    for sample in range(4):
        got = da.isel(sample=sample).values.astype(np.float32)
        distances = [np.abs(got - s.attention(site).isel(sample=0).values.astype(np.float32)).max() for s in singles]
        assert int(np.argmin(distances)) == sample and distances[sample] < 1e-4, distances
        own = singles[sample]
        assert np.abs(np.asarray(batch.images[sample], np.int16) - np.asarray(own.images[0], np.int16)).max() <= 1
        assert [str(t) for t in da.token_text.isel(sample=sample).values[:5]] == own.tokens[:5]
    assert batch.tokens[2:4] == ["red</w>", "circle</w>"]


def test_non_square_generation(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, PROMPT, seed=0, store=store(tmp_path), num_inference_steps=2, height=64, width=96)
    shapes = {s: tuple(tr.attention(s).sizes[d] for d in ("y", "x")) for s in tr.sites}
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == (32, 48)
    assert shapes["mid_block.attentions.0.transformer_blocks.0.attn2"] == (16, 24)
    assert tr.images[0].size == (96, 64)
    assert np.allclose(tr.attention(tr.sites[0]).sum("token").values, 1, atol=1e-2)


def test_store_round_trip_and_plain_readers(sd_pipe, tmp_path):
    path = store(tmp_path)
    tr = ats.capture(sd_pipe, PROMPT, seed=3, store=path, guidance_scale=4.0, tokens="prompt", exact=True, **RUN)
    reopened = ats.open_trace(path)
    assert reopened.complete and reopened.steps_written == 3
    run = reopened.manifest["run"]
    assert run["prompts"] == [PROMPT] and run["seed"] == 3 and run["guidance_scale"] == 4.0
    assert run["num_inference_steps"] == 3 and (run["height"], run["width"]) == (32, 32) and run["exact"] is True
    assert reopened.manifest["scheduler"]["class"] == "DDIMScheduler"
    assert reopened.manifest["capture"]["tokens"] == "prompt" and run["reproducible"] is True
    assert reopened.tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>",
                               "square</w>", "<|endoftext|>"]
    assert reopened.words["a"] == [1, 5] and reopened.words["square"] == [7]
    np.testing.assert_array_equal(np.asarray(reopened.images[0]), generate(sd_pipe, seed=3, guidance_scale=4.0)[0])
    # plain zarr, no attnscope
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["attnscope_format"] == 1 and root.attrs["complete"] is True
    arr = root[f"sites/{tr.sites[0]}/attention"]
    assert arr.metadata.dimension_names == ("step", "sample", "head", "y", "x", "token")
    assert arr.dtype == np.float16 and arr.shape == (3, 1, 1, 16, 16, 9)
    np.testing.assert_array_equal(arr[...], tr.attention(tr.sites[0]).values)
    np.testing.assert_allclose(root["timestep"][...], reopened.timesteps)
    # plain xarray
    ds = xr.open_zarr(str(path), group=f"sites/{tr.sites[0]}")
    assert ds["attention"].dims == ("step", "sample", "head", "y", "x", "token")
    tree = xr.open_datatree(str(path), engine="zarr")
    assert list(tree["token_text"].values[0][:2]) == ["<|startoftext|>", "a</w>"]
    assert json.loads(json.dumps(reopened.manifest)) == reopened.manifest


def test_attention_is_lazy(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, PROMPT, seed=0, store=store(tmp_path), **RUN)
    da = tr.attention(tr.sites[0])
    assert da.chunks is not None  # dask-backed, nothing read yet
    # one step of this 16x16 site is 39 KB, far under the 512 KiB shard target: all 3 steps share a shard,
    # read per sample
    assert da.chunks[0] == (3,) and da.chunks[1] == (1,)


def test_step_subset_and_options(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, PROMPT, seed=0, store=store(tmp_path), sites="up_blocks.1.*", steps=[0, 2], heads="all",
                     branch="both", num_inference_steps=3, height=32, width=32)
    assert tr.sites == ["up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                        "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    da = tr.attention(tr.sites[0], "uncond")
    assert da.step.values.tolist() == [0, 2] and da.sizes["head"] == 8
    raw = zarr.open_group(str(tr.path), mode="r")[f"sites/{tr.sites[0]}/attention"]
    assert np.isnan(raw[1]).all() and not np.isnan(raw[0]).any()
    tr2 = ats.capture(sd_pipe, PROMPT, seed=0, store=store(tmp_path, "pred"), steps=slice(-1, None),
                      sites=lambda s: s.block == "mid", **RUN)
    assert tr2.sites == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert tr2.attention(tr2.sites[0]).step.values.tolist() == [2]


def test_overwrite(sd_pipe, tmp_path):
    path = store(tmp_path)
    ats.capture(sd_pipe, PROMPT, seed=0, store=path, **RUN)
    with pytest.raises(ats.AttnscopeError, match="exists; pass overwrite=True"):
        ats.capture(sd_pipe, PROMPT, seed=0, store=path, **RUN)
    tr = ats.capture(sd_pipe, "a dog", seed=0, store=path, overwrite=True, **RUN)
    assert tr.manifest["run"]["prompts"] == ["a dog"]
    with pytest.raises(ats.AttnscopeError, match="overwrite='no': expected True or False"):  # "no" is truthy
        ats.capture(sd_pipe, PROMPT, seed=0, store=path, overwrite="no", **RUN)
    assert ats.open_trace(path).manifest["run"]["prompts"] == ["a dog"]
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(ats.AttnscopeError, match="only replaces traces"):
        ats.capture(sd_pipe, PROMPT, seed=0, store=precious, overwrite=True, **RUN)
    assert (precious / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("kwargs, message", [
    (dict(sites="nothing.*"), r"'nothing\.\*' matches no cross-attention site; available sites:\n  down_blocks"),
    (dict(sites=lambda s: False), "predicate matched no site"),
    (dict(steps=[0, 7]), r"\[7\] outside this run's steps 0..2"),
    (dict(steps="all"), "expected an int, range, slice or list"),
    (dict(heads="max"), "heads='max': expected one of 'mean', 'all'"),
    (dict(tokens="words"), "tokens='words': expected one of 'auto', 'all', 'prompt'"),
    (dict(branch="neg"), "branch='neg': expected one of 'cond', 'uncond', 'both'"),
    (dict(branch="uncond", guidance_scale=1.0), "no unconditional branch"),
    (dict(seed=[1, 2]), "expected an int or a list of 1 ints"),
    (dict(output_type="pil-ish"), "output_type='pil-ish'"),
    (dict(sites=3), r"sites=3: expected a glob, a list of names/globs, or a predicate"),
    (dict(branch="both", guidance_scale="7"), r"guidance_scale='7': expected a finite number"),
    (dict(exact="false"), r"exact='false': expected True or False"),
])
def test_bad_input_names_the_input_and_writes_nothing(sd_pipe, tmp_path, kwargs, message):
    path = store(tmp_path)
    args = {"seed": 0, **RUN, **kwargs}
    with pytest.raises(ats.AttnscopeError, match=message):
        ats.capture(sd_pipe, PROMPT, store=path, **args)
    assert not path.exists()


def test_not_a_pipeline(tmp_path):
    with pytest.raises(ats.AttnscopeError, match="expected a diffusers pipeline"):
        ats.capture("runwayml/stable-diffusion-v1-5", PROMPT, seed=0, store=store(tmp_path))


def test_open_trace_refuses_non_traces(tmp_path, sd_pipe):
    with pytest.raises(ats.AttnscopeError, match="no Zarr group"):
        ats.open_trace(tmp_path / "missing.zarr")
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.attrs["x"] = 1
    with pytest.raises(ats.AttnscopeError, match="no integer 'attnscope_format'"):
        ats.open_trace(tmp_path / "plain.zarr")
    path = store(tmp_path)
    ats.capture(sd_pipe, PROMPT, seed=0, store=path, **RUN)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["attnscope_format"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ats.AttnscopeError, match="format 99; this attnscope reads formats up to 1"):
        ats.open_trace(path)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(ats.AttnscopeError, match="unreadable zarr.json"):
        ats.open_trace(path)


def test_unknown_site_and_branch_on_read(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, PROMPT, seed=0, store=store(tmp_path), **RUN)
    with pytest.raises(ats.AttnscopeError, match="not in this trace; recorded sites"):
        tr.attention("up_blocks.9.attn2")
    with pytest.raises(ats.AttnscopeError, match=r"branch='uncond': this trace recorded \['cond'\]"):
        tr.attention(tr.sites[0], "uncond")


def test_recorder_inside_hooks_with_another_client(sd_pipe, tmp_path):
    class Zero:
        role = "intervention"

        def stages(self, ctx):
            return ("probs",) if ctx.site.name.startswith("mid") else ()

        def on_probs(self, ctx, p):
            return p * 0 + 1.0 / p.shape[-1]

    rec = ats.Recorder(store(tmp_path), sites="mid_block.*")
    with ats.hooks(sd_pipe, rec, Zero()):
        out = sd_pipe(PROMPT, **RUN)
        rec.add_images(out.images)
    tr = ats.open_trace(rec.path)
    assert tr.complete and len(tr.images) == 1
    np.testing.assert_allclose(tr.attention(tr.sites[0]).values, 1 / 77, rtol=1e-3)  # recorder saw the edited probs
    with pytest.raises(ats.AttnscopeError, match="one pipeline call"):
        with ats.hooks(sd_pipe, ats.Recorder(store(tmp_path, "two"))):
            sd_pipe(PROMPT, **RUN)
            sd_pipe(PROMPT, **RUN)


def test_a_recorder_used_in_a_second_block_is_refused_and_its_trace_kept(sd_pipe, tmp_path):
    """The second block recorded nothing, silently (or hung once the queue to the closed writer filled up)."""
    rec = ats.Recorder(store(tmp_path), max_queue_bytes=1024)
    with ats.hooks(sd_pipe, rec):
        rec.add_images(sd_pipe(PROMPT, **RUN).images)
    before = ats.open_trace(rec.path)
    first = before.attention(before.sites[0]).values
    outcome = []

    def second_block():
        try:
            with ats.hooks(sd_pipe, rec):
                sd_pipe(PROMPT, **RUN)
        except ats.AttnscopeError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=second_block, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "a second block with a used Recorder hung"
    assert len(outcome) == 1 and "create a new Recorder per run" in str(outcome[0])
    tr = ats.open_trace(rec.path)                        # the first run's trace, untouched
    assert tr.complete and len(tr.images) == 1
    np.testing.assert_array_equal(tr.attention(tr.sites[0]).values, first)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in sd_pipe.unet.attn_processors.values())


def test_failed_run_leaves_readable_incomplete_store(sd_pipe, tmp_path):
    def stop(pipe, i, t, kwargs):
        if i == 1:
            raise KeyboardInterrupt
        return kwargs

    path = store(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        ats.capture(sd_pipe, PROMPT, seed=0, store=path, callback_on_step_end=stop, **RUN)
    tr = ats.open_trace(path)
    assert not tr.complete and tr.steps_written == 2 and tr.images == []
    assert tr.attention(tr.sites[0]).step.values.tolist() == [0, 1]
    assert tr.manifest["run"]["unrecorded_kwargs"] == ["callback_on_step_end"]


def test_token_roles_are_stored_and_traces_without_them_still_read(sd_pipe, tmp_path):
    import shutil

    path = store(tmp_path)
    tr = ats.capture(sd_pipe, "a red circle", seed=0, store=path, **RUN)
    roles = tr.token_roles
    assert roles[:5] == ["sot", "word", "word", "word", "eot"] and set(roles[5:]) == {"pad"}
    assert tr.tree["token_role"].dims == ("sample", "token")
    before, words = ats.stats.dominance(tr, targets=["red", "circle"]).compute(), tr.words
    # a trace written before the coordinate existed: roles are read from the token strings again
    shutil.rmtree(path / "token_role")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["coordinates"] = meta["attributes"]["coordinates"].replace(" token_role", "")
    meta["consolidated_metadata"]["metadata"].pop("token_role")
    (path / "zarr.json").write_text(json.dumps(meta))
    old = ats.open_trace(path)
    assert "token_role" not in old.tree.coords
    assert old.token_roles == roles and old.words == words
    xr.testing.assert_identical(ats.stats.dominance(old, targets=["red", "circle"]), before)


def test_explicit_roles_are_checked():
    from attnscope.tokens import token_roles, word_alignment

    toks = ["<bos>", "\u2581say", ":", "a", "\u2581red"]
    assert word_alignment(toks) == {"say": [1], ":": [2], "a": [3], "red": [4]}  # the strings alone cannot tell
    roles = ["sot", "instruction", "instruction", "word", "word"]
    assert word_alignment(toks, roles) == {"a": [3], "red": [4]}
    with pytest.raises(ats.AttnscopeError, match="one of .* per token \\(5\\), got 4 roles"):
        token_roles(toks, roles[:4])
    with pytest.raises(ats.AttnscopeError, match="unknown \\['prefix'\\]"):
        token_roles(toks, ["sot", "prefix", "word", "word", "word"])


def test_numpy_seeds_are_seeds(sd_pipe, tmp_path):
    """`seed=np.int64(3)` was refused as "seed=3: expected an int", and `seed=np.arange(2)` (seeds from numpy) as not
    a list; both are the seeds they hold, recorded in the manifest as plain ints."""
    plain = ats.capture(sd_pipe, ["a red circle", "a blue dog"], seed=[3, 4], store=store(tmp_path, "plain"), **RUN)
    for i, seed in enumerate([np.arange(3, 5), (np.int64(3), np.uint32(4))]):
        tr = ats.capture(sd_pipe, ["a red circle", "a blue dog"], seed=seed, store=store(tmp_path, f"np{i}"), **RUN)
        assert tr.manifest["run"]["seed"] == [3, 4] and all(type(s) is int for s in tr.manifest["run"]["seed"])
        np.testing.assert_array_equal(np.asarray(tr.images[1]), np.asarray(plain.images[1]))
    one = ats.capture(sd_pipe, "a red circle", seed=np.int64(3), store=store(tmp_path, "one"), **RUN)
    assert type(one.manifest["run"]["seed"]) is int and one.manifest["run"]["seed"] == 3
    alone = ats.capture(sd_pipe, "a red circle", seed=3, store=store(tmp_path, "alone"), **RUN)
    np.testing.assert_array_equal(np.asarray(one.images[0]), np.asarray(alone.images[0]))
    with pytest.raises(ats.AttnscopeError, match=r"seed=array\(\[0\]\): expected an int or a list of 2 ints"):
        ats.capture(sd_pipe, ["a", "b"], seed=np.array([0]), store=store(tmp_path, "bad"), **RUN)
    with pytest.raises(ats.AttnscopeError, match=r"seed\[0\]=np.float64\(0.0\): expected an int"):
        ats.capture(sd_pipe, ["a", "b"], seed=np.array([0.0, 1.0]), store=store(tmp_path, "bad"), **RUN)
