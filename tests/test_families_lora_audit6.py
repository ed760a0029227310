"""LoRA on the transformer families (Flux.1, SD3, Sana): a LoRA on the transformer's attention projections, built
offline with peft (random non-zero weights), saved with the pipeline class's ``save_lora_weights`` and loaded with
``load_lora_weights``. Capture records the maps the LoRA'd projections compute (against a float64 computation by
hand: base weights plus ``scaling · B A x``) and the plain call's image; a rerun is bit-identical or refuses a
pipeline that applies the LoRA otherwise; interventions and the sweep work beside it (SD 1.x/SDXL:
tests/test_adapters_audit6.py)."""

import copy

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.testing import (
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
)

from .test_adapters_audit6 import lora_linear
from .test_joint_families import FLUX_KW, SD3_KW, _Logits, _record_inputs, _reference

pytest.importorskip("peft")

PROMPT = "a red circle"
#: the attention projections of both streams (single-stream Flux blocks have to_q/to_k/to_v only)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FAMILIES = {"flux": (tiny_flux_pipeline, FLUX_KW), "sd3": (tiny_sd3_pipeline, SD3_KW)}


def _save_lora(family, out, seed):
    """A LoRA on ``family``'s tiny transformer (its attention projections), random non-zero weights, saved with the
    pipeline class's ``save_lora_weights``."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    make = FAMILIES[family][0] if family in FAMILIES else tiny_sana_pipeline
    pipe = make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                target_modules=TARGETS if family in FAMILIES else TARGETS[:4]))
    type(pipe).save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return out


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """family -> the folder of its LoRA; ``flux_b``: a second Flux LoRA with other weights."""
    root = tmp_path_factory.mktemp("lora")
    dirs = {family: _save_lora(family, root / family, 5) for family in ("flux", "sd3", "sana")}
    return {**dirs, "flux_b": _save_lora("flux", root / "flux_b", 7)}


def loaded(family, lora_dirs, **adapters):
    """The family's tiny pipeline with its LoRA loaded as adapter ``a`` (``adapters``: name -> folder instead)."""
    make = FAMILIES[family][0] if family in FAMILIES else tiny_sana_pipeline
    pipe = make()
    for name, folder in (adapters or {"a": lora_dirs[family]}).items():
        pipe.load_lora_weights(folder, adapter_name=name)
    return pipe


def plain(pipe, kw, seed=0, **extra):
    """A plain pipeline call (no attnscope) with capture's generator, as a uint8 array."""
    return np.asarray(pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kw, **extra).images[0])


def image(tr):
    return np.asarray(tr.images[0])


class HandLora(torch.nn.Module):
    """Stands in for a peft LoRA linear layer: :func:`lora_linear` (by hand, float64), not peft's forward."""

    def __init__(self, layer, lora=True):
        super().__init__()
        self.layer, self.lora, self.out_features = layer, lora, layer.base_layer.out_features

    def forward(self, x):
        return lora_linear(self.layer, x, self.lora)


