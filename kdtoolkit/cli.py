"""``kdtoolkit`` command line: run, validate, plugins, describe, eval, status, export, plot, and the
commands plugins add through the ``register_commands`` hook (e.g. the ``cmtkd`` plugin's ``plot-fusion``).

Input and config errors print one line each (``path: message``) and exit with code 2; no traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path

import click

from kdtoolkit.commands import PluginCommandGroup
from kdtoolkit.engine.memory import reuse_freed_memory
from kdtoolkit.errors import KDToolkitError


def user_errors(fn):
    """The CLI's error boundary: anticipated failures (``KDToolkitError``, file system, plugin hooks,
    out of memory, undecodable or too deeply nested input) print one line each and exit 2; anything
    else is a bug: one line saying so (exit 1), the traceback only with ``kdtoolkit --debug``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KDToolkitError as exc:
            problems = getattr(exc, "problems", None)
            lines = [f"{p}: {m}" if p else m for p, m in problems] if problems else str(exc).splitlines()
            for line in lines or [type(exc).__name__]:
                click.echo(f"error: {_escape_newlines(line)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; the last epoch's checkpoint is kept: continue with --resume", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: classify, never a bare traceback
            from kdtoolkit.boundary import describe

            line = describe(exc)
            if line is not None:
                click.echo(f"error: {line}", err=True)
                if _debug():
                    traceback.print_exc()
                sys.exit(2)
            click.echo(f"error: internal error (a bug in kdtoolkit or a plugin): {type(exc).__name__}: {_one_line(exc)}", err=True)
            if _debug():
                traceback.print_exc()
            else:
                click.echo("error: run `kdtoolkit --debug ...` for the traceback, and report it", err=True)
            sys.exit(1)

    return wrapper


def _escape_newlines(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and (root.obj or {}).get("debug")) or os.environ.get("KDTOOLKIT_DEBUG") == "1"


@click.group(cls=PluginCommandGroup, error_boundary=user_errors)
@click.version_option(package_name="kdtoolkit")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")
@click.pass_context
def main(ctx, debug):
    """Knowledge distillation and quantization-aware training from pipeline files."""
    ctx.obj = {"debug": debug}


def _load(path, overrides, device=None):
    from kdtoolkit.pipeline import Pipeline

    overrides = list(overrides)
    if device:
        overrides.append(f"run.device={json.dumps(device)}")
    return Pipeline.from_toml(path, overrides=overrides)


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a config value (TOML syntax), e.g. --set run.epochs=5.")
@click.option("--resume", is_flag=True, help="Continue the run from its last checkpoint.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Override run.device.")
@user_errors
def run(pipeline, overrides, resume, device):
    """Train and evaluate the pipeline in PIPELINE (a TOML file).

    Under torchrun (several processes or machines) each process runs this command; see the README,
    "Several GPUs and machines"."""
    import time

    from kdtoolkit.engine.distributed import OtherRankFailed, on_main, process_group, resume_after_restart
    from kdtoolkit.pipeline import check_run_dir

    pipe = _load(pipeline, overrides, device)
    if pipe.config.run.host_memory == "reuse":
        reuse_freed_memory()  # process-wide, once: no page faults for each step's tensors
    start = time.perf_counter()
    with process_group(pipe.config.run.device) as info:
        try:
            resume = resume_after_restart(resume, pipe.run_dir / "checkpoints" / "last.safetensors")
            on_main(lambda: check_run_dir(pipe.run_dir, resume=resume))  # before anything is built or written
            pipe.validate(full=True)  # everything fit() needs, built once and reused by fit()
            result = pipe.fit(resume=resume)
        except OtherRankFailed:
            sys.exit(2)  # rank 0 prints the error
    if not info.is_main:
        return
    best = result["best"]
    click.echo(f"run directory: {result['run_dir']}")
    if best:
        click.echo(f"best {best['metric']} = {best['value']:.2f} (epoch {best['epoch']})")
    _print_summary(result["run_dir"], time.perf_counter() - start)


def _print_summary(run_dir, wall_seconds):
    import os

    from kdtoolkit.curves import read_metrics
    from kdtoolkit.summary import run_summary

    if os.environ.get("RANK", "0") == "0":  # one table per run, from the first process
        click.echo(run_summary(run_dir, read_metrics(run_dir), wall_seconds=wall_seconds))


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
@click.option("--full", is_flag=True, help="Also read the data and the referenced checkpoints and build everything training needs (what `run` checks).")
@user_errors
def validate(pipeline, overrides, full):
    """Check PIPELINE without training: every problem, with its key path."""
    pipe = _load(pipeline, overrides)
    pipe.validate(full=full)
    n = len(pipe.config.models)
    click.echo(f"{pipeline}: ok ({n} model{'s' if n != 1 else ''}, method {pipe.config.method.name!r})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list: name, version, distribution, status, error, provides, components.")
@user_errors
def plugins(as_json):
    """List installed plugins (loaded, blocked or broken) and the components each provides."""
    from kdtoolkit.listing import format_rows, plugin_rows

    rows = plugin_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for line in format_rows(rows):
        click.echo(line)
    from kdtoolkit.quant import native

    kernels = native.status()
    click.echo(f"native quantizer kernels: {'available' if kernels['available'] else 'unavailable'} ({kernels['reason']})")


@main.command()
@click.argument("kind")
@click.argument("name")
@user_errors
def describe(kind, name):
    """Show the options of component NAME of KIND (dataset, model, quantizer, loss, fusion, schedule, method)."""
    from kdtoolkit.listing import describe as describe_component
    from kdtoolkit.plugins import collect, get_plugin_manager

    registry = collect(get_plugin_manager(on_error="record"), broken={})
    for line in describe_component(registry, kind, name):
        click.echo(line)


@main.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@user_errors
def eval_(run_dir, checkpoint, as_json):
    """Evaluate the checkpoint of RUN_DIR on the test split."""
    from kdtoolkit.errors import CheckpointError
    from kdtoolkit.pipeline import Pipeline

    path = Path(run_dir) / "checkpoints" / f"{checkpoint}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    from kdtoolkit.engine.distributed import process_group

    pipe = Pipeline.from_run_dir(run_dir)
    with process_group(pipe.config.run.device) as info:  # under torchrun: each process a shard
        metrics = pipe.evaluate(path)
    if not info.is_main:
        return
    if as_json:
        click.echo(json.dumps(metrics))
        return
    for key, value in metrics.items():
        click.echo(f"{key} = {value:.4f}" if key.endswith("/loss") else f"{key} = {value:.2f}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="The file to write (.safetensors or .onnx).")
@click.option("--format", "fmt", type=click.Choice(["packed", "onnx"]), default="packed", show_default=True,
              help="packed: kdtoolkit's low-bit safetensors; onnx: an ONNX model for onnxruntime (needs .[onnx]).")
@click.option("--model", "model_name", default=None, help="Model of the run to export (default: its student).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@user_errors
def export(run_dir, out, fmt, model_name, checkpoint):
    """Write the model of RUN_DIR as packed integer codes (safetensors) or as ONNX."""
    from kdtoolkit.export import export_run

    sizes = export_run(run_dir, out, model_name=model_name, checkpoint=checkpoint, format=fmt)
    mib = 1024 * 1024
    click.echo(f"wrote {out}: {sizes['file'] / mib:.3f} MiB (float32 model: {sizes['float32_model'] / mib:.3f} MiB, "
               f"{sizes['float32_model'] / sizes['file']:.1f}x smaller)")
    if fmt == "packed":
        click.echo(f"quantized layers: {sizes['quantized_weights'] / mib:.3f} MiB packed vs "
                   f"{sizes['quantized_weights_float32'] / mib:.3f} MiB as float32 ({sizes['quantized_ratio']:.3f})")
    elif sizes.get("float32_weight_bytes"):
        click.echo(f"quantized layers: {sizes['quantized_weight_bytes'] / mib:.3f} MiB as low-bit integers vs "
                   f"{sizes['float32_weight_bytes'] / mib:.3f} MiB as float32")


@main.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Image to write (.png, .pdf or .svg).")
@user_errors
def plot(run_dirs, out):
    """Loss, accuracy and learning-rate curves of one or several runs, side by side (needs .[plot])."""
    from kdtoolkit.curves import plot_runs

    click.echo(f"wrote {plot_runs(list(run_dirs), out)}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@user_errors
def status(run_dir, as_json):
    """Where the run in RUN_DIR stands: running or not, epochs done, best and last metrics."""
    from kdtoolkit.status import format_status, run_status

    info = run_status(run_dir)
    click.echo(json.dumps(info) if as_json else "\n".join(format_status(info)))


if __name__ == "__main__":  # pragma: no cover
    main()
