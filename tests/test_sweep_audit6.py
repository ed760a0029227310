"""ats.sweep and the pipeline settings that are no weights: FreeU (``pipe.enable_freeu``), how a LoRA is applied
(``set_adapters(adapter_weights=)``, ``disable_lora()``, ``fuse_lora``) and textual-inversion tokens. The weights
hash (``model_hash``) does not see them: a resumed sweep mixed traces of two settings in one folder, and worker
processes, which load the model again, ran without FreeU, all silently."""

import json

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.testing import tiny_sd_pipeline

from . import test_adapters_audit6
from .test_adapters_audit6 import CHANGES, plain, with_lora

lora_dir = test_adapters_audit6.lora_dir  # its fixture: a LoRA on the tiny SD pipeline, saved as diffusers' format

RUN = dict(num_inference_steps=2, height=32, width=32)
PROMPT = "a red circle and a blue square"
FREEU = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)


def _rows(out):
    return sorted(p.name for p in (out / "rows").iterdir())


def _freeu_on(pipe):
    pipe.enable_freeu(**FREEU)


def _freeu_off(pipe):
    pipe.disable_freeu()


def _freeu_pipe():
    pipe = tiny_sd_pipeline()
    _freeu_on(pipe)
    return pipe


#: a pipeline's setup, the no-weight change made to it between a sweep and its resume, and what the refusal names
SETTING_CHANGES = {
    "enable_freeu": (tiny_sd_pipeline, _freeu_on, r"freeu \(pipe.enable_freeu\): off then, s1=0.9 s2=0.2 b1=1.5 b2=1.6 now"),
    "disable_freeu": (_freeu_pipe, _freeu_off, r"freeu \(pipe.enable_freeu\): s1=0.9 s2=0.2 b1=1.5 b2=1.6 then, off now"),
    "set_adapters": ("lora", CHANGES["set_adapters"], r"adapters: LoRA of text_encoder, unet: scales .* "
                                                      r"\{'a': \[1.0\]\} then, \{'a': \[0.3\]\} now\)"),
    "disable_lora": ("lora", CHANGES["disable_lora"], r"adapters: LoRA of text_encoder, unet: disabled "
                                                      r"\(pipe.disable_lora\) False then, True now\)"),
    "fuse_lora": ("lora", CHANGES["fuse_lora"], r"adapters: LoRA of text_encoder, unet: fused \(pipe.fuse_lora\) "
                                                r"\[\] then, \['a'\] now; scales"),
}


@pytest.mark.parametrize("change", SETTING_CHANGES)
def test_a_resume_after_a_setting_that_is_no_weight_changed_is_refused_naming_it(change, lora_dir, tmp_path):
    """The change makes another image (a plain pipeline call before and after differ), but the sweep resumed and put
    the new runs beside the old ones in one catalog (FreeU, set_adapters, disable_lora), or refused naming only
    ``model_hash`` (fuse_lora)."""
    setup, make_change, named = SETTING_CHANGES[change]
    pipe = with_lora(lora_dir) if setup == "lora" else setup()
    out = tmp_path / "s"
    ats.sweep(pipe, [PROMPT], [0], out=out, progress=False, **RUN)
    before, rows = plain(pipe), _rows(out)
    make_change(pipe)
    assert np.abs(plain(pipe).astype(float) - before).max() > 0  # the setting changes what the runs make
    with pytest.raises(ats.AttnscopeError, match=r"holds a sweep with other settings \(" + named) as refused:
        ats.sweep(pipe, [PROMPT], [0, 1], out=out, progress=False, **RUN)
    assert "model_hash" not in str(refused.value)  # the hash (fuse_lora's) does not say why: the setting does
    assert _rows(out) == rows  # nothing ran, nothing mixed in


def test_the_same_settings_on_a_pipeline_built_again_resume_the_sweep(lora_dir, tmp_path):
    """FreeU and the LoRA's settings recorded in ``sweep.json`` are found equal on a pipeline built again the same way
    (a rerun of the script): the sweep resumes, and every run's image is the plain call's with those settings."""
    def build():
        pipe = with_lora(lora_dir)
        pipe.set_adapters(["a"], adapter_weights=[0.3])
        _freeu_on(pipe)
        return pipe

    out = tmp_path / "s"
    ats.sweep(build(), [PROMPT], [0], out=out, progress=False, exact=True, **RUN)
    settings = json.loads((out / "sweep.json").read_text())
    assert settings["freeu"] == FREEU and settings["adapters"]["lora"]["unet"]["adapters"] == {"a": [0.3]}
    pipe = build()
    cat = ats.sweep(pipe, [PROMPT], [0, 1], out=out, progress=False, exact=True, **RUN)
    assert list(cat.df.status) == ["complete", "complete"]
    for seed in (0, 1):
        expected = np.asarray(pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **RUN).images[0])
        np.testing.assert_array_equal(np.asarray(cat.trace(seed).images[0]), expected)


def test_a_sweep_json_from_before_freeu_and_adapters_were_recorded_still_resumes(tmp_path):
    out = tmp_path / "s"
    ats.sweep(tiny_sd_pipeline(), [PROMPT], [0], out=out, progress=False, **RUN)
    settings = json.loads((out / "sweep.json").read_text())
    assert settings["freeu"] is None and settings["adapters"] == {"lora": {}, "textual_inversion": {}}
    (out / "sweep.json").write_text(json.dumps({k: v for k, v in settings.items() if k not in ("freeu", "adapters")}))
    cat = ats.sweep(_freeu_pipe(), [PROMPT], [0, 1], out=out, progress=False, **RUN)  # not known then: not compared
    assert len(cat.df) == 2


