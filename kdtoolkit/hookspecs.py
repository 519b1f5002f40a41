"""Hook specifications: the whole extension surface of kdtoolkit.

Every extension kind has one hook, ``register_<kind>s(register)``. A plugin implements the hook and
calls ``register(name, factory, options=OptionsClass, description="...")`` once per component. The
host records which plugin registered which name, rejects duplicates (naming both plugins), and builds
the configuration converter from the ``options`` classes, so each component brings its own typed,
validated options (an ``attrs`` class; ``None`` for a component without options).

The hooks are listed in the order a pipeline uses them. Each docstring says what ``factory`` is
called with and what it must return.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kdtoolkit")


@hookspec
def register_datasets(register):
    """Register datasets.

    Factory: ``factory(options, *, root: pathlib.Path, download: bool) -> kdtoolkit.data.DatasetSplits``.
    Return in-memory uint8 tensors (``TensorSplit``) for data that fits in memory, or a
    ``torch.utils.data.Dataset`` per split for data that does not (ImageNet must never be loaded).
    """


@hookspec
def register_models(register):
    """Register model architectures.

    Factory: ``factory(options, *, num_classes: int) -> torch.nn.Module`` returning a float model.
    A model that can run stage by stage (needed by CMT-KD, used by attention defaults) defines
    ``stage_paths`` (module paths ending each stage) and ``forward_stage(k, x)``: see
    ``kdtoolkit.models.StagedModel``.
    """


@hookspec
def register_quantizers(register):
    """Register quantizers for quantization-aware training.

    Factory: ``factory(options) -> kdtoolkit.quant.Quantizer``: an object whose
    ``weight_quantizer(bits, module)`` and ``act_quantizer(bits, module)`` return ``nn.Module``
    fake-quantizers. The options class must have ``weight_bits`` and ``act_bits`` fields.
    """


@hookspec
def register_losses(register):
    """Register loss functions (classification and distillation).

    Factory: ``factory(options) -> kdtoolkit.losses.Loss``: an ``nn.Module`` with a class attribute
    ``inputs`` (names of its tensor arguments, e.g. ``("student", "teacher")``) and
    ``forward(**inputs) -> scalar Tensor``. Optional ``setup(shapes)`` receives the shape of each
    input before training (to build e.g. a FitNet regressor).
    """


@hookspec
def register_fusions(register):
    """Register teacher-fusion strategies (how several teachers' outputs become one target).

    Factory: ``factory(options, *, num_inputs: int) -> nn.Module`` whose
    ``forward(tensors: list[Tensor], temperature: float | None = None) -> Tensor`` fuses them.
    Learnable fusions (importance weights) hold their parameters as the module's own.
    """


@hookspec
def register_schedules(register):
    """Register schedules: multipliers of a learning rate or a loss weight over training.

    Factory: ``factory(options) -> kdtoolkit.schedules.Schedule``: a callable
    ``schedule(epoch: float, total_epochs: int) -> float`` (``epoch`` is fractional inside an
    epoch). It must be a pure function of its arguments so that resumed runs are exact.
    """


@hookspec
def register_methods(register):
    """Register training methods: what one training step computes.

    Factory: ``factory(options, context: kdtoolkit.methods.MethodContext) -> kdtoolkit.methods.Method``:
    an ``nn.Module`` whose ``training_step(batch)`` returns the named loss terms (already weighted)
    that the engine sums, and whose ``evaluate_logits(images)`` returns the logits of each model it
    evaluates. Its own parameters (e.g. fusion weights) are saved in checkpoints.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``kdtoolkit`` command line (the shape of simonw/llm's hook).

    :param cli: a ``click.Group`` that belongs to this plugin alone; add commands to it with
        ``@cli.command()``, ``@cli.group()`` or ``cli.add_command(command)``.

    Each command becomes ``kdtoolkit NAME``, listed by ``kdtoolkit --help`` beside the built-in ones.
    The hook is called the first time the command line needs a command it does not have itself, so
    a plugin's commands cost nothing to the built-in ones. A command named like a built-in command
    or like another plugin's command is an error naming both. The commands run inside the CLI's
    error boundary: raise ``kdtoolkit.errors`` types (``KDToolkitError`` and its subclasses) for bad
    input, and the user gets one ``error:`` line and exit code 2.

    Example::

        @kdtoolkit.hookimpl
        def register_commands(cli):
            @cli.command()
            @click.argument("run_dir")
            def summary(run_dir):  # `kdtoolkit summary RUN_DIR`
                click.echo(...)
    """
