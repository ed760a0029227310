"""Stop 45: the weights fingerprint sees every change of a model's values, also writes through ``.data`` (which
leave a tensor's version counter alone: peft's ``fuse_lora`` merges so)."""

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.testing import tiny_sd_pipeline


def _capture(pipe, path):
    return ats.capture(pipe, "a red circle", seed=0, store=path, num_inference_steps=2, height=32, width=32)


def test_a_weight_changed_through_data_after_a_capture_is_seen_by_the_next(tmp_path):
    pipe = tiny_sd_pipeline()
    before = _capture(pipe, tmp_path / "a.zarr").manifest["model"]["weights_fingerprint"]
    with torch.no_grad():
        pipe.unet.conv_in.weight.data.mul_(0.5)   # in place through .data: the tensor's _version does not move
    after = _capture(pipe, tmp_path / "b.zarr").manifest["model"]["weights_fingerprint"]
    fresh = tiny_sd_pipeline()
    with torch.no_grad():
        fresh.unet.conv_in.weight.mul_(0.5)        # the same values, reached the ordinary way on a new pipeline
    assert after["unet"] != before["unet"]
    assert after["unet"] == ats.store.weights_fingerprint(fresh)["unet"]
    assert after["text_encoder"] == before["text_encoder"] and after["vae"] == before["vae"]


def test_a_rerun_on_weights_changed_through_data_is_refused(tmp_path):
    pipe = tiny_sd_pipeline()
    trace = _capture(pipe, tmp_path / "a.zarr")
    ats.store.weights_fingerprint(pipe)              # fingerprinted (and, before the fix, cached) once more
    with torch.no_grad():
        pipe.unet.conv_in.weight.data.add_(1e-3)
    with pytest.raises(ats.AttnscopeError, match="the weights of unet differ"):
        ats.rerun(trace, pipe=pipe, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()


def test_the_fingerprint_is_the_one_traces_recorded_before(tmp_path):
    """Computed per device in one copy now, it must stay the digest older traces hold: names, shapes, dtypes and
    the strided float64 sample of each tensor, in state-dict order (an independent recomputation)."""
    import hashlib

    pipe = tiny_sd_pipeline()
    digest = hashlib.sha256()
    for name, t in pipe.unet.state_dict().items():
        flat = t.reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(np.ascontiguousarray(flat[::max(1, flat.numel() // 4096)].double().numpy()).tobytes())
    assert ats.store.weights_fingerprint(pipe)["unet"] == digest.hexdigest()
