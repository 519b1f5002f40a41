"""``kdtoolkit`` command line: run, validate, plugins, eval, export, and the commands plugins add
through the ``register_commands`` hook.

Input and config errors print one line each (``path: message``) and exit with code 2; no traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from kdtoolkit.commands import PluginCommandGroup
from kdtoolkit.engine.memory import reuse_freed_memory
from kdtoolkit.errors import KDToolkitError


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KDToolkitError as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                click.echo(f"error: {line}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; the last epoch's checkpoint is kept: continue with --resume", err=True)
            sys.exit(130)

    return wrapper


@click.group(cls=PluginCommandGroup, error_boundary=user_errors)
@click.version_option(package_name="kdtoolkit")
def main():
    """Knowledge distillation and quantization-aware training from pipeline files."""


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
    """Train and evaluate the pipeline in PIPELINE (a TOML file)."""
    pipe = _load(pipeline, overrides, device)
    if pipe.config.run.host_memory == "reuse":
        reuse_freed_memory()  # process-wide, once: no page faults for each step's tensors
    pipe.validate(full=True)  # everything fit() needs, built once and reused by fit()
    result = pipe.fit(resume=resume)
    best = result["best"]
    click.echo(f"run directory: {result['run_dir']}")
    if best:
        click.echo(f"best {best['metric']} = {best['value']:.2f} (epoch {best['epoch']})")


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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list: name, version, provides.")
@user_errors
def plugins(as_json):
    """List installed plugins and the components each provides."""
    from kdtoolkit.plugins import collect, get_plugin_manager, plugin_versions

    pm = get_plugin_manager()
    registry = collect(pm)
    versions = plugin_versions(pm)
    rows = []
    for name in sorted(versions):
        provides: dict[str, list[str]] = {}
        for comp in registry.components():
            if comp.plugin == name:
                provides.setdefault(comp.kind, []).append(comp.name)
        rows.append({"name": name, "version": versions[name], "provides": {k: sorted(v) for k, v in provides.items()}})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']} {row['version'] or ''}".rstrip())
        for kind, names in row["provides"].items():
            click.echo(f"  {kind}: {', '.join(names)}")
    from kdtoolkit.quant import native

    kernels = native.status()
    click.echo(f"native quantizer kernels: {'available' if kernels['available'] else 'unavailable'} ({kernels['reason']})")


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
    pipe = Pipeline.from_run_dir(run_dir)
    metrics = pipe.evaluate(path)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    for key, value in metrics.items():
        click.echo(f"{key} = {value:.4f}" if key.endswith("/loss") else f"{key} = {value:.2f}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="The .safetensors file to write.")
@click.option("--model", "model_name", default=None, help="Model of the run to export (default: its student).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@user_errors
def export(run_dir, out, model_name, checkpoint):
    """Write the quantized model of RUN_DIR as packed integer codes (safetensors)."""
    from kdtoolkit.export import export_run

    sizes = export_run(run_dir, out, model_name=model_name, checkpoint=checkpoint)
    mib = 1024 * 1024
    click.echo(f"wrote {out}: {sizes['file'] / mib:.3f} MiB (float32 model: {sizes['float32_model'] / mib:.3f} MiB, "
               f"{sizes['float32_model'] / sizes['file']:.1f}x smaller)")
    click.echo(f"quantized layers: {sizes['quantized_weights'] / mib:.3f} MiB packed vs "
               f"{sizes['quantized_weights_float32'] / mib:.3f} MiB as float32 ({sizes['quantized_ratio']:.3f})")


if __name__ == "__main__":  # pragma: no cover
    main()
