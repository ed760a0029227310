"""LoRA files loaded by attnscope (``load_pipeline(..., lora=)``, ``attnscope capture --lora``): the trace records each
file (absolute path, SHA-256, adapter name, scale) as ``model.adapters.lora_sources``, and a rerun that loads the
model loads them again, so ``ats.rerun(trace)`` and ``attnscope rerun`` reproduce the image without ``pipe=``; a
changed or missing file, a pickled file or a bad scale is one error naming it."""

import hashlib
import shutil

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.testing import tiny_sd_pipeline

from .conftest import cli, error_line
from .test_adapters_audit6 import image, lora_dir  # noqa: F401 - the LoRA fixture (a folder saved by save_lora_weights)

pytest.importorskip("peft")

PROMPT = "a red circle and a blue square"
RUN = dict(num_inference_steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny SD pipeline the LoRA fits, saved with save_pretrained (a model reference a rerun can load)."""
    path = tmp_path_factory.mktemp("model")
    tiny_sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def lora_file(lora_dir, tmp_path):  # noqa: F811
    """A copy of the LoRA file this test may change or remove."""
    return shutil.copy(lora_dir / "pytorch_lora_weights.safetensors", tmp_path / "style.safetensors")


def by_hand(loras):
    """The plain image of the tiny SD pipeline with ``loras`` ([(path, name, scale)]) loaded by diffusers' own calls."""
    pipe = tiny_sd_pipeline()
    for path, name, _ in loras:
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters([n for _, n, _ in loras], adapter_weights=[s for _, _, s in loras])
    return np.asarray(pipe(PROMPT, generator=torch.Generator().manual_seed(0), **RUN).images[0])


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_load_pipeline_lora_is_diffusers_load_and_is_recorded(model_dir, lora_dir, tmp_path):  # noqa: F811
    """``lora=`` loads the file as ``load_lora_weights`` + ``set_adapters`` do (the same image, bit for bit); the
    manifest names the file by absolute path and SHA-256, with the adapter name and scale."""
    pipe = ats.load_pipeline(model_dir, lora={"path": lora_dir, "scale": 0.5})
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **RUN)
    expected = by_hand([(lora_dir, "default_0", 0.5)])
    np.testing.assert_array_equal(image(tr), expected)
    assert np.abs(by_hand([(lora_dir, "default_0", 1.0)]).astype(float) - expected).max() > 0  # the scale counts
    file = lora_dir / "pytorch_lora_weights.safetensors"
    assert tr.manifest["model"]["adapters"]["lora_sources"] == [
        {"path": str(file.resolve()), "sha256": sha256(file), "adapter_name": "default_0", "scale": 0.5}]
    pipe.unload_lora_weights()  # no LoRA left: nothing recorded for a rerun to load
    plain = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "b.zarr", **RUN)
    assert "lora_sources" not in plain.manifest["model"]["adapters"]


def test_rerun_without_pipe_loads_the_lora_files_again(model_dir, lora_dir, lora_file, tmp_path):  # noqa: F811
    """Two LoRA files, both active with their scales: ``ats.rerun(trace)`` loads the model and the files again and
    makes the same image and maps, bit for bit (it refused the trace before: the loaded model had no LoRA)."""
    pipe = ats.load_pipeline(model_dir, lora=[lora_dir, {"path": lora_file, "adapter_name": "ink", "scale": -0.7}])
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **RUN)
    np.testing.assert_array_equal(image(tr), by_hand([(lora_dir, "default_0", 1.0), (lora_file, "ink", -0.7)]))
    assert tr.manifest["model"]["adapters"]["lora"]["unet"]["active"] == ["default_0", "ink"]
    again = ats.rerun(tr, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))
    for site in tr.sites:
        np.testing.assert_array_equal(again.attention(site).values, tr.attention(site).values)
    assert again.manifest["model"]["adapters"] == tr.manifest["model"]["adapters"]