def test_workers_run_with_the_freeu_and_textual_inversion_of_the_pipeline_given(tmp_path):
    """A worker loads the model again (here a copy saved with save_pretrained: the pipeline has no reference), and FreeU
    is no weight: its runs were made without it, with the same model_hash. The worker sets the factors again; the
    textual-inversion token travels in the saved copy (tokenizer and embeddings) and is found there."""
    pipe = _freeu_pipe()
    pipe.load_textual_inversion(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)), token="<tok>")
    prompt = "a red <tok> circle"
    cat = ats.sweep(pipe, [prompt], [0], out=tmp_path / "s", devices=["cpu"], threads=1, progress=False, exact=True,
                    **RUN)
    got = np.asarray(cat.trace(0).images[0])
    np.testing.assert_array_equal(got, plain(pipe, prompt))  # a plain call in this process, FreeU on
    pipe.disable_freeu()
    assert np.abs(plain(pipe, prompt).astype(float) - got).max() > 0  # what the worker made before
    model = cat.trace(0).manifest["model"]
    assert model["freeu"] == FREEU and model["adapters"]["textual_inversion"] == {"tokenizer": ["<tok>", "<tok>_1"]}
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["freeu"] == FREEU


def test_workers_refuse_a_pipeline_with_a_lora_before_anything_is_written(lora_dir, tmp_path):
    """A LoRA loaded into the pipeline is not in what the workers load (its reference, or a save_pretrained copy,
    which diffusers cannot load back: the error spoke of connecting to huggingface.co). One error naming the LoRA
    and what to do, before any worker starts or anything is written."""
    for change in (None, *CHANGES.values()):
        pipe = with_lora(lora_dir)
        if change is not None:
            change(pipe)
        with pytest.raises(ats.AttnscopeError, match=r"the pipeline given has a LoRA loaded \(adapter 'a' in "
                                                     r"text_encoder, unet\): .*use workers=1 .*pipe.fuse_lora\(\)"):
            ats.sweep(pipe, [PROMPT], [0, 1], out=tmp_path / "s", workers=2, progress=False, **RUN)
        assert not (tmp_path / "s").exists()


def test_workers_name_the_textual_inversion_token_the_reloaded_model_lacks(tmp_path):
    """The shapes model loaded again by its reference lacks a token loaded into it since: the error said only that its
    weights differ (``model_hash``); it names the token."""
    pipe = ats.load_pipeline("shapes")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion(torch.randn(1, width, generator=torch.Generator().manual_seed(0)), token="<tok>")
    with pytest.raises(ats.AttnscopeError, match=r"worker worker-0@cpu loaded 'shapes', whose adapters differ from the "
                                                 r"pipeline given \(textual-inversion tokens of tokenizer: \['<tok>'\] "
                                                 r"given, none loaded\)"):
        ats.sweep(pipe, ["a red <tok> circle"], [0], out=tmp_path / "s", devices=["cpu"], threads=1, progress=False,
                  **RUN)
    assert not (tmp_path / "s").exists()


def test_a_dtype_other_than_the_pipeline_objects_own_is_refused_before_anything_is_written(tmp_path):
    """dtype= is what a model reference is loaded in: beside a pipeline object in float32, dtype='bfloat16' was
    ignored with workers=1 (float32 traces) and refused by every worker as changed weights."""
    pipe = ats.load_pipeline("shapes")
    with pytest.raises(ats.AttnscopeError, match=r"dtype='bfloat16': the pipeline given runs in float32"):
        ats.sweep(pipe, ["a red circle"], [0], tmp_path / "sw", dtype="bfloat16", num_inference_steps=2, progress=False)
    assert not (tmp_path / "sw").exists()
    ats.sweep(pipe, ["a red circle"], [0], tmp_path / "ok", dtype="float32", num_inference_steps=2,
              progress=False)  # its own dtype, said again: fine
    assert json.loads((tmp_path / "ok" / "sweep.json").read_text())["dtype"] == "float32"


def test_workers_run_with_the_layerwise_casting_of_the_pipeline_given_and_a_resume_compares_it(tmp_path):
    """Layerwise casting (weights stored in float8, upcast per layer) is a setting of the loaded model: a worker that
    loads the model again from its reference set none (its weights then differed: refused as 'changed since it was
    loaded'). It is recorded in sweep.json, set again in the worker, and a resume without it is refused naming it."""
    def cast():
        pipe = ats.load_pipeline("shapes")
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        return pipe

    pipe = cast()
    run = dict(num_inference_steps=2, progress=False, exact=True)
    cat = ats.sweep(pipe, ["a red circle"], [0], out=tmp_path / "s", devices=["cpu"], threads=1, **run)
    made = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(np.asarray(cat.trace(0).images[0]), np.asarray(made))  # a plain cast call here
    setting = {"unet": {"storage_dtype": "float8_e4m3fn", "compute_dtype": "float32"}}
    assert cat.trace(0).manifest["model"]["layerwise_casting"] == setting
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["layerwise_casting"] == setting
    with pytest.raises(ats.AttnscopeError, match=r"other settings \(layerwise_casting: \{'unet': .*\} then, \{\} now\)"):
        ats.sweep(ats.load_pipeline("shapes"), ["a red circle"], [0, 1], out=tmp_path / "s", **run)
    assert len(ats.sweep(cast(), ["a red circle"], [0, 1], out=tmp_path / "s", **run).df) == 2