def by_hand(module, lora=True):
    """A copy of the attention ``module`` whose peft layers are :class:`HandLora` (``lora=False``: base weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    copied = copy.deepcopy(module)
    for path, layer in [(p, m) for p, m in copied.named_modules() if isinstance(m, BaseTunerLayer)]:
        parent, _, name = path.rpartition(".")
        setattr(copied.get_submodule(parent) if parent else copied, name, HandLora(layer, lora))
    return copied


# -- capture ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_stores_the_maps_the_lora_computes_and_the_plain_image(family, lora_dirs, tmp_path):
    pipe, kw = loaded(family, lora_dirs), FAMILIES[family][1]
    site = ats.discover_sites(pipe)[0].module
    assert type(site.to_q).__module__.startswith("peft") and type(site.add_k_proj).__module__.startswith("peft")
    expected = plain(pipe, kw)
    inputs, handles = _record_inputs(pipe, tmp_path)
    try:
        tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", heads="all", tokens="all", exact=True, **kw)
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_array_equal(image(tr), expected)
    assert np.abs(plain(FAMILIES[family][0](), kw).astype(float) - expected).max() > 0  # the LoRA changes the image
    cond = slice(None) if family == "flux" else slice(1, 2)  # SD3 runs [uncond; cond]; capture keeps cond
    worst, effect = 0.0, 0.0
    for site in ats.discover_sites(pipe):
        da = tr.attention(site.name)
        for step in range(2):
            ref = _reference(family, by_hand(site.module), inputs[site.name][step])[cond]
            ref = ref.reshape(*ref.shape[:2], da.sizes["y"], da.sizes["x"], -1).numpy()
            worst = max(worst, float(np.abs(da.isel(step=step).values.astype(np.float64) - ref).max()))
            base = _reference(family, by_hand(site.module, lora=False), inputs[site.name][step])[cond]
            effect = max(effect, float(np.abs(base.reshape(ref.shape).numpy() - ref).max()))
    assert worst < 2e-3 and effect > 1e-2, (worst, effect)
    lora = tr.manifest["model"]["adapters"]["lora"]
    assert set(lora) == {"transformer"}
    assert {k: lora["transformer"][k] for k in ("adapters", "active", "disabled", "merged")} == \
        {"adapters": {"a": [1.0]}, "active": ["a"], "disabled": False, "merged": []}  # lora_alpha / r = 1


# -- rerun ------------------------------------------------------------------------------------------------------------
def _no_lora(pipe):
    pipe.unload_lora_weights()


def _scaled(pipe):
    pipe.set_adapters(["a"], adapter_weights=[0.3])


def _fused(pipe):
    pipe.fuse_lora()


def _disabled(pipe):
    pipe.disable_lora()


OTHERWISE = {"no_lora": (_no_lora, "captured with LoRA layers in transformer, which this pipeline has none of"),
             "set_adapters": (_scaled, r"applied otherwise .*\(adapters: trace \{'a': \[1.0\]\}, this pipeline "
                                       r"\{'a': \[0.3\]\}"),
             "fuse_lora": (_fused, r"applied otherwise .*\(merged: trace \[\], this pipeline \['a'\]"),
             "disable_lora": (_disabled, r"applied otherwise .*\(disabled: trace False, this pipeline True")}


@pytest.mark.parametrize("family", FAMILIES)
def test_rerun_is_bit_identical_and_a_pipeline_applying_the_lora_otherwise_is_one_error(family, lora_dirs, tmp_path):
    pipe, kw = loaded(family, lora_dirs), FAMILIES[family][1]
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **kw)
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))
    for site in tr.sites:
        np.testing.assert_array_equal(again.attention(site).values, tr.attention(site).values)
    for name, (change, said) in OTHERWISE.items():
        other = loaded(family, lora_dirs)
        change(other)
        if name != "fuse_lora":  # fused, the same LoRA makes the image up to rounding: refused for its bits
            assert np.abs(plain(other, kw).astype(float) - image(tr)).max() > 0, name  # it would make another image
        with pytest.raises(ats.AttnscopeError, match=said):
            ats.rerun(tr, pipe=other, store=tmp_path / f"{name}.zarr")
        assert not (tmp_path / f"{name}.zarr").exists()


def test_a_fused_flux_lora_trace_reruns_on_a_pipeline_fused_alike(lora_dirs, tmp_path):
    pipe = loaded("flux", lora_dirs)
    pipe.fuse_lora(lora_scale=0.5)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **FLUX_KW)
    np.testing.assert_array_equal(image(tr), plain(pipe, FLUX_KW))
    assert tr.manifest["model"]["adapters"]["lora"]["transformer"]["merged"] == ["a"]
    alike = loaded("flux", lora_dirs)
    alike.fuse_lora(lora_scale=0.5)
    again = ats.rerun(tr, pipe=alike, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))
    with pytest.raises(ats.AttnscopeError, match=r"the LoRA of transformer is applied otherwise than when"):
        ats.rerun(tr, pipe=loaded("flux", lora_dirs), store=tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lora_scale_of_a_call_is_recorded_and_rerun(family, lora_dirs, tmp_path):
    """``joint_attention_kwargs={"scale": s}`` (Flux's and SD3's analogue of ``cross_attention_kwargs``) scales the
    LoRA for the call: a pipeline argument, recorded and given again; the LoRA's own setting (``model.adapters``) is
    the pipeline's, unscaled."""
    pipe, kw = loaded(family, lora_dirs), FAMILIES[family][1]
    call = {"joint_attention_kwargs": {"scale": 0.4}}
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **call, **kw)
    np.testing.assert_array_equal(image(tr), plain(pipe, kw, **call))
    assert np.abs(plain(pipe, kw).astype(float) - image(tr)).max() > 0
    assert tr.manifest["run"]["pipeline_kwargs"]["joint_attention_kwargs"] == {"scale": 0.4}
    assert tr.manifest["model"]["adapters"]["lora"]["transformer"]["adapters"] == {"a": [1.0]}
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))
    for site in tr.sites:
        np.testing.assert_array_equal(again.attention(site).values, tr.attention(site).values)


