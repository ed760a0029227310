"""SpatialTemporal (seed 001): the released rule against an independent computation, masks, layouts, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.regulate import SpatialTemporal, layout_from_prompt, region_mask

RUN = dict(num_inference_steps=3, guidance_scale=5.0)
PROMPT = "a red circle to the left of a blue square"


def _image(pipe, *clients, prompt=PROMPT, seed=0, **kw):
    with ats.hooks(pipe, *clients):
        return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **{**RUN, **kw}).images


def test_zero_weights_change_nothing_bit_for_bit(shapes):
    plain = _image(shapes)
    assert np.array_equal(_image(shapes, SpatialTemporal(weights=0.0)), plain)
    assert not np.array_equal(_image(shapes, SpatialTemporal(weights=1.0)), plain)


def test_one_object_with_a_full_mask_equals_the_formula_from_the_local_prompt(shapes):
    """O_cond = Attn_D,cond + λ (Attn_L,cond − Attn_∅,uncond), recomputed from to_q/to_k/to_v in float64."""
    site = ats.discover_sites(shapes)[0]
    seen = {}

    class Before:
        role = "intervention"

        def stages(self, ctx):
            return ("output",) if ctx.site.name == site.name and ctx.step == 0 else ()

        def on_output(self, ctx, output):
            seen["plain"], seen["hidden"] = output.clone(), ctx.hidden_states.clone()

    class After:
        def stages(self, ctx):
            return ("output",) if ctx.site.name == site.name and ctx.step == 0 else ()

        def on_output(self, ctx, output):
            seen["after"] = output.clone()

    control = SpatialTemporal({"a red circle": (0.0, 0.0, 1.0, 1.0)}, weights=0.7, sites=site.name)
    with ats.hooks(shapes, Before(), control, After()) as session:
        shapes("a red circle", generator=torch.Generator().manual_seed(0), **RUN)
        local = session.encode_text(["a photo of a red circle"])[0].double()
    attn = site.module
    lin = lambda layer, x: torch.nn.functional.linear(x.double(), layer.weight.double(),  # noqa: E731
                                                      None if layer.bias is None else layer.bias.double())
    q, k, v = lin(attn.to_q, seen["hidden"][1:]), lin(attn.to_k, local), lin(attn.to_v, local)
    h, d = attn.heads, q.shape[-1] // attn.heads
    q, k, v = (t.reshape(t.shape[0] if t.ndim == 3 else 1, -1, h, d).transpose(1, 2) for t in (q, k[None], v[None]))
    o = (torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v).transpose(1, 2).reshape(1, -1, h * d)
    local_out = lin(attn.to_out[0], o)
    expected = seen["plain"][1:].double() + 0.7 * (local_out - seen["plain"][:1].double())
    torch.testing.assert_close(seen["after"][1:].double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(seen["after"][:1], seen["plain"][:1])                   # the uncond half is unchanged


def test_masks_at_every_resolution_including_non_square():
    left = region_mask((0.0, 0.0, 0.5, 1.0), (4, 6)).reshape(4, 6)
    assert left[:, :3].eq(1).all() and left[:, 3:].eq(0).all()
    disk = region_mask((0.5, 0.5), (8, 12), radius=0.2).reshape(8, 12)
    assert disk[4, 6] == 1 and disk[0, 0] == 0 and disk.sum() < 8 * 12 * 0.2
    assert region_mask((0.0, 0.0, 1.0, 1.0), (32, 48)).eq(1).all()            # a 64×96 image's 32×48 latent


def test_default_layouts_from_relation_words():
    assert layout_from_prompt("a green triangle above a red square") == {
        "a green triangle": (0.25, 0.05, 0.75, 0.45), "a red square": (0.25, 0.55, 0.75, 0.95)}
    assert list(layout_from_prompt("a red circle to the right of a blue square").values())[0][0] == 0.55
    assert len(layout_from_prompt("a cat, a dog and a bird")) == 3


def test_the_layout_is_followed(shapes):
    """Left/right swapped by the layout alone: on most seeds the detector finds each object where its box is."""
    from attnscope.models.shapes import detect

    def followed(layout, seed):
        img = (_image(shapes, SpatialTemporal(layout, weights=1.0), prompt="a red circle and a blue square",
                      seed=seed, num_inference_steps=20)[0] * 255).round().astype(np.uint8)
        x = {(o.colour, o.shape): o.centre[0] for o in detect(img)}
        if ("red", "circle") not in x or ("blue", "square") not in x:
            return False
        circle_left = layout["a red circle"][0] < layout["a blue square"][0]
        return (x[("red", "circle")] < x[("blue", "square")]) == circle_left

    left, right = (0.0, 0.2, 0.45, 0.8), (0.55, 0.2, 1.0, 0.8)
    for layout in ({"a red circle": left, "a blue square": right}, {"a red circle": right, "a blue square": left}):
        assert sum(followed(layout, seed) for seed in range(6)) >= 4, layout


@pytest.mark.parametrize("layout, message", [
    ({"a red circle": (0.2, 0.2, 1.4, 0.8)}, "must lie in"),
    ({"a red circle": (0.5, 0.2, 0.4, 0.8)}, "empty box"),
    ({"a red circle": (0.5,)}, "expected a box"),
    ({}, "expected a mapping"),
])
def test_bad_layouts_are_refused_before_anything_runs(layout, message):
    with pytest.raises(AttnscopeError, match=message):
        SpatialTemporal(layout)


def test_a_phrase_not_in_the_prompt_and_no_guidance_are_one_error_each(shapes):
    with pytest.raises(AttnscopeError, match="'a green triangle' is not in the prompt"):
        _image(shapes, SpatialTemporal({"a green triangle": (0.0, 0.0, 0.5, 1.0)}))
    with pytest.raises(AttnscopeError, match="needs classifier-free guidance"):
        _image(shapes, SpatialTemporal(), guidance_scale=1.0)
    with pytest.raises(AttnscopeError, match=r"weights: expected an array of shape \(objects=2, steps=3\)"):
        _image(shapes, SpatialTemporal(weights=[[1.0, 1.0]]))


def test_a_sample_does_not_depend_on_its_batch(shapes):
    prompts = [PROMPT, "a green triangle above a red square"]
    with ats.hooks(shapes, SpatialTemporal(weights=1.0)):
        both = shapes(prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="np",
                      **RUN).images
    alone = _image(shapes, SpatialTemporal(weights=1.0), prompt=prompts[1], seed=1)
    np.testing.assert_allclose(both[1], alone[0], atol=2e-3)                    # own layout per prompt


def test_recorded_in_the_manifest_and_rerun(shapes, tmp_path):
    tr = ats.capture(shapes, PROMPT, seed=2, store=tmp_path / "a.zarr", **RUN)
    control = SpatialTemporal({"a red circle": (0.0, 0.2, 0.45, 0.8), "a blue square": (0.55, 0.2, 1.0, 0.8)},
                              weights=1.0)
    again = ats.rerun(tr, pipe=shapes, store=tmp_path / "b.zarr", interventions=[control])
    described = again.manifest["interventions"][0]
    assert described["name"] == "SpatialTemporal" and described["params"]["layout"]["a blue square"] == [0.55, 0.2, 1.0, 0.8]
    assert not np.array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))


def test_rerun_command_with_a_layout(shapes, tmp_path):
    from .conftest import cli

    tr = ats.capture(shapes, "a red circle and a blue square", seed=1, store=tmp_path / "a.zarr", **RUN)
    done = cli("rerun", str(tr.path), "--layout", "a red circle=0,0.2,0.45,0.8;a blue square=0.55,0.2,1,0.8",
               "-o", str(tmp_path / "b.zarr"))
    assert done.exit_code == 0, done.stderr
    params = ats.open_trace(tmp_path / "b.zarr").manifest["interventions"][0]["params"]
    assert params["layout"] == {"a red circle": [0.0, 0.2, 0.45, 0.8], "a blue square": [0.55, 0.2, 1.0, 0.8]}
    bad = cli("rerun", str(tr.path), "--layout", "a red circle=0,0.2", "--layout", "x", "-o", str(tmp_path / "c.zarr"))
    assert bad.exit_code != 0
    bad = cli("rerun", str(tr.path), "--layout", "a red circle=left", "-o", str(tmp_path / "c.zarr"))
    assert bad.exit_code == 2 and "PHRASE=x0,y0,x1,y1" in bad.stderr and not (tmp_path / "c.zarr").exists()


def test_a_control_moved_to_another_pipeline_encodes_its_local_prompts_there():
    """The local prompts' embeddings of the first pipeline were reused on the second (same vocabulary, other weights)."""
    from attnscope.testing import tiny_sd_pipeline

    first, second = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    layout = {"a red circle": (0.0, 0.0, 0.5, 1.0), "a blue square": (0.5, 0.0, 1.0, 1.0)}
    kw = dict(prompt="a red circle and a blue square", height=32, width=32)
    shared = SpatialTemporal(layout)
    _image(first, shared, **kw)
    assert np.array_equal(_image(second, shared, **kw), _image(second, SpatialTemporal(layout), **kw))


@pytest.mark.parametrize("kwargs, message", [
    ({"radius": "0.2"}, r"radius='0.2': expected a number in \(0, 1\]"),
    ({"radius": True}, r"radius=True: expected a number in \(0, 1\]"),
    ({"local_prompt": 3}, r"local_prompt=3: expected a template"),
    ({"local_prompt": None}, r"local_prompt=None: expected a template"),
])
def test_bad_radius_and_local_prompt_are_one_error_naming_them(kwargs, message):
    """A str radius or a non-str template failed with a raw TypeError."""
    with pytest.raises(AttnscopeError, match=message):
        SpatialTemporal(**kwargs)
