"""Shared fixtures: tiny random-weight SD and SDXL pipelines built from config (offline), the embedded
shapes model, and ``cli`` to run the ``attnscope`` command line in this process."""

import os

# One torch thread per test process, and the same for every process a test starts (the CLI's entry
# point, the Jupyter kernels of the notebooks): on a machine where another process holds a core,
# torch's default thread pool spins at every barrier and a 30 s notebook can take over 600 s. Speed
# is measured by benchmarks/, never here; `pytest -n 2` (see README) uses the cores instead.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner, Result  # noqa: E402

import attnscope as ats  # noqa: E402
from attnscope.testing import tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

torch.set_num_threads(1)  # also when torch was imported before this file (the doctests of attnscope/)

RUN = dict(num_inference_steps=3, height=32, width=32)


def cli(*args: str | os.PathLike) -> Result:
    """``attnscope ARGS`` run in this process with typer's CliRunner, as ``python -m attnscope`` runs it.

    The result has ``exit_code``, ``stdout`` and ``stderr`` apart (``output`` is both, interleaved).
    An unexpected exception propagates with its traceback instead of becoming exit code 1. The command
    must leave torch's thread count and the global torch and numpy random states as it found them:
    the tests that follow share this interpreter.
    """
    from attnscope.cli import app

    threads, torch_rng, numpy_rng = torch.get_num_threads(), torch.random.get_rng_state(), np.random.get_state()
    result = CliRunner().invoke(app, [str(a) for a in args], prog_name="attnscope", catch_exceptions=False)
    assert torch.get_num_threads() == threads, f"attnscope {args}: left torch on {torch.get_num_threads()} threads"
    assert torch.equal(torch.random.get_rng_state(), torch_rng), f"attnscope {args}: drew from torch's global RNG"
    after = np.random.get_state()
    assert after[0] == numpy_rng[0] and np.array_equal(after[1], numpy_rng[1]) and after[2:] == numpy_rng[2:], \
        f"attnscope {args}: drew from numpy's global RNG"
    return result


def error_line(done: Result) -> str:
    """The command's one error line (asserting exit status 2, no traceback, and that it is the last line)."""
    assert done.exit_code == 2, (done.exit_code, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, done.stderr
    return lines[-1]


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


@pytest.fixture(scope="session")
def shapes():
    """The embedded shapes model, loaded once: a test that changes it (scheduler, hooks) puts it back."""
    return ats.load_pipeline("shapes")


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


BUCKET = "traces"


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on a free localhost port, with one bucket; ``s3.options`` are the storage_options."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        yield type("S3", (), {"endpoint": endpoint, "client": client, "options": options})
    finally:
        server.stop()
