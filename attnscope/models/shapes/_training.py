"""Training the shapes model from scratch on the CPU: first the autoencoder, then text encoder + UNet.

Deterministic (every batch, noise draw and caption dropout is seeded by ``(seed, stage, step)``),
resumable from the last checkpoint, with a progress bar and a JSON-lines loss log.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...errors import AttnscopeError
from ._model import assemble, build_components
from ._world import render, sample_scene

__all__ = ["TrainConfig", "train_shapes"]

_STAGES = ("vae", "diffusion")
#: Caption kinds the autoencoder sees (fixed: every kind of scene must reconstruct well).
VAE_MIXTURE = (0.3, 0.3, 0.25, 0.15)
#: multipliers that spread (seed, stage, step) over distinct torch.Generator seeds (:func:`_generator`)
_SEED_STAGE, _SEED_STEP = 1_000_003, 10_000_019


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (stored with its checkpoints; a resume must match it)."""

    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    ema: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    #: probabilities of single / two / relation / three-object captions in the UNet stage. Multi-object
    #: scenes are a minority, as in real caption data; the autoencoder stage always sees (0.3, 0.3, 0.25, 0.15).
    mixture: tuple[float, float, float, float] = (0.7, 0.1, 0.1, 0.1)


def _check_run(config: TrainConfig, threads: int | None) -> None:
    """Counts that must be positive ints, and the seed, checked before the run's folder is made.

    Every batch and noise draw is seeded from ``(seed, stage, step)`` (:func:`_scenes`, :func:`_generator`), so
    the seed must be an int ≥ 0 small enough that each step's ``torch.Generator`` seed stays below 2**64.

    >>> _check_run(TrainConfig(checkpoint_every=0), None)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: checkpoint_every=0: expected an int >= 1
    >>> _check_run(TrainConfig(seed=-1), None)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: seed=-1: expected an int from 0 to 1844665 (the training seeds each step's torch.Generator with it, which takes seeds up to 2**64 - 1)
    """
    counts = {name: getattr(config, name) for name in ("vae_steps", "vae_batch", "steps", "batch", "checkpoint_every")}
    if threads is not None:
        counts["threads"] = threads
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AttnscopeError(f"{name}={value!r}: expected an int >= 1")
    # the largest seed whose last step's generator seed, (seed · _SEED_STAGE + stage) · _SEED_STEP + step, fits
    largest = ((2**64 - 1 - (max(config.vae_steps, config.steps) - 1)) // _SEED_STEP - (len(_STAGES) - 1)) // _SEED_STAGE
    seed = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= largest:
        raise AttnscopeError(f"seed={seed!r}: expected an int from 0 to {largest} (the training seeds each step's "
                             f"torch.Generator with it, which takes seeds up to 2**64 - 1)")


def _generator(config: TrainConfig, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((config.seed * _SEED_STAGE + _STAGES.index(stage)) * _SEED_STEP + step)


def _scenes(config: TrainConfig, stage: str, step: int, n: int):
    rng = np.random.default_rng([config.seed, _STAGES.index(stage), step])
    mixture = config.mixture if stage == "diffusion" else VAE_MIXTURE
    scenes = [sample_scene(rng, mixture=mixture) for _ in range(n)]
    pixels = np.stack([render(s) for s in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return [s.caption for s in scenes], images


def _lr(config: TrainConfig, step: int, total: int, peak: float) -> float:
    if step < config.warmup:
        return peak * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, total - config.warmup)
    return peak * (config.final_lr_fraction + (1 - config.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


class _Checkpoint:
    """``checkpoint.safetensors`` (weights, EMA, optimiser moments) + ``checkpoint.json`` (stage, step, config)."""

    def __init__(self, out: Path):
        self.tensors, self.meta = out / "checkpoint.safetensors", out / "checkpoint.json"

    def save(self, meta: dict[str, Any], modules: dict[str, torch.nn.Module], optimiser: torch.optim.Optimizer,
             ema: dict[str, torch.Tensor]) -> None:
        tensors = {f"model.{name}.{k}": v.detach().contiguous() for name, m in modules.items()
                   for k, v in m.state_dict().items()}
        tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.items()})
        for i, p in enumerate(p for g in optimiser.param_groups for p in g["params"]):
            for k, v in optimiser.state.get(p, {}).items():
                tensors[f"opt.{i}.{k}"] = v.detach().reshape(v.shape).contiguous()
        tmp = self.tensors.with_suffix(".tmp")
        save_file(tensors, tmp)
        tmp.replace(self.tensors)
        self.meta.with_suffix(".tmp").write_text(json.dumps(meta, indent=1))
        self.meta.with_suffix(".tmp").replace(self.meta)

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        if not self.meta.is_file():
            return None
        return json.loads(self.meta.read_text()), load_file(self.tensors)


def _restore(tensors: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module],
             optimiser: torch.optim.Optimizer | None, ema: dict[str, torch.Tensor] | None) -> None:
    for name, m in modules.items():
        prefix = f"model.{name}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema.{k}"])
    if optimiser is not None:
        for i, p in enumerate(p for g in optimiser.param_groups for p in g["params"]):
            state = {k.split(".", 2)[2]: v.clone() for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if state:
                optimiser.state[p] = state


def _log_lines(path: Path, keep: Any) -> None:
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and keep(json.loads(ln))]
        path.write_text("".join(ln + "\n" for ln in lines))