def test_a_call_with_lora_scale_0_resets_the_adapter_weights_and_the_rerun_says_so(lora_dirs, tmp_path):
    """diffusers undoes a call's scale 0 by setting every adapter's weight to 1 (``unscale_lora_layers``): after
    ``joint_attention_kwargs={"scale": 0}`` the weight ``set_adapters`` gave is gone. The trace records the weight the
    call started from; a rerun on the pipeline as the call left it is refused naming the scales, and runs once the
    weight is set again (docs/capture.md, "Adapters")."""
    pipe = loaded("flux", lora_dirs)
    _scaled(pipe)
    call = {"joint_attention_kwargs": {"scale": 0.0}}
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **call, **FLUX_KW)
    assert tr.manifest["model"]["adapters"]["lora"]["transformer"]["adapters"] == {"a": [0.3]}
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["a"] == 1.0  # diffusers reset it (was 0.3)
    with pytest.raises(ats.AttnscopeError, match=r"\(adapters: trace \{'a': \[0.3\]\}, this pipeline \{'a': \[1.0\]\}"):
        ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    _scaled(pipe)
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "c.zarr")
    np.testing.assert_array_equal(image(again), image(tr))


def test_the_order_of_active_adapters_is_recorded_and_another_order_refused(lora_dirs, tmp_path):
    """peft adds the active adapters' products to a layer's output in the order ``set_adapters`` named them: another
    order changes the last bits of the maps (and, over more steps, the image). ``active`` was recorded sorted, so a
    rerun in another order passed the check and was not bit-identical."""
    two = {"a": lora_dirs["flux"], "b": lora_dirs["flux_b"]}
    ab, ba = loaded("flux", lora_dirs, **two), loaded("flux", lora_dirs, **two)
    ab.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
    ba.set_adapters(["b", "a"], adapter_weights=[0.5, 0.5])
    run = {**FLUX_KW, "output_type": "np"}
    differ = [np.abs(ab(PROMPT, generator=torch.Generator().manual_seed(s), **run).images
                     - ba(PROMPT, generator=torch.Generator().manual_seed(s), **run).images).max() for s in range(2)]
    assert max(differ) > 0  # a plain call in either order: other bits
    tr = ats.capture(ab, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **FLUX_KW)
    assert tr.manifest["model"]["adapters"]["lora"]["transformer"]["active"] == ["a", "b"]
    with pytest.raises(ats.AttnscopeError, match=r"\(active: trace \['a', 'b'\], this pipeline \['b', 'a'\].*"
                                                 r"in the same order"):
        ats.rerun(tr, pipe=ba, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    again = ats.rerun(tr, pipe=ab, store=tmp_path / "c.zarr")
    for site in tr.sites:
        np.testing.assert_array_equal(again.attention(site).values, tr.attention(site).values)


def test_sana_lora_capture_rerun_and_refusal(lora_dirs, tmp_path):
    """Sana (``SanaLoraLoaderMixin``): the image with exact=True is the plain call's, its per-call scale
    (``attention_kwargs={"scale": s}``) is recorded, the rerun is bit-identical and refuses a pipeline without the
    LoRA or with another scale."""
    pipe, kw = loaded("sana", lora_dirs), dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                                               use_resolution_binning=False)
    call = {"attention_kwargs": {"scale": 0.4}}
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **call, **kw)
    np.testing.assert_array_equal(image(tr), plain(pipe, kw, **call))
    assert np.abs(plain(tiny_sana_pipeline(), kw, **call).astype(float) - image(tr)).max() > 0
    assert tr.manifest["model"]["adapters"]["lora"]["transformer"]["adapters"] == {"a": [1.0]}
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))
    for change, said in (OTHERWISE["no_lora"], OTHERWISE["set_adapters"]):
        other = loaded("sana", lora_dirs)
        change(other)
        with pytest.raises(ats.AttnscopeError, match=said):
            ats.rerun(tr, pipe=other, store=tmp_path / "c.zarr")
        assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("family", ["flux2", "pixart"])
