"""The ``attnscope`` command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer
from typer.core import TyperGroup


class _Commands(TyperGroup):
    """The command group, whose usage errors (a missing option, a word where a number goes, an unknown command) are
    one ``error: …`` line, as the commands' own errors are, instead of typer's usage line and boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001, ANN201
        import sys

        try:
            from typer._click.exceptions import ClickException  # typer vendors click from 0.25 on
        except ImportError:
            from click import ClickException

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except ClickException as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # `attnscope` alone: the help is shown already
                typer.echo(f"error: {_usage_message(exc)}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_message(exc: Exception) -> str:
    """A usage error's message on one line, with the value typer could not convert and where the help is."""
    message = " ".join(exc.format_message().split())
    errors = getattr(exc.__cause__, "errors", None)  # typer converts values with pydantic, whose message omits them
    if callable(errors) and errors() and "input" in errors()[0] and ": " in message:
        head, _, tail = message.partition(": ")
        message = f"{head} {str(errors()[0]['input'])!r}: {tail}"
    ctx = getattr(exc, "ctx", None)
    return message + (f" (see '{ctx.command_path} --help' for help)" if ctx is not None else "")


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="See and steer what text-to-image diffusion models attend to.")


@app.callback()
def main(ctx: typer.Context) -> None:
    """attnscope: capture, analyse and steer cross-attention of diffusers models."""
    import warnings

    previous = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        typer.echo(f"warning: {message}", err=True)

    warnings.showwarning = one_line  # "warning: …" lines, as errors are "error: …"
    ctx.call_on_close(lambda: setattr(warnings, "showwarning", previous))


_MODEL_HELP = "'shapes' (the embedded model), a local diffusers directory, or a hub id in the local cache."


#: pipeline arguments attnscope itself passes on every capture: never a ``--set``
_SET_BY_ATTNSCOPE = {"prompt": "--prompt", "generator": "--seed", "seed": "--seed", "return_dict": None}


