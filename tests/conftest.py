"""Shared fixtures: tiny random-weight SD and SDXL pipelines built from config (offline)."""

import numpy as np
import pytest
import torch

from attnscope.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

RUN = dict(num_inference_steps=3, height=32, width=32)


@pytest.fixture(scope="session")
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def sd2_pipe():
    """SD 2.x style: linear projections in the transformer blocks, DPM-Solver++ scheduler."""
    return tiny_sd_pipeline(linear_projection=True, scheduler="dpm")


@pytest.fixture(scope="session")
def sdxl_pipe():
    return tiny_sdxl_pipeline()


@pytest.fixture(params=["sd", "sdxl"])
def any_pipe(request, sd_pipe, sdxl_pipe):
    return sd_pipe if request.param == "sd" else sdxl_pipe


def generate(pipe, prompt="a red circle and a blue square", seed=0, **kwargs):
    """Plain pipeline call (no attnscope), returning a uint8 image array."""
    out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **{**RUN, **kwargs})
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


class AttnInputs:
    """Plain torch forward pre-hooks (independent of attnscope) that keep every attn2 call's inputs."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.handles = pipe, {}, []

    def __enter__(self):
        for name, module in self.pipe.unet.named_modules():
            if name.endswith("attn2"):
                self.calls[name] = []
                self.handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def _hook(self, name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            self.calls[name].append((hidden.detach().clone(), text.detach().clone()))

        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def reference_probs(module, hidden, text):
    """softmax(Q Kᵀ · d^-½) per head, from the module's own to_q/to_k: (batch, heads, queries, tokens)."""
    with torch.no_grad():
        q = module.to_q(hidden)
        k = module.to_k(text)
        b, n, inner = q.shape
        d = inner // module.heads
        q = q.view(b, n, module.heads, d).permute(0, 2, 1, 3).double()
        k = k.view(b, -1, module.heads, d).permute(0, 2, 1, 3).double()
        logits = q @ k.transpose(-1, -2) / np.sqrt(d)
        e = torch.exp(logits - logits.amax(-1, keepdim=True))
        return (e / e.sum(-1, keepdim=True)).numpy()
