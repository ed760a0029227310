"""The models package under odd but legal use: loading, evaluation arguments, faithfulness (an audit's findings)."""

import json

import diffusers
import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.models import eval_prompts, evaluate, heatmap_iou, paired_differences, score_image
from attnscope.models.shapes import detect
from attnscope.plot import word_maps
from attnscope.stats import box_iou
from attnscope.testing import tiny_sd_pipeline

STEPS = 3


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "sd"
    tiny_sd_pipeline().save_pretrained(path)
    return path


def _with_class_name(saved, target, name):
    import shutil

    shutil.copytree(saved, target)
    index = json.loads((target / "model_index.json").read_text())
    index["_class_name"] = name
    (target / "model_index.json").write_text(json.dumps(index))
    return target


# ----------------------------------------------------------------------------- load_pipeline
@pytest.mark.parametrize("name", ["UNet2DConditionModel", "NoSuchPipeline"])
def test_load_pipeline_names_a_class_that_is_no_diffusers_pipeline(saved_sd, tmp_path, name):
    # a model class, or a pipeline of a newer diffusers: diffusers itself fails with an AttributeError
    model = _with_class_name(saved_sd, tmp_path / "m", name)
    with pytest.raises(AttnscopeError, match=rf"model=.*names '{name}' for '_class_name', which is not a pipeline "
                                             rf"class of diffusers {diffusers.__version__}"):
        ats.load_pipeline(model)


def test_load_pipeline_names_a_pipeline_whose_libraries_are_missing(saved_sd, tmp_path):
    name = "OnnxStableDiffusionPipeline"
    if type(getattr(diffusers, name)).__name__ != "DummyObject":
        pytest.skip("onnx is installed here: the pipeline class is real")
    model = _with_class_name(saved_sd, tmp_path / "m", name)
    with pytest.raises(AttnscopeError, match=rf"pipeline class '{name}' needs libraries that are not installed: .*onnx"):
        ats.load_pipeline(model)


def test_load_pipeline_says_a_file_is_not_a_directory(saved_sd):
    with pytest.raises(AttnscopeError, match=r"model=.*model_index.json': is a file; expected the directory"):
        ats.load_pipeline(saved_sd / "model_index.json")


def test_load_pipeline_still_loads_the_saved_directory(saved_sd):
    assert type(ats.load_pipeline(saved_sd, dtype="bfloat16")).__name__ == "StableDiffusionPipeline"


# ----------------------------------------------------------------------------- evaluate's arguments
def test_evaluate_gives_a_negative_prompt_to_every_prompt(shapes):
    # diffusers refuses one negative prompt string beside a list of prompts (a TypeError before the fix)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    negative = "a yellow circle"
    result = evaluate(shapes, prompts, negative_prompt=negative, batch_size=2, seed=4, num_inference_steps=STEPS,
                      progress=False, bootstrap=20)
    assert result["settings"]["negative_prompt"] == negative
    for row in result["per_prompt"]:  # each row is its prompt generated alone with the negative prompt
        image = shapes(row["prompt"], negative_prompt=negative, num_inference_steps=STEPS,
                       generator=torch.Generator().manual_seed(row["seed"])).images[0]
        assert row == {**score_image(row["prompt"], image), "seed": row["seed"]}
    per_prompt = evaluate(shapes, prompts, negative_prompt=[negative] * 3, batch_size=2, seed=4,
                          num_inference_steps=STEPS, progress=False, bootstrap=20)
    assert per_prompt["per_prompt"] == result["per_prompt"]


def test_evaluate_names_a_negative_prompt_list_of_the_wrong_length(shapes, monkeypatch):
    monkeypatch.setattr(type(shapes), "__call__", lambda *a, **k: pytest.fail("generated before checking"))
    with pytest.raises(AttnscopeError, match=r"negative_prompt=\['a red circle'\]: expected one string for every "
                                             r"prompt, or a list of one per prompt \(2\)"):
        evaluate(shapes, ["a blue square", "a green circle"], negative_prompt=["a red circle"], progress=False)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_evaluate_refuses_a_guidance_scale_that_is_not_finite(shapes, tmp_path, monkeypatch, scale):
    # NaN > 1 is false: guidance was silently off, and the JSON held a NaN no JSON reader takes
    monkeypatch.setattr(type(shapes), "__call__", lambda *a, **k: pytest.fail("generated before checking"))
    with pytest.raises(AttnscopeError, match=rf"guidance_scale={scale!r}: expected a finite number"):
        evaluate(shapes, ["a red circle"], guidance_scale=scale, json_path=tmp_path / "e.json", progress=False)
    assert not (tmp_path / "e.json").exists()


def test_numpy_ints_count_as_ints(shapes, tmp_path):
    # an np.arange item is an int everywhere else in attnscope (capture's seed, sweeps)
    assert eval_prompts("two", n=np.int64(3), seed=np.int64(2)) == eval_prompts("two", n=3, seed=2)
    out = tmp_path / "e.json"
    result = evaluate(shapes, "two", n=np.int64(2), seed=np.int64(5), batch_size=np.int64(1), bootstrap=np.int64(30),
                      num_inference_steps=np.int64(STEPS), json_path=out, progress=False)
    plain = evaluate(shapes, "two", n=2, seed=5, batch_size=1, bootstrap=30, num_inference_steps=STEPS, progress=False)
    assert json.loads(out.read_text()) == json.loads(json.dumps(plain))
    assert [row["seed"] for row in result["per_prompt"]] == [5, 6]
    paired = paired_differences(plain, result, bootstrap=np.int64(30), seed=np.int64(1))
    assert paired["metrics"]["all_present"]["difference"] == 0.0


# ----------------------------------------------------------------------------- heatmap_iou
def test_heatmap_iou_needs_a_detection_for_each_repeated_object(shapes, tmp_path):
    prompt = "a red circle and a red circle"
    # seeds 1 and 7 at 6 steps: two red circles, and one red circle beside a red triangle
    trace = ats.capture(shapes, [prompt, prompt], seed=[1, 7], store=tmp_path / "t.zarr", num_inference_steps=6)
    table = heatmap_iou(trace)
    heat = word_maps(trace, ["red circle"], sample=0).values[0]
    circles = [[o for o in detect(image) if (o.colour, o.shape) == ("red", "circle")] for image in trace.images]
    assert [len(found) for found in circles] == [2, 1]
    assert table["detected"].tolist() == [True, True, True, False]  # as eval counts: score_image's "present"
    assert table["detected"].tolist() == [p for image in trace.images for p in score_image(prompt, image)["present"]]
    # each of the two circles of sample 0 is compared with its own box
    assert table["iou"].iloc[:2].tolist() == pytest.approx([float(box_iou(heat, o.box, 0.4)) for o in circles[0]])
    assert np.isnan(table["iou"].iloc[3])