def _pipeline_args(items: list[str], taken: dict[str, str] | None = None, option: str = "--set") -> dict:
    """``--set NAME=VALUE`` options as keyword arguments (VALUE parsed as JSON, else kept as a string).

    ``taken``: keyword → the command's own flag that sets it (a ``--set`` of it is refused, naming the flag).

    >>> _pipeline_args(["eta=0.5", "use_resolution_binning=false"])
    {'eta': 0.5, 'use_resolution_binning': False}
    >>> _pipeline_args(["num_inference_steps=3"], {"num_inference_steps": "--steps"})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: --set num_inference_steps: the command sets num_inference_steps itself; use --steps
    """
    import json

    import attnscope as ats

    found = {}
    refused = {**_SET_BY_ATTNSCOPE, **taken} if taken is not None else {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise ats.AttnscopeError(f"{option} {item!r}: expected NAME=VALUE with a Python identifier as NAME "
                                     f"(e.g. {'use_resolution_binning=false' if option == '--set' else 'anon=true'})")
        if name in refused:
            flag = refused[name]
            raise ats.AttnscopeError(f"{option} {name}: the command sets {name} itself"
                                     + (f"; use {flag}" if flag else " (attnscope reads the pipeline's output)"))
        try:
            found[name] = json.loads(value)
        except json.JSONDecodeError:
            found[name] = value
    return found


_LORA_HELP = ("A LoRA to load into the model: a local .safetensors file (or a folder holding one), as PATH or "
              "PATH=SCALE (default scale 1.0); repeat the option for several, all applied. The trace records each "
              "file's path and SHA-256, so 'attnscope rerun' loads them again.")


def _lora_args(items: list[str]) -> list[dict] | None:
    """``--lora PATH[=SCALE]`` options as ``load_pipeline``'s ``lora=`` entries (the last ``=`` splits off SCALE).

    >>> _lora_args(["styles/ink.safetensors=0.7", "b.safetensors"])
    [{'path': 'styles/ink.safetensors', 'scale': 0.7}, {'path': 'b.safetensors', 'scale': 1.0}]
    >>> _lora_args(["a.safetensors=strong"])
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: --lora 'a.safetensors=strong': SCALE 'strong' is not a finite number; expected PATH or PATH=SCALE, e.g. a.safetensors=0.8
    """
    import math

    import attnscope as ats

    found = []
    for item in items:
        path, _, text = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            scale = float(text)
        except ValueError:
            scale = math.nan
        if not math.isfinite(scale) and Path(item).exists():  # a file whose name holds '=', given without SCALE
            path, text, scale = item, "1", 1.0
        if not path or not math.isfinite(scale):
            raise ats.AttnscopeError(f"--lora {item!r}: SCALE {text!r} is not a finite number; expected PATH or PATH=SCALE, "
                                     f"e.g. a.safetensors=0.8" if path else
                                     f"--lora {item!r}: no PATH; expected PATH or PATH=SCALE, e.g. a.safetensors=0.8")
        found.append({"path": path, "scale": scale})
    return found or None


def _check_sizes(height: int | None, width: int | None) -> None:
    """Refuse an image size below one pixel: diffusers takes ``height or default``, so 0 would be the default."""
    import attnscope as ats

    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise ats.AttnscopeError(f"{flag} {value}: expected a positive number of pixels")


def _given(ctx: typer.Context, *names: str) -> list[str]:
    """The options among ``names`` (keyword names) that the command line gave, not left at their defaults."""
    return [name for name in names if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")]


def _refuse_unused(ctx: typer.Context, names: tuple[str, ...], why: str) -> None:
    """Refuse the first option of ``names`` the command line gave: it would be accepted and then ignored; ``why``
    says when it applies ("it applies with --convergence only")."""
    import attnscope as ats

    for name in _given(ctx, *names):
        flag, value = "--" + name.replace("_", "-"), ctx.params[name]
        shown = repr(value) if isinstance(value, str) else value
        raise ats.AttnscopeError(f"{flag} {shown}: {why}; leave {flag} out")


_KEEP_BITS_HELP = ("Store the maps lossily with this many of float16's 10 mantissa bits (1-10: each value within "
                   "2**-(bits+1) relative; 3-4 about halve the maps' bytes). Default: lossless.")


def _flags(*same: str, **renamed: str) -> dict[str, str]:
    """Python keyword → CLI flag: ``same`` keywords are spelled as flags (``max_sequence_length`` →
    ``--max-sequence-length``), ``renamed`` ones are given."""
    return {**{name: "--" + name.replace("_", "-") for name in same}, **renamed}


#: per command (by the name of its function here), the library's keyword arguments that its flags set: library
#: messages name keywords (``seed=…``, ``pass overwrite=True``), the command line's name its flags
_CLI_FLAGS = {
    "capture": _flags("model", "prompt", "overwrite", "seed", "device", "dtype", "lora", "sites", "heads", "tokens", "branch", "height",
                      "width", "negative_prompt", "max_sequence_length", "output_change", "keep_bits",
                      num_inference_steps="--steps",
                      steps="--capture-steps", guidance_scale="--guidance", num_images_per_prompt="--images-per-prompt",
                      store="--out"),
    "demo": _flags("overwrite", "seed", "device", "prompt", "out", store="--out"),
    "rerun": _flags("overwrite", "device", "epochs", "lr", store="--out", gate_step="--tgate", factor="--reweight factor",
                    tol="--tgate-tol"),
    "eval_": _flags("model", "prompts", "intervention", "seed", "device", "n", "batch_size", num_inference_steps="--steps", guidance_scale="--guidance",
                   json_path="--json"),
    "sweep_": _flags("model", "seeds", "out", "workers", "devices", "threads", "dtype", "sites", "heads", "tokens", "branch",
                    "height", "width", "keep_bits", num_inference_steps="--steps", steps="--capture-steps",
                    guidance_scale="--guidance"),
    "stats": _flags("steps", "sites", "targets", "by", "tol", "of"),
    "plot": _flags("steps", "sites", "words", "kind", "sample", "tol", "of", targets="--words"),
    "sweep_stats": _flags("steps", "sites", "targets"),
    "report": _flags("overwrite", "compare", "words", "sites", "sample", "tol", path="-o", targets="--words"),
    "train_shapes": _flags("out", "steps", "batch", "vae_steps", "checkpoint_every", "threads", "resume", "seed"),
}


def _cli_words(message: str, flags: dict[str, str]) -> str:
    """A library message in the command line's words: ``overwrite=True`` → ``--overwrite``, ``seed=…`` → ``--seed …``.

    >>> _cli_words("store 'a.zarr' exists; pass overwrite=True to replace it", _CLI_FLAGS["capture"])
    "store 'a.zarr' exists; pass --overwrite to replace it"
    >>> _cli_words("num_inference_steps=0: expected an int >= 1; TGate(steps=2)", _CLI_FLAGS["capture"])
    '--steps 0: expected an int >= 1; TGate(steps=2)'
    """
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    before = r"(?<![\w.(\[-])"  # a keyword on its own, not an attribute, a call's argument or a longer name
    message = re.sub(rf"{before}({names})=True\b", lambda m: flags[m[1]], message)
    message = re.sub(rf"{before}({names})=", lambda m: flags[m[1]] + " ", message)
    return re.sub(rf"^({names}):", lambda m: flags[m[1]] + ":", message)


def _fail(exc: Exception) -> typer.Exit:
    """Print a library error as one ``error: …`` line in the calling command's own flags; exit status 2."""
    import inspect

    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None  # the command's function: its name picks the flags
    flags = _CLI_FLAGS.get(caller.f_code.co_name, {}) if caller is not None else {}
    message = " ".join(str(exc).split())  # one line, whatever the message holds
    typer.echo(f"error: {_cli_words(message, flags)}", err=True)
    return typer.Exit(2)


def _pipeline_failed(exc: Exception, out: str, settings: list[str] | None) -> typer.Exit:
    """One ``error: …`` line for an exception the pipeline raised during a capture, saying what became of --out."""
    import json

    import attnscope as ats

    # an --overwrite run that did not complete says so in a note: the old trace is kept, its partial trace is beside it
    notes = [n for n in getattr(exc, "__notes__", ()) if isinstance(n, str) and n.startswith("attnscope: ")]
    try:
        attrs = json.loads((Path(out) / "zarr.json").read_bytes())["attributes"]
    except (OSError, ValueError, TypeError, KeyError):
        attrs = None
    if notes:
        kept = "; " + notes[-1].removeprefix("attnscope: ")
    elif isinstance(attrs, dict) and attrs.get("complete") is True:  # failed before its first step: nothing written
        kept = f"; the trace at --out {out!r} is unchanged"
    else:
        kept = (f"; the incomplete trace at --out {out!r} is kept (pass --overwrite to replace it)"
                if attrs is not None else "")
    hint = f" (check the --set values: {', '.join(settings)})" if settings else ""
    return _fail(ats.AttnscopeError(f"the pipeline failed: {type(exc).__name__}: {exc}{hint}{kept}"))


@app.command(epilog="Example: attnscope capture --model shapes --prompt 'a red circle and a blue square' "
                    "--seed 0 --steps 20 --out runs/a.zarr")
def capture(
    model: str = typer.Option("shapes", help=_MODEL_HELP),
    prompt: list[str] = typer.Option(..., help="Prompt; repeat the option for several prompts."),
    out: str = typer.Option(..., help="Trace store to create (a .zarr directory)."),
    seed: int = typer.Option(0, help="Seed of the CPU generator for the latents."),
    steps: int = typer.Option(20, help="Number of inference steps."),
    guidance: float | None = typer.Option(None, help="Guidance scale (default: the pipeline's)."),
    height: int | None = typer.Option(None, help="Image height in pixels."),
    width: int | None = typer.Option(None, help="Image width in pixels."),
    images_per_prompt: int = typer.Option(1, help="Images per prompt."),
    negative_prompt: str | None = typer.Option(None, help="Negative prompt."),
    max_sequence_length: int | None = typer.Option(
        None, help="Text tokens of the prompt (SD3, Flux, PixArt, Sana; default: the pipeline's). A longer prompt is an error."),
    sites: list[str] | None = typer.Option(None, help="Glob of site module paths to record; repeatable (default all)."),
    capture_steps: str | None = typer.Option(None, help="Steps to record as START:STOP[:STEP] or a comma list (default all)."),
    heads: str = typer.Option("mean", help="'mean' (average heads on the device) or 'all'."),
    tokens: str = typer.Option("auto", help="'all' text positions, 'prompt' (each segment up to its end-of-text token) "
                                            "or 'auto' (prompt on transformers, all on CLIP UNets)."),
    branch: str = typer.Option("cond", help="'cond', 'uncond' or 'both' classifier-free-guidance halves."),
    device: str | None = typer.Option(None, help="Device to run on (cpu, cuda, …)."),
    dtype: str | None = typer.Option(None, help="float32, float16 or bfloat16."),
    lora: list[str] | None = typer.Option(None, "--lora", metavar="PATH[=SCALE]", help=_LORA_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing trace at --out."),
    output_change: bool = typer.Option(False, "--output-change",
                                       help="Also record each site's per-step output norm and change "
                                            "(for 'attnscope stats --convergence --of outputs')."),
    keep_bits: int | None = typer.Option(None, "--keep-bits", help=_KEEP_BITS_HELP),
    pipeline_arg: list[str] | None = typer.Option(
        None, "--set", help="Another pipeline argument as NAME=VALUE, VALUE in JSON (true, 3, \"text\", [1,2]) or a "
                            "bare string; repeatable. E.g. --set use_resolution_binning=false for PixArt/Sana."),
) -> None:
    """Generate with a local diffusers model and record its cross-attention maps into a trace store.

    With --lora PATH[=SCALE] (repeatable) the model runs with those LoRA files; the trace records them, so 'attnscope rerun' loads them again."""
    import attnscope as ats
    from attnscope.capture import check_scale
    from attnscope.selection import parse_step_text

    try:
        _check_sizes(height, width)
        check_scale("guidance_scale", guidance)  # NaN would turn guidance off without a word
        extra = _pipeline_args(pipeline_arg or [], _CLI_FLAGS["capture"])
        pipe = ats.load_pipeline(model, device=device, dtype=dtype, lora=_lora_args(lora or []))
        kwargs = {k: v for k, v in dict(guidance_scale=guidance, height=height, width=width,
                                         negative_prompt=negative_prompt,
                                         max_sequence_length=max_sequence_length).items() if v is not None}
        kwargs.update(extra)
        tr = ats.capture(pipe, prompt if len(prompt) > 1 else prompt[0], seed=seed, store=out,
                         sites=sites or None, steps=parse_step_text(capture_steps, "--capture-steps"), heads=heads, tokens=tokens,
                         branch=branch, overwrite=overwrite, output_change=output_change, keep_bits=keep_bits,
                         num_inference_steps=steps,
                         num_images_per_prompt=images_per_prompt, **kwargs)
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None
    except Exception as exc:  # noqa: BLE001 - the pipeline's own failure, e.g. on a --set value it cannot use
        raise _pipeline_failed(exc, out, pipeline_arg) from None
    typer.echo(f"trace: {tr.path}  ({_trace_counts(tr)})")


def _trace_counts(tr: object) -> str:
    """``"7 sites, 3 steps (2 recorded), 1 image"``: what a written trace holds, the recorded steps when not all."""
    steps, recorded = len(tr.timesteps), len(tr.manifest.get("capture", {}).get("steps", tr.timesteps))
    counts = [(len(tr.sites), "site"), (steps, "step"), (len(tr.images), "image")]
    site, step, image = (f"{n} {word}{'' if n == 1 else 's'}" for n, word in counts)
    return f"{site}, {step}{f' ({recorded} recorded)' if recorded != steps else ''}, {image}"


@app.command(epilog="Example: attnscope demo --prompt 'a red circle and a blue square' --seed 0 --out runs/demo.zarr  "
                    "(the trace the examples of stats, plot, rerun and report read)")
def demo(
    prompt: str = typer.Option("a red circle and a blue square", help="A shapes-world prompt."),
    seed: int = typer.Option(0, help="Seed of the generation."),
    out: str = typer.Option("runs/demo.zarr", help="Trace store to create; the image (<stem>.png) and the heat "
                                                          "maps (<stem>-heatmaps.png) are written beside it."),
    overwrite: bool = typer.Option(False, help="Replace an existing trace at --out and the images beside it."),
    device: str | None = typer.Option(None, help="Device to run on (cpu, cuda, …)."),
) -> None:
    """Generate with the embedded shapes model, capture every cross-attention map, and summarise."""
    import attnscope as ats
    from attnscope.models import run_demo

    try:
        typer.echo(run_demo(prompt, seed=seed, out=out, device=device, overwrite=overwrite))
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None


@app.command("eval", epilog="Example: attnscope eval --prompts two --n 300 --seed 0 --intervention regulation "
                             "--paired --per-kind --json runs/eval-two.json")
def eval_(
    prompts: str = typer.Option("two", help="single, two, relation, three, or a text file with one prompt per line."),
    n: int = typer.Option(100, help="Number of prompts (drawn from the named set; first N of a file)."),
    seed: int = typer.Option(0, help="Prompt i is generated with seed SEED+i; the named sets are drawn with SEED."),
    model: str = typer.Option("shapes", help=_MODEL_HELP),
    intervention: list[str] | None = typer.Option(None, help="Intervention to install while generating: regulation, "
                                                             "reweight, attend-excite (Attend-and-Excite: moves the latent), tgate, "
                                                             "spatial (SpatialTemporal, layouts from the relation words) or "
                                                             "spatial-optimised (the same with λ optimised per image "
                                                             "against the attention objective); repeatable."),
    steps: int | None = typer.Option(None, help="Inference steps (default: the pipeline's)."),
    guidance: float | None = typer.Option(None, help="Guidance scale (default: the pipeline's)."),
    batch_size: int = typer.Option(16, help="Prompts per pipeline call (no intervention couples the samples; the "
                                                "denoiser's float rounding varies slightly with it)."),
    per_kind: bool = typer.Option(False, "--per-kind", help="Also report per prompt kind: distinct, shared colour, "
                                                            "shared shape (two objects), single, three."),
    paired: bool = typer.Option(False, "--paired", help="Also generate without the interventions, on the same "
                                                        "prompts and seeds, and report the paired differences."),
    json_out: str | None = typer.Option(None, "--json", help="Write the full result (rates, CIs, per prompt) here; "
                                                              "with --paired also the baseline and the differences."),
    device: str | None = typer.Option(None, help="Device to run on (cpu, cuda, …)."),
    overwrite: bool = typer.Option(False, help="Replace an existing file at --json."),
) -> None:
    """Generate with fixed seeds, detect the objects, and report presence rates with 95% bootstrap CIs."""
    import json

    import attnscope as ats
    from attnscope.capture import check_scale
    from attnscope.models import evaluate, format_paired, format_report, named_interventions, paired_differences

    try:
        if overwrite and json_out is None:
            raise ats.AttnscopeError("--overwrite replaces the file at --json: give --json too")
        if json_out is not None:
            json_out = _output_file(json_out, "--json", overwrite=overwrite)
        check_scale("guidance_scale", guidance)  # NaN would turn guidance off without a word
        clients = named_interventions(intervention or [])
        if paired and not clients:
            raise ats.AttnscopeError("--paired compares against a run without interventions: give --intervention")
        pipe = ats.load_pipeline(model, device=device)
        kwargs = {k: v for k, v in dict(num_inference_steps=steps, guidance_scale=guidance).items() if v is not None}
        run = dict(n=n, seed=seed, batch_size=batch_size, **kwargs)
        baseline = evaluate(pipe, prompts, **run) if paired else None
        result = evaluate(pipe, prompts, interventions=clients, **run)
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None
    if baseline is not None:
        typer.echo("without interventions:\n" + format_report(baseline, per_kind) + "\n")
    typer.echo(format_report(result, per_kind))
    if baseline is not None:
        result = {**result, "baseline": baseline, "paired": paired_differences(baseline, result, seed=seed)}
        typer.echo("\n" + format_paired(result["paired"], per_kind))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
        typer.echo(f"json: {json_out}")


@app.command("train-shapes", epilog="Example: attnscope train-shapes --out runs/shapes-train --steps 3000 --threads 2")
def train_shapes(
    out: Path = typer.Option(Path("runs/shapes-train"), help="Run directory: checkpoints, loss.jsonl, pipeline/."),
    steps: int = typer.Option(3000, help="Text-encoder + UNet training steps."),
    batch: int = typer.Option(64, help="Batch size of the UNet stage."),
    vae_steps: int = typer.Option(600, help="Autoencoder training steps (stage 1)."),
    seed: int = typer.Option(0, help="Seed of the weights, the data and the noise."),
    checkpoint_every: int = typer.Option(250, help="Steps between checkpoints."),
    threads: int | None = typer.Option(None, help="Torch CPU threads (use 1 on a shared machine)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
) -> None:
    """Train the embedded shapes model from scratch (about 16 minutes on 2 CPU cores with the defaults)."""
    import attnscope as ats
    from attnscope.models.shapes import TrainConfig
    from attnscope.models.shapes import train_shapes as train

    try:
        config = TrainConfig(seed=seed, vae_steps=vae_steps, steps=steps, batch=batch, checkpoint_every=checkpoint_every)
        path = train(out, config, resume=resume, threads=threads)
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None
    typer.echo(f"pipeline: {path}  (use it with --model {shlex.quote(str(path))}, or ats.load_pipeline({str(path)!r}))")


def _split_words(spec: str | None, flag: str | None = None) -> list[str] | None:
    """``"red circle,square"`` → ``["red circle", "square"]`` (commas separate targets; spaces make phrases).

    ``flag``: the option ``spec`` came from; given, an option with no word in it (``--words ','``, ``--targets ''``)
    is an error naming it, not the default words (None: the option was left out).

    >>> _split_words("red circle, square")
    ['red circle', 'square']
    >>> _split_words(" , ", "--words")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: --words ' , ': expected comma-separated words or phrases, e.g. 'red circle,square'; leave --words out for the default
    """
    words = [w.strip() for w in spec.split(",") if w.strip()] if spec is not None else None
    if flag is not None and words == []:
        import attnscope as ats

        raise ats.AttnscopeError(f"{flag} {spec!r}: expected comma-separated words or phrases, e.g. 'red circle,square'; "
                                 f"leave {flag} out for the default")
    return words or None


@app.command(epilog="Example: attnscope stats runs/demo.zarr --targets 'circle,square' --by step  "
                    "(or: attnscope stats runs/demo.zarr --convergence --tol 0.05)")
def stats(
    ctx: typer.Context,
    trace: str = typer.Argument(..., help="Trace store (a .zarr directory written by attnscope capture), or its URL "
                                          "(s3://…, file://…; S3 settings from the environment, e.g. AWS_ENDPOINT_URL)."),
    targets: str | None = typer.Option(None, help="Comma-separated words or phrases, e.g. 'red circle,square' "
                                                  "(default: every word of the prompt)."),
    sites: list[str] | None = typer.Option(None, help="Glob of site module paths; repeatable (default all)."),
    steps: str | None = typer.Option(None, help="Steps as START:STOP[:STEP] or a comma list (default all)."),
    by: str = typer.Option("word", help="Table per 'word' (token), per 'step', per 'site' or per 'block' (down/mid/up; "
                                        "double/single; a flat stack's early/middle/late third)."),
    convergence: bool = typer.Option(False, "--convergence", help="Print the step-to-step convergence curve and the "
                                                                  "suggested TGATE gate step instead."),
    tol: float = typer.Option(0.05, help="Tolerance of the convergence's stable step."),
    of: str = typer.Option("auto", help="Convergence of the 'maps', the 'outputs' (traces captured with "
                                        "--output-change) or 'auto' (outputs when recorded)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole Dataset as JSON instead of a table."),
) -> None:
    """Attention-dominance statistics of a trace: mass share, dominance ratio, entropy, Gini, sink share, coverage."""
    import json

    import attnscope as ats
    from attnscope.selection import parse_step_text

    try:
        if convergence:
            _refuse_unused(ctx, ("targets", "by"), "--convergence prints the step-to-step change of the whole "
                                                  "maps, one row per step, of no target word")
        else:
            _refuse_unused(ctx, ("tol", "of"), "it applies with --convergence only")
            if as_json:
                _refuse_unused(ctx, ("by",), "--json prints the whole Dataset, not a table")
        tr = _open_trace(trace)
        if convergence:
            ds = ats.stats.convergence(tr, sites=sites or None, steps=parse_step_text(steps, "--steps"), tol=tol, of=of)
            if as_json:
                typer.echo(json.dumps(ats.stats.dominance_json(ds)))
                return
            typer.echo(ats.stats.convergence_table(ds))
            typer.echo(_gate_step_line(ds, tol))
            return
        chosen = _split_words(targets, "--targets")
        if chosen is None:
            _prompt_words(tr)  # the default targets: every word of the prompt; an empty prompt has none
        ds = ats.stats.dominance(tr, targets=chosen, sites=sites or None, steps=parse_step_text(steps, "--steps"))
        typer.echo(json.dumps(ats.stats.dominance_json(ds)) if as_json else ats.stats.dominance_table(ds, by=by))
        note = None if as_json else _gated_note(tr, ds["step"].values.tolist())[0]
        if note:
            typer.echo(f"note: {note}")
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None


def _gated_note(tr, steps: list[int]) -> tuple[str | None, bool]:
    """A note naming which of ``steps`` an intervention gated (TGATE: attention served from its cache, no maps), or
    None; and whether every one of them was gated."""
    from attnscope.selection import step_ranges

    chosen = {int(s) for s in steps}
    gated = sorted(set(tr.gated_steps) & chosen)
    if not gated:
        return None, False
    every = len(gated) == len(chosen)
    return (f"step{'s' if len(gated) > 1 else ''} {step_ranges(gated)} gated (TGATE: attention reused from the cache, "
            f"no maps): " + ("nothing to show there; choose other --steps" if every else "left out of the means"),
            every)


@app.command(epilog="Example: attnscope rerun runs/demo.zarr --regulate 'circle,square' -o runs/demo-reg.zarr\n\n"
                     "Example: attnscope rerun runs/demo.zarr --excite 'circle,square' -o runs/demo-excite.zarr\n\n"
                     "Example: attnscope rerun runs/demo.zarr --tgate 10 -o runs/demo-tgate.zarr\n\n"
                     "Example: attnscope rerun runs/demo.zarr --layout 'a red circle=0,0.2,0.45,0.8;"
                     "a blue square=0.55,0.2,1,0.8' -o runs/demo-layout.zarr\n\n"
                     "Example: attnscope rerun runs/demo.zarr --layout auto --optimise -o runs/demo-opt.zarr\n\n"
                     "Example: attnscope rerun runs/demo-opt.zarr --layout trace -o runs/demo-opt-again.zarr")
def rerun(
    ctx: typer.Context,
    trace: str = typer.Argument(..., help="Trace store to regenerate (a complete .zarr written by attnscope capture), "
                                          "or its URL (then give -o)."),
    out: str | None = typer.Option(None, "-o", "--out", help="Trace store to create "
                                                              "(default: <trace stem>-rerun.zarr beside TRACE)."),
    regulate: str | None = typer.Option(None, help="Attention Regulation of these comma-separated targets, "
                                                   "e.g. 'circle,square' or 'red circle,blue square'."),
    reweight: list[str] | None = typer.Option(None, help="WORD=FACTOR: scale the attention on WORD by FACTOR, "
                                                         "e.g. square=2.0; repeatable."),
    excite: str | None = typer.Option(None, help="Attend-and-Excite (the baseline that moves the latent) of these "
                                                 "comma-separated subjects, e.g. 'circle,square'."),
    tgate: str | None = typer.Option(None, help="TGATE: run this many steps in full, then reuse the cached "
                                                "cross-attention without guidance; an integer (10), a share of "
                                                "the steps (0.4), or 'auto' (the gate step TRACE's convergence "
                                                "suggests)."),
    tgate_tol: float | None = typer.Option(None, help="With --tgate auto: the tolerance of TRACE's convergence that "
                                                      "sets the gate step (relative step-to-step change of the "
                                                      "cross-attention; default 0.05)."),
    layout: str | None = typer.Option(None, help="Spatial-temporal control: 'PHRASE=x0,y0,x1,y1;PHRASE=x,y' (boxes or "
                                                 "centres in [0, 1], x right, y down), 'auto' (from the prompt's "
                                                 "relation words), or 'trace' (the layout and λ TRACE was made with)."),
    spatial_weight: float | None = typer.Option(None, help="With --layout: λ, the local prompts' weight at every "
                                                          "step (with --optimise: where the optimisation starts; "
                                                          "default 1.0)."),
    optimise: bool = typer.Option(False, "--optimise", help="With --layout: optimise λ over the trajectory first "
                                                            "(attention objective, Adam, --epochs, --lr); the trace "
                                                            "stores them."),
    epochs: int = typer.Option(3, help="With --optimise: sampled trajectories, one Adam update each."),
    lr: float = typer.Option(5e-3, help="With --optimise: Adam's learning rate."),
    overwrite: bool = typer.Option(False, help="Replace an existing trace at --out."),
    device: str | None = typer.Option(None, help="Device to run on (default: the trace's)."),
) -> None:
    """Regenerate a trace exactly (same model, seed, scheduler) with interventions on; compare target shares.

    A trace captured with --lora loads the same LoRA files again (each must still have its recorded SHA-256)."""
    import attnscope as ats

    try:
        targets, subjects = _split_words(regulate), _split_words(excite)
        for flag, given, words in (("--regulate", regulate, targets), ("--excite", excite, subjects)):
            if given is not None and not words:
                raise ats.AttnscopeError(f"{flag} {given!r}: expected comma-separated words, e.g. 'circle,square'")
        if spatial_weight is not None and (layout is None or layout.strip() == "trace"):
            raise ats.AttnscopeError("--spatial-weight sets SpatialTemporal's λ: give --layout PHRASE=BOX;… or auto too")
        if not optimise:
            _refuse_unused(ctx, ("epochs", "lr"), "it applies with --optimise only")
        elif layout is not None and layout.strip() == "trace":
            raise ats.AttnscopeError("--optimise optimises λ anew, --layout trace reuses the λ TRACE was made with: "
                                     "give --layout PHRASE=BOX;… or auto to optimise")
        weights = [_parse_reweight(spec) for spec in reweight or []]
        if tgate_tol is not None and (tgate is None or tgate.strip() != "auto"):
            raise ats.AttnscopeError(f"--tgate-tol {tgate_tol:g} sets the tolerance of --tgate auto: give --tgate auto too")
        clients = _rerun_interventions(targets, weights)
        clients += [_parse_tgate(tgate, trace, 0.05 if tgate_tol is None else tgate_tol)] if tgate is not None else []
        if subjects:
            clients.append(ats.regulate.AttendAndExcite(subjects))
        if layout is not None and layout.strip() == "trace":
            clients.append(ats.regulate.SpatialTemporal.from_trace(ats.open_trace(trace)))
        elif layout is not None:
            clients.append(ats.regulate.SpatialTemporal(_parse_layout(layout), weights=1.0 if spatial_weight is None
                                                        else spatial_weight, epochs=epochs,
                                                        lr=lr, objective="attention" if optimise else None))
        elif optimise:
            raise ats.AttnscopeError("--optimise optimises SpatialTemporal's λ: give --layout too")
        tr = ats.rerun(trace, clients, store=out, overwrite=overwrite, device=device)
        chosen = list(dict.fromkeys([*(targets or []), *(w for w, _ in weights), *(subjects or [])])) or None
        comparison = ats.compare(trace, tr, chosen)
        table, image_change = comparison.table(), comparison.image_change()  # table(): + the steps note when gated
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None
    typer.echo(f"trace: {tr.path}  ({_trace_counts(tr)}; "
               f"interventions: {', '.join(i['name'] for i in tr.manifest['interventions']) or 'none'})")
    if image_change is not None:
        typer.echo(f"image change: {image_change:.4f} mean absolute difference per pixel and channel (0-1)")
    typer.echo(f"mean target share, {trace} -> {tr.path}:")
    typer.echo(table)


def _parse_layout(spec: str) -> dict | None:
    """``--layout 'red circle=0.1,0.3,0.45,0.7;blue square=0.7,0.5'`` → {phrase: box or centre}; 'auto' → None.

    >>> _parse_layout("red circle=0.1,0.3,0.45,0.7; blue square=0.7,0.5")
    {'red circle': (0.1, 0.3, 0.45, 0.7), 'blue square': (0.7, 0.5)}
    """
    import attnscope as ats

    if spec.strip() == "auto":
        return None
    layout = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        phrase, sep, values = item.partition("=")
        try:
            numbers = tuple(float(v) for v in values.split(","))
        except ValueError:
            numbers = ()
        if not sep or not phrase.strip() or len(numbers) not in (2, 4):
            raise ats.AttnscopeError(f"--layout {item!r}: expected PHRASE=x0,y0,x1,y1 (a box) or PHRASE=x,y (a centre)")
        layout[phrase.strip()] = numbers
    if not layout:
        raise ats.AttnscopeError(f"--layout {spec!r}: expected 'PHRASE=x0,y0,x1,y1;…' or 'auto'")
    return layout


def _gate_step_line(conv, tol: float) -> str:
    """``suggested gate step: N``, or why there is none."""
    import attnscope as ats

    try:
        return f"suggested gate step: {ats.stats.suggest_gate_step(conv, tol=tol)}"
    except ats.AttnscopeError as exc:
        return f"suggested gate step: none — {exc}"


def _parse_tgate(spec: str, trace: str, tol: float) -> object:
    from attnscope import AttnscopeError
    from attnscope.regulate import TGate

    if spec.strip() == "auto":
        return TGate("auto", reference=trace, tol=tol)
    try:
        value: int | float = int(spec)
    except ValueError:
        try:
            value = float(spec)
        except ValueError:
            raise AttnscopeError(f"--tgate {spec!r}: expected an integer gate step (10), a share of the steps "
                                 f"(0.4) or 'auto'") from None
    return TGate(value)


def _parse_reweight(spec: str) -> tuple[str, float]:
    from attnscope import AttnscopeError

    word, sep, factor = spec.rpartition("=")
    try:
        if not sep or not word.strip():
            raise ValueError
        return word.strip(), float(factor)
    except ValueError:
        raise AttnscopeError(f"--reweight {spec!r}: expected WORD=FACTOR, e.g. square=2.0") from None


def _rerun_interventions(targets: list[str] | None, weights: list[tuple[str, float]]) -> list[object]:
    import attnscope as ats

    clients: list[object] = [ats.regulate.AttentionRegulation(targets=targets)] if targets else []
    return clients + [ats.regulate.Reweight(word, factor) for word, factor in weights]


_PLOT_KINDS = ("heatmaps", "grid", "violins", "dominance", "convergence")


@app.command(epilog="Example: attnscope plot runs/demo.zarr --words 'circle,blue square' -o runs/heatmaps.png")
def plot(
    ctx: typer.Context,
    trace: str = typer.Argument(..., help="Trace store (a .zarr directory written by attnscope capture), or its URL "
                                          "(s3://…, file://…; S3 settings from the environment, e.g. AWS_ENDPOINT_URL)."),
    out: str = typer.Option(..., "-o", "--out", help="Figure file to write (.png, .pdf, .svg)."),
    words: str | None = typer.Option(None, help="Comma-separated words or phrases (default: every word of the prompt; "
                                                "grid draws the first, convergence none: its change is of whole maps)."),
    kind: str = typer.Option("heatmaps", help="heatmaps (over the image), grid (step x site, first word), "
                                              "violins (per-token values at --steps), dominance (target shares over "
                                              "steps), convergence (step-to-step change)."),
    sites: list[str] | None = typer.Option(None, help="Glob of site module paths; repeatable (default all)."),
    steps: str | None = typer.Option(None, help="Steps as START:STOP[:STEP] or a comma list (default all; "
                                                "violins: 0, middle, last)."),
    sample: int = typer.Option(0, help="Which generated image of the trace."),
    of: str = typer.Option("auto", help="convergence: of the 'maps', the 'outputs' or 'auto' (outputs when recorded)."),
    tol: float = typer.Option(0.05, help="convergence: tolerance that sets the suggested gate step."),
    dpi: int = typer.Option(150, help="Resolution of raster figures."),
    overwrite: bool = typer.Option(False, help="Replace an existing file at -o."),
) -> None:
    """Draw a figure of a trace: word heat maps, the step x site grid, violins, dominance or convergence lines."""
    import warnings

    import attnscope as ats
    from attnscope.selection import parse_step_text

    try:
        if kind not in _PLOT_KINDS:
            raise ats.AttnscopeError(f"--kind {kind!r}: expected one of {', '.join(_PLOT_KINDS)}")
        if dpi < 1:
            raise ats.AttnscopeError(f"--dpi {dpi}: expected an int >= 1 (dots per inch)")
        targets = _split_words(words, "--words")
        if kind != "convergence":
            _refuse_unused(ctx, ("tol", "of"), "it applies with --kind convergence only")
        elif _given(ctx, "words"):  # one --words for every --kind of a script: told, not refused
            typer.echo(f"warning: --words {words!r} left out: --kind convergence draws the step-to-step change of the "
                       f"whole maps, of no word", err=True)
        out = _output_file(out, "-o", _figure_formats(), overwrite)
        tr = _open_trace(trace)
        chosen = parse_step_text(steps, "--steps")
        if chosen is not None and kind != "convergence":
            from attnscope.selection import select_steps

            note, every = _gated_note(tr, list(select_steps(chosen, tr.num_steps)))
            if every:
                raise ats.AttnscopeError(note)
            if note:
                typer.echo(f"warning: {note}", err=True)
        with warnings.catch_warnings():  # an emoji of the prompt: a box in the figure, not a warning per text
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
            if kind == "heatmaps":
                fig = ats.plot.heatmaps(tr, targets or _prompt_words(tr), sites=sites or None, steps=chosen, sample=sample)
            elif kind == "grid":
                fig = ats.plot.site_step_grid(tr, (targets or _prompt_words(tr))[0], sites=sites or None, steps=chosen,
                                              sample=sample)
            elif kind == "violins":
                captured = [int(s) for s in tr.attention(tr.sites[0])["step"].values]
                computed = [s for s in captured if s not in set(tr.gated_steps)] or captured  # not gated, if any
                default = sorted({computed[0], computed[len(computed) // 2], computed[-1]})
                fig = ats.plot.violins(tr, chosen if chosen is not None else default, sites=sites or None, sample=sample,
                                       words=targets)
            elif kind == "dominance":
                ds = ats.stats.dominance(tr, targets=targets, sites=sites or None, steps=chosen)
                fig = ats.plot.dominance_lines(ds, sample=sample)
            else:
                conv = ats.stats.convergence(tr, sites=sites or None, steps=chosen, tol=tol, of=of)
                fig = ats.plot.convergence(conv, sample=sample)
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=dpi, bbox_inches="tight")
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None
    typer.echo(f"figure: {out}")


@app.command(epilog="Example: attnscope report runs/demo.zarr --compare runs/demo-reg.zarr "
                    "--words 'red circle,blue square' -o runs/demo-report.html")
def report(
    trace: str = typer.Argument(..., help="Trace store (a .zarr directory written by attnscope capture), or its URL "
                                          "(s3://…, file://…; S3 settings from the environment, e.g. AWS_ENDPOINT_URL)."),
    out: str = typer.Option(..., "-o", "--out", help="HTML file to write: one self-contained file, every image "
                                                      "inline, nothing loaded from the network."),
    compare: str | None = typer.Option(None, help="Another run of the same generation (e.g. from attnscope rerun): "
                                                  "adds a before/after section."),
    words: str | None = typer.Option(None, help="Comma-separated words or phrases (default: the prompt's phrases "
                                                "between stop-words, e.g. 'red circle,blue square')."),
    sites: list[str] | None = typer.Option(None, help="Glob of site module paths; repeatable (default all)."),
    sample: int = typer.Option(0, help="Which generated image of the trace."),
    tol: float = typer.Option(0.05, help="Tolerance of the convergence's suggested gate step."),
    overwrite: bool = typer.Option(False, help="Replace an existing file at -o."),
) -> None:
    """Write a self-contained HTML report of a trace: run, image, heat maps with a step slider, the step x site
    grid, dominance, convergence, and a before/after section with --compare."""
    import attnscope as ats

    try:
        path = ats.report(trace, _local_file(out, "-o"), compare=compare, words=_split_words(words, "--words"), sites=sites or None, sample=sample,
                          tol=tol, overwrite=overwrite)
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None
    typer.echo(f"report: {path}  ({path.stat().st_size / 1e3:.0f} kB)")


def _prompt_words(tr) -> list[str]:
    """Every word of the trace's prompt (the default targets); a prompt without words is an error."""
    import attnscope as ats
    from attnscope.tokens import token_words

    words = list(dict.fromkeys(w for w in token_words(tr.tokens, tr.token_roles) if w))
    if not words:
        raise ats.AttnscopeError(f"trace {str(tr.path)!r}: its prompt has no words (an empty prompt, or one given as "
                                 f"embeddings), so there is no word to measure or draw")
    return words


def _open_trace(trace: str):
    """``ats.open_trace(trace)``, refusing a trace with no step written: there are no maps to read."""
    import attnscope as ats

    tr = ats.open_trace(trace)
    if not tr.complete and tr.steps_written == 0:
        raise ats.AttnscopeError(f"trace {trace!r} has no step written (incomplete: its capture stopped before its "
                                 f"first step was stored), so there are no maps to read; capture it again")
    return tr


def _figure_formats() -> tuple[str, ...]:
    """The file suffixes matplotlib writes figures as (``.png``, ``.pdf``, ``.svg``, …)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted("." + f for f in FigureCanvasBase.get_supported_filetypes()))


def _local_file(path: str | Path, flag: str) -> Path:
    """An output file's path as given on the command line: a local path (a URL is refused, not written as a local
    folder named ``s3:``).

    >>> _local_file("s3://bucket/f.png", "-o")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: -o 's3://bucket/f.png': expected a local file path; write it here, then copy it
    """
    import attnscope as ats

    if "://" in str(path):
        raise ats.AttnscopeError(f"{flag} {str(path)!r}: expected a local file path; write it here, then copy it")
    return Path(path)


def _output_file(path: str | Path, flag: str, suffixes: tuple[str, ...] | None = None,
                 overwrite: bool = False) -> Path:
    """Check an output file's path before any work: not a directory, with one of ``suffixes`` when given, and
    not an existing file unless ``overwrite`` (the command's ``--overwrite``).

    >>> _output_file(Path("runs/table.zarr"), "-o", (".parquet", ".csv"))
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: -o 'runs/table.zarr': expected a file name ending in .parquet or .csv
    >>> _output_file(Path(__file__), "--json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: --json '.../cli.py' exists; pass --overwrite to replace it
    """
    import attnscope as ats

    path = _local_file(path, flag)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ats.AttnscopeError(f"{flag} {str(path)!r}: expected a file name ending in "
                                 f"{', '.join(suffixes[:-1])} or {suffixes[-1]}")
    if path.is_dir():
        raise ats.AttnscopeError(f"{flag} {str(path)!r} is a directory; expected the path of a file to write")
    if path.exists() and not overwrite:
        raise ats.AttnscopeError(f"{flag} {str(path)!r} exists; pass --overwrite to replace it")
    above = next(p for p in path.absolute().parents if p.exists())  # the folder it goes in, or the first that exists
    if not above.is_dir():
        raise ats.AttnscopeError(f"{flag} {str(path)!r}: {str(above)!r} is a file, not a directory to write into")
    return path



def _storage_options(items: list[str]) -> dict | None:
    """``--storage-option NAME=VALUE`` items as fsspec options (``endpoint_url`` goes into ``client_kwargs``)."""
    if not items:
        return None
    options = _pipeline_args(items, option="--storage-option")
    endpoint = options.pop("endpoint_url", None)
    if endpoint is not None:
        options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    return options


_STORAGE_HELP = ("fsspec option for a URL as NAME=VALUE (key, secret, endpoint_url, anon…); repeatable. Without it "
                 "the backend's environment applies (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …).")


@app.command("sweep", epilog="Example: attnscope sweep prompts.txt --seeds 0-99 --out runs/sweep1 --workers 2 --steps 20\n\n"
                             "Rerun the same command to resume: complete runs are skipped, the others redone.")
def sweep_(
    prompts: Path = typer.Argument(..., help="Text file with one prompt per line ('#' lines and blank lines skipped)."),
    seeds: str = typer.Option(..., help="Seeds as '0-99', '0,3,7' or '0-9,20-24': every prompt runs with every seed."),
    out: str = typer.Option(..., help="The sweep's folder: a directory or a URL (s3://bucket/runs/s1, file://…)."),
    model: str = typer.Option("shapes", help=_MODEL_HELP),
    workers: int = typer.Option(1, help="Worker processes on the CPU, each loading the model once (1: this process)."),
    devices: str | None = typer.Option(None, help="One worker process per device, comma-separated: cuda:0,cuda:1."),
    threads: int | None = typer.Option(None, help="Torch threads per worker (default: the cores divided among workers)."),
    steps: int = typer.Option(20, help="Number of inference steps."),
    guidance: float | None = typer.Option(None, help="Guidance scale (default: the pipeline's)."),
    height: int | None = typer.Option(None, help="Image height in pixels."),
    width: int | None = typer.Option(None, help="Image width in pixels."),
    sites: list[str] | None = typer.Option(None, help="Glob of site module paths to record; repeatable (default all)."),
    capture_steps: str | None = typer.Option(None, help="Steps to record as START:STOP[:STEP] or a comma list (default all)."),
    heads: str = typer.Option("mean", help="'mean' (average heads on the device) or 'all'."),
    tokens: str = typer.Option("auto", help="'all' text positions, 'prompt' or 'auto'."),
    branch: str = typer.Option("cond", help="'cond', 'uncond' or 'both' classifier-free-guidance halves."),
    keep_bits: int | None = typer.Option(None, "--keep-bits", help=_KEEP_BITS_HELP),
    dtype: str | None = typer.Option(None, help="float32, float16 or bfloat16."),
    pipeline_arg: list[str] | None = typer.Option(None, "--set", help="Another pipeline argument as NAME=VALUE "
                                                                       "(VALUE in JSON or a bare string); repeatable."),
    storage_option: list[str] | None = typer.Option(None, help=_STORAGE_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with the ETA."),
) -> None:
    """Capture one trace per prompt × seed into a folder with a Parquet catalog; resumable, on several workers."""
    import attnscope as ats
    from attnscope.selection import parse_step_text
    from attnscope.sweep import read_prompts

    try:
        _check_sizes(height, width)
        prompt_list = read_prompts(prompts)
        kwargs = {k: v for k, v in dict(guidance_scale=guidance, height=height, width=width).items() if v is not None}
        kwargs.update(_pipeline_args(pipeline_arg or [], _CLI_FLAGS["sweep_"]))
        device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices is not None else None
        if device_list == []:
            raise ats.AttnscopeError(f"--devices {devices!r}: expected device names separated by commas, e.g. "
                                     f"cuda:0,cuda:1")
        cat = ats.sweep(model, prompt_list, seeds, out, workers=workers, threads=threads, dtype=dtype,
                        devices=device_list,
                        progress=progress, storage_options=_storage_options(storage_option or []),
                        num_inference_steps=steps, sites=sites or None,
                        steps=parse_step_text(capture_steps, "--capture-steps"), heads=heads, tokens=tokens, branch=branch,
                        keep_bits=keep_bits, **kwargs)
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None
    typer.echo(_catalog_summary(cat))


def _catalog_summary(cat) -> str:
    df = cat.df
    counts = df["status"].value_counts()
    lines = [f"sweep {cat.location}: {len(df)} runs, {int(counts.get('complete', 0))} complete, "
             f"{int(counts.get('failed', 0))} failed; catalog: {cat.file}"]
    for row in df[df["status"] != "complete"].head(5).itertuples():
        lines.append(f"  failed {row.run}: {row.error}")
    if "all_present" in df:
        done = df[df["status"] == "complete"]
        lines.append(f"shapes detector: all objects present {100 * done['all_present'].astype(float).mean():.1f} %, "
                     f"exactly the objects asked {100 * done['exact'].astype(float).mean():.1f} % of {len(done)} images")
    return "\n".join(lines)


@app.command("sweep-stats", epilog="Example: attnscope sweep-stats runs/sweep1 --targets objects --steps 0:5 "
                                   "-o runs/sweep1-dominance.parquet")
def sweep_stats(
    sweep: str = typer.Argument(..., help="A sweep's folder (or its catalog.parquet), local or a URL."),
    targets: str = typer.Option("objects", help="Comma-separated words or phrases for every trace, or 'objects' "
                                                "(each shapes prompt's own object phrases)."),
    steps: str | None = typer.Option(None, help="Steps as START:STOP[:STEP] or a comma list (default all)."),
    sites: list[str] | None = typer.Option(None, help="Glob of site module paths; repeatable (default all)."),
    scheduler: str | None = typer.Option(None, help="Address of a running dask scheduler, tcp://host:8786 "
                                                    "(default: a LocalCluster on this machine)."),
    output: str | None = typer.Option(None, "-o", "--output", help="Write the table here (.parquet or .csv)."),
    storage_option: list[str] | None = typer.Option(None, help=_STORAGE_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing file at -o."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over the runs."),
) -> None:
    """Dominance statistics of every trace of a sweep, one row per run, computed on dask.distributed."""
    import warnings

    import attnscope as ats
    from attnscope.selection import parse_step_text
    from attnscope.sweep import DominanceRow

    try:
        if output is not None:
            output = _output_file(output, "-o", (".parquet", ".csv"), overwrite)
        cat = ats.open_catalog(sweep, storage_options=_storage_options(storage_option or []))
        spec = targets if targets == "objects" else tuple(_split_words(targets, "--targets"))
        fn = DominanceRow(spec, steps=parse_step_text(steps, "--steps"), sites=tuple(sites) if sites else None)
        _check_sweep_selection(cat, fn.sites, fn.steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", ResourceWarning)  # dask's sockets closed by the GC: not the user's concern
            table = cat.map_stats(fn, client=scheduler, progress=progress)
    except ats.AttnscopeError as exc:
        raise _fail(exc) from None
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    table = cat.df.set_index("run")[["prompt", "seed"]].join(table, how="inner")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(output) if output.suffix.lower() == ".csv" else table.to_parquet(output)
        typer.echo(f"table: {output} ({len(table)} runs)")
    else:
        typer.echo(table.to_string(max_rows=20))


def _check_sweep_selection(cat: object, sites: object, steps: object) -> None:
    """``--sites`` and ``--steps`` checked once on the sweep's first complete trace (a sweep has one capture setting):
    one error before the map starts, not the same error from every run."""
    import attnscope as ats
    from attnscope.selection import select_site_names, select_steps

    done = cat.df.run[cat.df.status == "complete"]
    if (sites is None and steps is None) or done.empty:
        return
    try:
        tr = cat.trace(done.iloc[0])
    except ats.AttnscopeError:
        return  # a trace that cannot be read: the map skips it and says why
    if sites is not None:
        select_site_names(list(sites), tr.sites)
    if steps is not None:
        select_steps(steps, int(tr.manifest["run"]["num_steps"]))


if __name__ == "__main__":
    app()