def train_shapes(out: str | Path, config: TrainConfig = TrainConfig(), *, resume: bool = False,
                 threads: int | None = None, progress: bool = True) -> Path:
    """Train the shapes model into ``out`` and save the pipeline to ``out/pipeline``; return that path.

    Stage 1 trains the AutoencoderKL (MSE + ``kl_weight`` · KL) and sets its ``scaling_factor`` to
    1 / std of the latents; stage 2 trains the CLIP text encoder and the UNet together
    (v-prediction, cosine noise schedule, AdamW with warm-up and cosine decay, gradient clipping,
    EMA weights, ``caption_dropout`` empty captions for classifier-free guidance). The saved
    pipeline holds the EMA weights. ``out/loss.jsonl`` logs every step. With ``resume=True`` the
    run continues from ``out/checkpoint.*`` and gives the same weights as an uninterrupted run.

    Examples
    --------
    >>> import tempfile
    >>> from attnscope.models.shapes import TrainConfig, train_shapes
    >>> cfg = TrainConfig(vae_steps=2, vae_batch=2, steps=2, batch=2, warmup=1)
    >>> (train_shapes(tempfile.mkdtemp(), cfg, progress=False) / "model_index.json").is_file()
    True
    """
    from tqdm.auto import tqdm

    out = Path(out)
    _check_run(config, threads)
    if out.exists() and not out.is_dir():
        raise AttnscopeError(f"out={str(out)!r} is a file; expected a directory for the run")
    if resume and not out.exists():
        raise AttnscopeError(f"out={str(out)!r}: no run to resume there (the directory does not exist)")
    if out.exists() and not resume and any(out.iterdir()):
        raise AttnscopeError(f"out={str(out)!r}: directory is not empty; pass resume=True to continue it")
    out.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    checkpoint, log_path = _Checkpoint(out), out / "loss.jsonl"
    parts = build_components(out / "tokenizer", seed=config.seed)
    vae, unet, text_encoder, tokenizer, noise = (parts[k] for k in ("vae", "unet", "text_encoder", "tokenizer",
                                                                      "scheduler"))
    state = checkpoint.load() if resume else None
    stage, start = "vae", 0
    if state is not None:
        meta, tensors = state
        if meta["config"] != json.loads(json.dumps(asdict(config))):
            now = json.loads(json.dumps(asdict(config)))
            changed = {f.name for f in fields(config) if meta["config"].get(f.name) != now[f.name]}
            raise AttnscopeError(f"resume: the checkpoint in {str(out)!r} was made with other settings ({', '.join(sorted(changed))})")
        stage, start = meta["stage"], meta["step"]
    else:
        _log_lines(log_path, lambda row: False)
    t0 = time.perf_counter()

    def log(row: dict[str, Any]) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps({**row, "elapsed_s": round(time.perf_counter() - t0, 2)}) + "\n")

    # ---------------------------------------------------------------- stage 1: autoencoder
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    if stage == "vae":
        if state is not None:
            _restore(state[1], {"vae": vae}, vae_opt, None)
            _log_lines(log_path, lambda row: row["stage"] == "vae" and row["step"] < start)
        bar = tqdm(range(start, config.vae_steps), desc="autoencoder", disable=not progress, initial=start,
                   total=config.vae_steps)
        vae.train()
        for step in bar:
            gen = _generator(config, "vae", step)
            _, images = _scenes(config, "vae", step, config.vae_batch)
            for g in vae_opt.param_groups:
                g["lr"] = _lr(config, step, config.vae_steps, config.vae_lr)
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
            loss = torch.nn.functional.mse_loss(recon, images) + config.kl_weight * posterior.kl().mean()
            vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
            vae_opt.step()
            log({"stage": "vae", "step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.vae_steps:
                checkpoint.save({"stage": "vae", "step": step + 1, "config": asdict(config)}, {"vae": vae}, vae_opt, {})
        vae.eval()
        with torch.no_grad():
            _, images = _scenes(config, "vae", config.vae_steps, 256)
            latents = vae.encode(images).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        stage, start, state = "diffusion", 0, None
    del vae_opt

    # ---------------------------------------------------------------- stage 2: text encoder + UNet
    trained = {"unet": unet, "text_encoder": text_encoder}
    params = [p for m in trained.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    ema = {f"{name}.{k}": v.detach().clone() for name, m in trained.items() for k, v in m.state_dict().items()}
    if state is not None:
        _restore(state[1], {**trained, "vae": vae}, opt, ema)
        vae.register_to_config(scaling_factor=state[0]["scaling_factor"])
        _log_lines(log_path, lambda row: row["stage"] == "vae" or row["step"] < start)
    scaling = vae.config.scaling_factor
    vae.requires_grad_(False)
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    bar = tqdm(range(start, config.steps), desc="text encoder + unet", disable=not progress, initial=start,
               total=config.steps)
    unet.train()
    text_encoder.train()
    for step in bar:
        gen = _generator(config, "diffusion", step)
        captions, images = _scenes(config, "diffusion", step, config.batch)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        dropped = torch.rand(len(captions), generator=gen) < config.caption_dropout
        ids[dropped] = empty
        with torch.no_grad():  # the posterior mean: its std is large next to the signal, samples would be mostly noise
            latents = vae.encode(images).latent_dist.mean * scaling
        eps = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(captions),), generator=gen)
        noisy = noise.add_noise(latents, eps, t)
        target = noise.get_velocity(latents, eps, t)
        for g in opt.param_groups:
            g["lr"] = _lr(config, step, config.steps, config.lr)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        decay = min(config.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, m in trained.items():
                for k, v in m.state_dict().items():
                    if v.is_floating_point():
                        ema[f"{name}.{k}"].lerp_(v, 1 - decay)
                    else:
                        ema[f"{name}.{k}"].copy_(v)
        log({"stage": "diffusion", "step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            checkpoint.save({"stage": "diffusion", "step": step + 1, "scaling_factor": scaling, "config": asdict(config)},
                            {**trained, "vae": vae}, opt, ema)

    for name, m in trained.items():
        m.load_state_dict({k.split(".", 1)[1]: v for k, v in ema.items() if k.startswith(f"{name}.")})
        m.eval()
    pipe = assemble(parts)
    target_dir = out / "pipeline"
    pipe.save_pretrained(target_dir, safe_serialization=True)
    return target_dir