@pytest.mark.parametrize("change", ["changed", "missing"])
def test_rerun_refuses_a_changed_or_missing_lora_file(change, model_dir, lora_file, tmp_path):
    pipe = ats.load_pipeline(model_dir, lora=lora_file)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **RUN)
    if change == "changed":
        with open(lora_file, "ab") as f:
            f.write(b" ")
    else:
        lora_file.unlink()
    said = "the file's SHA-256 is .*, expected" if change == "changed" else "no such file"
    with pytest.raises(ats.AttnscopeError, match=rf"cannot rerun trace .*LoRA files.*lora='{lora_file}': {said}"):
        ats.rerun(tr, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()


@pytest.mark.parametrize("given, said", [
    ("w.ckpt", r"a pickled file \(\.ckpt\); attnscope reads LoRA weights from \.safetensors files only"),
    ("w.bin", r"a pickled file \(\.bin\)"),
    ("w.txt", r"expected a \.safetensors file"),
    ("absent.safetensors", "no such file"),
    ("two", r"the folder holds 2 \.safetensors files \(a\.safetensors, b\.safetensors\); expected exactly one"),
    ({"path": "a.safetensors", "scale": "0.5"}, r"scale='0\.5'; expected a finite number"),
    ({"path": "a.safetensors", "scale": float("nan")}, r"scale=nan; expected a finite number"),
])
def test_bad_lora_input_is_one_error(given, said, tmp_path):
    for name in ("w.ckpt", "w.bin", "w.txt", "two/a.safetensors", "two/b.safetensors"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    given = {**given, "path": str(tmp_path / given["path"])} if isinstance(given, dict) else str(tmp_path / given)
    with pytest.raises(ats.AttnscopeError, match=rf"^lora=.*{said}"):
        ats.load_pipeline("shapes", lora=given)


def test_cli_capture_with_lora_and_rerun(model_dir, lora_file, tmp_path):
    out = tmp_path / "a.zarr"
    done = cli("capture", "--model", model_dir, "--prompt", PROMPT, "--seed", "0", "--steps", "2", "--height", "32",
               "--width", "32", "--lora", f"{lora_file}=0.5", "--out", out)
    assert done.exit_code == 0, done.stderr
    tr = ats.open_trace(out)
    np.testing.assert_array_equal(image(tr), by_hand([(lora_file, "default_0", 0.5)]))
    assert tr.manifest["model"]["adapters"]["lora_sources"][0]["sha256"] == sha256(lora_file)
    done = cli("rerun", out, "-o", tmp_path / "b.zarr")  # no flag: the trace knows its LoRA
    assert done.exit_code == 0, done.stderr
    np.testing.assert_array_equal(image(ats.open_trace(tmp_path / "b.zarr")), image(tr))


@pytest.mark.parametrize("given, said", [
    ("{file}=strong", "--lora '{file}=strong': SCALE 'strong' is not a finite number; expected PATH or PATH=SCALE"),
    ("{dir}/w.pt", "--lora '{dir}/w.pt': a pickled file (.pt)"),
    ("{dir}/none.safetensors=2", "--lora '{dir}/none.safetensors': no such file"),
    ("{dir}/w=pt.safetensors", "--lora '{dir}/w=pt.safetensors': cannot load it into the ShapesPipeline: SafetensorError"),  # a name with '=': the whole path
])
def test_cli_bad_lora_is_one_error(given, said, lora_file, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    (tmp_path / "w=pt.safetensors").write_bytes(b"not safetensors")
    fill = dict(file=lora_file, dir=tmp_path)
    done = cli("capture", "--prompt", PROMPT, "--steps", "1", "--lora", given.format(**fill),
               "--out", tmp_path / "a.zarr")
    assert error_line(done).startswith("error: " + said.format(**fill))
    assert not (tmp_path / "a.zarr").exists()


def test_a_lora_for_another_model_is_one_error(lora_dir):  # noqa: F811
    """The tiny SD pipeline's LoRA does not fit the shapes model (other widths): diffusers' size-mismatch error, cut
    short, in one AttnscopeError naming the file."""
    with pytest.raises(ats.AttnscopeError, match=r"^lora='.*pytorch_lora_weights\.safetensors': cannot load it into "
                                                 r"the ShapesPipeline: RuntimeError: .*size mismatch.* …$"):
        ats.load_pipeline("shapes", lora=lora_dir)


def test_a_sweep_resumed_with_the_lora_loaded_otherwise_names_the_files(model_dir, lora_dir, tmp_path):  # noqa: F811
    """The same LoRA at the same scale, loaded by hand instead of from ``lora=``: the sweep's recorded adapters differ
    only in ``lora_sources``; the refusal named nothing ('other settings (adapters: )') — now the files."""
    run = dict(progress=False, **RUN)
    ats.sweep(ats.load_pipeline(model_dir, lora=lora_dir), [PROMPT], [0], tmp_path / "sw", **run)
    by_hand = ats.load_pipeline(model_dir)
    by_hand.load_lora_weights(str(lora_dir), adapter_name="default_0")
    file = (lora_dir / "pytorch_lora_weights.safetensors").resolve()
    with pytest.raises(ats.AttnscopeError, match=rf"other settings \(adapters: LoRA files \(load_pipeline\(lora=\)\): "
                                                 rf"{file} ×1\.0 \(sha256 {sha256(file)[:12]}…\) then, none now\)"):
        ats.sweep(by_hand, [PROMPT], [0, 1], tmp_path / "sw", **run)
