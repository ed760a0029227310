"""Edge cases of the shapes model, its world, detector, evaluation, loading and demo (an audit's findings)."""

import signal
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.models import eval_prompts, evaluate, paired_differences, run_demo, score_image
from attnscope.models.shapes import (
    Scene,
    ShapeObject,
    check_vocabulary,
    detect,
    make_clip_tokenizer,
    parse_prompt,
    render,
    sample_scene,
)


@contextmanager
def deadline(seconds):
    """Fail (instead of hanging the run) when the block takes longer than ``seconds``."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- the world
@pytest.mark.parametrize("prompt", [None, 3, b"a red circle"])
def test_prompt_of_wrong_type_is_one_clear_error(prompt):
    for call in (check_vocabulary, parse_prompt, lambda p: eval_prompts(["a red circle", p])):
        with pytest.raises(AttnscopeError, match=r"prompt=.*expected a string"):
            call(prompt)


def test_run_demo_refuses_a_prompt_of_wrong_type(tmp_path):
    with pytest.raises(AttnscopeError, match=r"prompt=3: expected a string"):
        run_demo(3, out=tmp_path / "a.zarr")


@pytest.mark.parametrize("size", [0, 8, 12, 15.5, "32"])
def test_sample_scene_refuses_sizes_it_cannot_fill(size):
    with deadline(20), pytest.raises(AttnscopeError, match=rf"size={size!r}: expected an int"):
        sample_scene(0, "three", size=size)


def test_sample_scene_still_draws_at_the_sizes_the_model_makes():
    for size in (16, 64, 128):
        for kind in ("single", "two", "relation", "three"):
            scene = sample_scene(1, kind, size=size)
            assert scene.size == size and render(scene).shape == (size, size, 3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 0, "mixture": (1.0, 0.0)}, "mixture"),
        ({"seed": 0, "mixture": (0.5, 0.5, 0.5, -0.5)}, "mixture"),
    ],
)
def test_sample_scene_names_a_bad_seed_or_mixture(kwargs, name):
    with pytest.raises(AttnscopeError, match=rf"^{name}="):
        sample_scene(**kwargs)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_words_must_be_a_list_of_letter_words(tmp_path):
    with pytest.raises(AttnscopeError, match=r"words='red': expected a sequence of words"):
        make_clip_tokenizer(tmp_path / "a", "red")
    with pytest.raises(AttnscopeError, match=r"words: 'red-ish' is not letters only"):
        make_clip_tokenizer(tmp_path / "b", ["red", "red-ish"])


# ----------------------------------------------------------------------------- scoring
def _two_red_circles(first, second):
    objects = tuple(ShapeObject("red", "circle", box) for box in (first, second))
    return render(Scene(objects, "a red circle and a red circle"))


def test_relation_between_identical_objects_does_not_depend_on_left_right_order():
    # the upper circle is on the right: "the leftmost detection" is the lower one
    image = _two_red_circles((18.0, 2.0, 28.0, 12.0), (2.0, 18.0, 12.0, 28.0))
    assert len(detect(image)) == 2
    for prompt in (
        "a red circle above a red circle",
        "a red circle below a red circle",
        "a red circle to the left of a red circle",
        "a red circle to the right of a red circle",
    ):
        assert score_image(prompt, image)["relation_correct"] is True, prompt
    # side by side at the same height: neither is above the other
    level = _two_red_circles((2.0, 10.0, 12.0, 20.0), (18.0, 10.0, 28.0, 20.0))
    assert score_image("a red circle above a red circle", level)["relation_correct"] is False
    assert score_image("a red circle to the left of a red circle", level)["relation_correct"] is True


def test_relation_of_distinct_objects_still_follows_the_prompt_order():
    image = render(
        Scene(
            (
                ShapeObject("red", "circle", (18.0, 2.0, 28.0, 12.0)),
                ShapeObject("blue", "square", (2.0, 18.0, 12.0, 28.0)),
            ),
            "x",
        )
    )
    assert score_image("a red circle above a blue square", image)["relation_correct"] is True
    assert score_image("a blue square above a red circle", image)["relation_correct"] is False


# ----------------------------------------------------------------------------- eval arguments
@pytest.mark.parametrize("n", [2.5, True, "3"])
def test_eval_prompts_names_a_bad_n_for_a_named_set(n):
    with pytest.raises(AttnscopeError, match=rf"n={n!r}: expected a positive"):
        eval_prompts("two", n=n)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_eval_prompts_names_a_bad_seed_for_a_named_set(seed):
    with pytest.raises(AttnscopeError, match=rf"seed={seed!r}: expected an int"):
        eval_prompts("two", n=2, seed=seed)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 1.5}, r"batch_size=1.5: expected a positive integer"),
        ({"batch_size": True}, r"batch_size=True: expected a positive integer"),
        ({"batch_size": "2"}, r"batch_size='2': expected a positive integer"),
        ({"bootstrap": 0}, r"bootstrap=0: expected an int >= 1"),
        ({"bootstrap": -1}, r"bootstrap=-1: expected an int >= 1"),
        ({"interventions": "regulation"}, r"interventions='regulation': expected a sequence of hook clients"),
        ({"interventions": object()}, r"interventions=<object.*: expected a sequence of hook clients"),
        # a generator would be used up by the first batch, and later batches run without the interventions
        ({"interventions": (c for c in [])}, r"interventions=<generator.*: expected a sequence of hook clients"),
    ],
)
def test_evaluate_names_bad_arguments_before_generating(shapes, kwargs, match, monkeypatch):
    monkeypatch.setattr(type(shapes), "__call__", lambda *a, **k: pytest.fail("generated before checking"))
    with pytest.raises(AttnscopeError, match=match):
        evaluate(shapes, ["a red circle"], progress=False, **kwargs)


@pytest.mark.parametrize(
    "name", ["prompt", "generator", "num_images_per_prompt", "output_type", "latents", "prompt_embeds", "return_dict"]
)
def test_evaluate_refuses_pipeline_arguments_it_sets_itself(shapes, name, monkeypatch):
    # a `prompt=` would generate another prompt than the one scored, a `generator=` would make the recorded
    # seeds untrue, `num_images_per_prompt=2` would score image 2 against prompt 2, ...
    monkeypatch.setattr(type(shapes), "__call__", lambda *a, **k: pytest.fail("generated before checking"))
    value = {
        "prompt": "a blue square",
        "generator": torch.manual_seed(5),
        "num_images_per_prompt": 2,
        "output_type": "np",
        "latents": torch.zeros(1, 4, 16, 16),
        "prompt_embeds": torch.zeros(1, 16, 64),
        "return_dict": False,
    }[name]
    with pytest.raises(AttnscopeError, match=rf"{name}=.*set by evaluate"):
        evaluate(shapes, ["a red circle"], progress=False, **{name: value})


def test_paired_differences_names_a_bad_bootstrap():
    row = {"prompt": "a red circle", "seed": 0, "kind": "single", "all_present": True, "exact": True, "extra": False}
    with pytest.raises(AttnscopeError, match=r"bootstrap=0: expected an int >= 1"):
        paired_differences({"per_prompt": [row]}, {"per_prompt": [row]}, bootstrap=0)


def test_paired_differences_matches_hand_computation():
    def row(i, ok, extra):
        return {
            "prompt": f"p{i}",
            "seed": i,
            "kind": "distinct",
            "all_present": ok,
            "exact": ok and not extra,
            "extra": extra,
        }

    before = [(True, False), (False, False), (False, True), (True, True), (True, False)]
    after = [(True, False), (True, False), (True, True), (False, False), (True, False)]
    d = paired_differences(
        {"per_prompt": [row(i, *r) for i, r in enumerate(before)]},
        {"per_prompt": [row(i, *r) for i, r in enumerate(after)]},
    )["metrics"]
    # all_present: 3/5 -> 4/5, fixed rows 1 and 2, broken row 3
    assert (d["all_present"]["before"], d["all_present"]["after"]) == (0.6, 0.8)
    assert (d["all_present"]["fixed"], d["all_present"]["broken"]) == (2, 1)
    # exact: [T, F, F, F, T] -> [T, T, F, F, T]
    assert (d["exact"]["before"], d["exact"]["after"], d["exact"]["fixed"], d["exact"]["broken"]) == (0.4, 0.6, 1, 0)
    # extra: [F, F, T, T, F] -> [F, F, T, F, F]: row 3 fixed (its extra objects gone), none broken
    assert (d["extra"]["difference"], d["extra"]["fixed"], d["extra"]["broken"]) == (pytest.approx(-0.2), 1, 0)
    lo, hi = d["all_present"]["ci95"]
    assert -1 <= lo < 0.2 < hi <= 1
    same = paired_differences(
        {"per_prompt": [row(i, False, False) for i in range(4)]},
        {"per_prompt": [row(i, True, False) for i in range(4)]},
    )["metrics"]["all_present"]
    assert same["ci95"] == [1.0, 1.0] and (same["fixed"], same["broken"], same["n"]) == (4, 0, 4)


# ----------------------------------------------------------------------------- the pipeline
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 0}, r"height=0: the shapes model makes images"),
        ({"width": 0}, r"width=0: the shapes model makes images"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0: expected an int >= 1"),
        ({"prompt": []}, r"prompt=\[\]: expected a string or a list of strings, not an empty list"),
    ],
)
def test_shapes_pipeline_refuses_sizes_counts_and_empty_batches(shapes, kwargs, match):
    with pytest.raises(AttnscopeError, match=match):
        shapes(**{"prompt": "a red circle", **kwargs})


def test_shapes_pipeline_refuses_a_prompt_it_would_truncate(shapes):
    prompt = "a red circle and a blue square and a green triangle and a yellow circle"
    with pytest.raises(AttnscopeError, match=r"prompt='a red circle.*17 tokens.*at most 16"):
        shapes(prompt, num_inference_steps=1)
    with pytest.raises(AttnscopeError, match=r"negative_prompt=.*17 tokens"):
        shapes("a red circle", negative_prompt=prompt, num_inference_steps=1)
    longest = "a red circle and a blue square and a green triangle"  # 13 tokens with SOT/EOT
    assert len(shapes(longest, num_inference_steps=1, generator=torch.manual_seed(0)).images) == 1


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("model", [None, 3])
def test_load_pipeline_names_a_model_of_wrong_type(model):
    with pytest.raises(AttnscopeError, match=rf"model={model!r}: expected"):
        ats.load_pipeline(model)


@pytest.mark.parametrize("index", ["{}", "[1]", '{"_class_name": 3}'])
def test_load_pipeline_names_a_bad_model_index(tmp_path, index):
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(AttnscopeError, match=r"model_index.json"):
        ats.load_pipeline(tmp_path)


@pytest.fixture(scope="module")
def saved_shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "copy"
    ats.load_pipeline("shapes").save_pretrained(path)
    return path


def test_load_pipeline_never_unpickles_weights(tmp_path, monkeypatch):
    path = tmp_path / "bin"
    ats.load_pipeline("shapes").save_pretrained(path, safe_serialization=False)
    assert list(path.glob("unet/*.bin"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.load({args[0] if args else kwargs}) called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(AttnscopeError, match=r"safetensors"):
        ats.load_pipeline(path)


def _rewrite_unet(source, target, change):
    import shutil

    shutil.copytree(source, target)
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)


def test_load_pipeline_refuses_weights_missing_a_tensor(saved_shapes, tmp_path):
    _rewrite_unet(saved_shapes, tmp_path / "m", lambda t: t.pop("conv_in.bias"))
    with pytest.raises(AttnscopeError, match=r"unet.*conv_in.bias"):
        ats.load_pipeline(tmp_path / "m")


def test_load_pipeline_error_for_a_local_directory_does_not_blame_the_cache(saved_shapes, tmp_path):
    _rewrite_unet(saved_shapes, tmp_path / "w", lambda t: t.update({"conv_in.bias": torch.zeros(33)}))
    with pytest.raises(AttnscopeError, match=r"conv_in.bias") as info:
        ats.load_pipeline(tmp_path / "w")
    assert "Hugging Face cache" not in str(info.value) and "not a local diffusers directory" not in str(info.value)


def test_a_saved_copy_still_loads_and_generates_the_same(saved_shapes):
    a = ats.load_pipeline(saved_shapes)("a red circle", num_inference_steps=2, generator=torch.manual_seed(0))
    b = ats.load_pipeline("shapes")("a red circle", num_inference_steps=2, generator=torch.manual_seed(0))
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


# ----------------------------------------------------------------------------- demo
def test_demo_counts_repeated_objects_and_lists_every_extra_one(tmp_path):
    out = tmp_path / "d.zarr"
    summary = run_demo("a red circle and a red circle", seed=0, out=out)
    found = [(o.colour, o.shape) for o in detect(ats.open_trace(out).images[0])]
    circles = found.count(("red", "circle"))
    assert summary.count("red circle: present") == min(circles, 2)
    assert summary.count("red circle: MISSING") == 2 - min(circles, 2)
    extras = [f"{c} {s}" for c, s in found if (c, s) != ("red", "circle")] + ["red circle"] * max(0, circles - 2)
    also = [line for line in summary.splitlines() if line.strip().startswith("also found:")]
    if extras:
        assert len(also) == 1 and sorted(also[0].split(":", 1)[1].strip().split(", ")) == sorted(extras)
    else:
        assert not also
