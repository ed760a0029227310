"""The ``attnscope`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="See and steer what text-to-image diffusion models attend to.")


@app.callback()
def main() -> None:
    """attnscope: capture, analyse and steer cross-attention of diffusers models."""


@app.command(epilog="Example: attnscope capture --model ./my-sd-model --prompt 'a red circle and a blue square' "
                    "--seed 0 --steps 20 --out runs/a.zarr")
def capture(
    model: Path = typer.Option(..., help="Local diffusers pipeline directory (saved with save_pretrained)."),
    prompt: list[str] = typer.Option(..., help="Prompt; repeat the option for several prompts."),
    out: Path = typer.Option(..., help="Trace store to create (a .zarr directory)."),
    seed: int = typer.Option(0, help="Seed of the CPU generator for the latents."),
    steps: int = typer.Option(20, help="Number of inference steps."),
    guidance: float | None = typer.Option(None, help="Guidance scale (default: the pipeline's)."),
    height: int | None = typer.Option(None, help="Image height in pixels."),
    width: int | None = typer.Option(None, help="Image width in pixels."),
    images_per_prompt: int = typer.Option(1, help="Images per prompt."),
    negative_prompt: str | None = typer.Option(None, help="Negative prompt."),
    sites: list[str] | None = typer.Option(None, help="Glob of site module paths to record; repeatable (default all)."),
    capture_steps: str | None = typer.Option(None, help="Steps to record as START:STOP[:STEP] or a comma list (default all)."),
    heads: str = typer.Option("mean", help="'mean' (average heads on the device) or 'all'."),
    tokens: str = typer.Option("all", help="'all' text positions or 'prompt' (up to the end-of-text token)."),
    branch: str = typer.Option("cond", help="'cond', 'uncond' or 'both' classifier-free-guidance halves."),
    device: str | None = typer.Option(None, help="Device to run on (cpu, cuda, …)."),
    dtype: str | None = typer.Option(None, help="float32, float16 or bfloat16."),
    overwrite: bool = typer.Option(False, help="Replace an existing trace at --out."),
) -> None:
    """Generate with a local diffusers model and record its cross-attention maps into a trace store."""
    import attnscope as ats

    try:
        pipe = ats.load_pipeline(model, device=device, dtype=dtype)
        kwargs = {k: v for k, v in dict(guidance_scale=guidance, height=height, width=width,
                                         negative_prompt=negative_prompt).items() if v is not None}
        tr = ats.capture(pipe, prompt if len(prompt) > 1 else prompt[0], seed=seed, store=out,
                         sites=sites or None, steps=_parse_steps(capture_steps), heads=heads, tokens=tokens,
                         branch=branch, overwrite=overwrite, num_inference_steps=steps,
                         num_images_per_prompt=images_per_prompt, **kwargs)
    except ats.AttnscopeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"trace: {tr.path}  ({len(tr.sites)} sites, {len(tr.timesteps)} steps, {len(tr.images)} images)")


def _parse_steps(spec: str | None) -> object:
    from attnscope.errors import AttnscopeError

    if spec is None:
        return None
    try:
        if ":" in spec:
            return slice(*(int(p) if p else None for p in spec.split(":")))
        return [int(p) for p in spec.split(",") if p.strip()]
    except (ValueError, TypeError) as exc:
        raise AttnscopeError(f"--capture-steps {spec!r}: expected START:STOP[:STEP] or a comma-separated list of ints") from exc


if __name__ == "__main__":
    app()