def test_flux2_and_pixart_lora_capture_and_rerun(family, tmp_path):
    """FLUX.2 klein (``Flux2LoraLoaderMixin``; its single-stream blocks' fused ``to_qkv_mlp_proj`` too; the call's
    scale ``attention_kwargs={"scale": s}``) and PixArt (diffusers has no LoRA loader for it: peft's
    ``inject_adapter_in_model``): the image with exact=True is the plain call's, the manifest records the
    transformer's LoRA, the rerun is bit-identical and refuses a pipeline without."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    make = {"flux2": tiny_flux2_pipeline, "pixart": tiny_pixart_pipeline}[family]
    kw = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16,
              **({"use_resolution_binning": False, "clean_caption": False} if family == "pixart" else {}))
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                        target_modules=[*TARGETS, "to_qkv_mlp_proj"] if family == "flux2" else TARGETS[:4])

    def build():
        pipe = make()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            inject_adapter_in_model(config, pipe.transformer, adapter_name="a")
        return pipe

    pipe = build()
    if family == "flux2":  # saved and loaded as diffusers' format
        type(pipe).save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(
            pipe.transformer, adapter_name="a"))
        pipe = make()
        pipe.load_lora_weights(tmp_path / "lora", adapter_name="a")
        unscaled = np.asarray(pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kw).images[0])
        kw["attention_kwargs"] = {"scale": 0.4}  # FLUX.2's per-call LoRA scale: a pipeline argument
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **kw)
    np.testing.assert_array_equal(image(tr), np.asarray(
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kw).images[0]))
    if family == "flux2":
        assert np.abs(unscaled.astype(float) - image(tr)).max() > 0
        assert tr.manifest["run"]["pipeline_kwargs"]["attention_kwargs"] == {"scale": 0.4}
    assert np.abs(np.asarray(make()(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kw).images[0])
                  .astype(float) - image(tr)).max() > 0  # the LoRA changes the image
    assert tr.manifest["model"]["adapters"]["lora"]["transformer"]["adapters"] == {"a": [1.0]}  # lora_alpha / r
    again = ats.rerun(tr, pipe=pipe if family == "flux2" else build(), store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))
    with pytest.raises(ats.AttnscopeError, match="captured with LoRA layers in transformer, which this pipeline has"):
        ats.rerun(tr, pipe=make(), store=tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()


# -- interventions ----------------------------------------------------------------------------------------------------
def test_interventions_beside_a_flux_lora_edit_only_their_columns_and_leave_the_lora_alone(lora_dirs, tmp_path):
    pipe = loaded("flux", lora_dirs)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    trainable = {k: p.requires_grad for k, p in pipe.transformer.named_parameters()}
    assert any(trainable[k] for k in trainable if "lora" in k)  # peft's LoRA parameters require grad
    run = {**FLUX_KW, "output_type": "np"}
    spy, after = _Logits("intervention"), _Logits("observer")
    with ats.hooks(pipe, spy, ats.regulate.AttentionRegulation(["circle"], iterations=3), after):
        edited = pipe(PROMPT, generator=torch.Generator().manual_seed(3), **run).images
    assert not np.array_equal(edited, pipe(PROMPT, generator=torch.Generator().manual_seed(3), **run).images)
    changed = set()
    for key, before in spy.seen.items():
        diff = (after.seen[key] - before).abs().amax(dim=(1, 2))  # (rows, tokens)
        assert float(diff[:, [c for c in range(diff.shape[-1]) if c != 2]].max()) == 0.0  # "circle" is token 2
        if float(diff.max()) > 0:
            changed.add(key)
    double = {s.name for s in ats.discover_sites(pipe) if s.block == "double"}
    assert changed == {(name, 0) for name in double}  # the double-stream sites, the first half of 2 steps
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **FLUX_KW)
    site = ats.discover_sites(pipe)[-1].name  # a single-stream block
    scaled = ats.rerun(tr, pipe=pipe, interventions=[ats.regulate.Reweight("circle", 3.0, sites=site, steps=[1])],
                       store=tmp_path / "b.zarr")
    for name in tr.sites:
        np.testing.assert_array_equal(scaled.attention(name).isel(step=0).values,
                                      tr.attention(name).isel(step=0).values)  # the step before it: untouched
    was, now = (t.attention(site).isel(step=1).values.astype(np.float64) for t in (tr, scaled))
    np.testing.assert_allclose(now[..., 2], 3.0 * was[..., 2], rtol=2e-3, atol=2e-4)
    np.testing.assert_array_equal(now[..., [0, 1, *range(3, now.shape[-1])]],
                                  was[..., [0, 1, *range(3, now.shape[-1])]])
    assert all(torch.equal(weights[k], v) for k, v in pipe.transformer.state_dict().items())  # LoRA and base alike
    assert all(p.grad is None for p in pipe.transformer.parameters())
    assert trainable == {k: p.requires_grad for k, p in pipe.transformer.named_parameters()}


@pytest.mark.parametrize("intervention", ["SpatialTemporal", "AttendAndExcite"])
def test_interventions_with_gradients_through_a_lora_leave_it_alone(intervention, tmp_path):
    """The interventions that differentiate through the denoiser (``SpatialTemporal``'s λ optimisation, Attend-and-
    Excite's latent update; UNet only, refused on joint families) run through peft's LoRA layers, whose parameters
    require grad: afterwards every weight is bit-identical, no ``.grad`` is left and ``requires_grad`` is as before."""
    from peft import LoraConfig

    pipe = ats.load_pipeline("shapes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    trainable = {k: p.requires_grad for k, p in pipe.unet.named_parameters()}
    assert any(trainable.values())
    prompt = "a red circle to the left of a blue square"
    tr = ats.capture(pipe, prompt, seed=0, store=tmp_path / "a.zarr", num_inference_steps=3)
    control = (ats.regulate.SpatialTemporal(objective="attention", epochs=1, lr=0.05) if intervention == "SpatialTemporal"
               else ats.regulate.AttendAndExcite(["circle", "square"], steps=[0], thresholds={}))
    moved = ats.rerun(tr, pipe=pipe, interventions=[control], store=tmp_path / "b.zarr")
    assert np.abs(image(moved).astype(float) - image(tr)).max() > 0
    assert all(torch.equal(weights[k], v) for k, v in pipe.unet.state_dict().items())
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert trainable == {k: p.requires_grad for k, p in pipe.unet.named_parameters()}


# -- sweep ------------------------------------------------------------------------------------------------------------
def test_a_flux_lora_sweep_resumes_alike_and_refuses_another_setting(lora_dirs, tmp_path):
    out = tmp_path / "s"
    ats.sweep(loaded("flux", lora_dirs), [PROMPT], [0], out=out, progress=False, exact=True, **FLUX_KW)
    pipe = loaded("flux", lora_dirs)  # built again the same way: resumes
    cat = ats.sweep(pipe, [PROMPT], [0, 1], out=out, progress=False, exact=True, **FLUX_KW)
    assert list(cat.df.status) == ["complete", "complete"]
    for seed in (0, 1):
        np.testing.assert_array_equal(np.asarray(cat.trace(seed).images[0]), plain(pipe, FLUX_KW, seed=seed))
    rows = sorted(p.name for p in (out / "rows").iterdir())
    _scaled(pipe)
    with pytest.raises(ats.AttnscopeError, match=r"holds a sweep with other settings \(adapters: LoRA of transformer: "
                                                 r"scales .* \{'a': \[1.0\]\} then, \{'a': \[0.3\]\} now\)"):
        ats.sweep(pipe, [PROMPT], [0, 1, 2], out=out, progress=False, exact=True, **FLUX_KW)
    assert sorted(p.name for p in (out / "rows").iterdir()) == rows
    with pytest.raises(ats.AttnscopeError, match=r"has a LoRA loaded \(adapter 'a' in transformer\).*workers=1"):
        ats.sweep(pipe, [PROMPT], [0, 1], out=tmp_path / "w", workers=2, progress=False, **FLUX_KW)
    assert not (tmp_path / "w").exists()
