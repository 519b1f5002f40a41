"""Hook specifications: the whole extension surface of kdtoolkit.

Every extension kind has one hook, ``register_<kind>s(register)``. A plugin implements the hook and
calls ``register`` once per component::

    register(name, factory, *, options=None, description="", inputs=None, needs_labels=False, requires=None)

The host records which plugin registered which name, rejects duplicates (naming both plugins) and
checks the contract of each kind at registration (``kdtoolkit.registration``): a ``PluginError``
naming the plugin, never a late traceback. ``options`` is an ``attrs`` class (``None`` for a
component without options): the pipeline's table is structured into it and validated.
``requires={"fusion": ["importance"]}`` names other components this one needs; ``validate`` fails
when they are missing (a blocked plugin), naming both.

The hooks are listed in the order a pipeline uses them. Each docstring says what ``factory`` is
called with (``Factory:``) and what it must return (``Returns:``); ``tests/test_hookspecs.py``
checks them against the engine.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kdtoolkit")


@hookspec
def register_datasets(register):
    """Register datasets.

    :param register: ``register(name, factory, *, options=None, description="")``.

    Factory: ``factory(options, *, root, download)``, with ``root: pathlib.Path`` (the data root,
    resolved by the core) and ``download: bool``.

    Returns: ``kdtoolkit.data.DatasetSplits``: in-memory uint8 tensors (``TensorSplit``) for data
    that fits in memory, or a ``torch.utils.data.Dataset`` per split for data that does not.
    """


@hookspec
def register_models(register):
    """Register model architectures.

    :param register: ``register(name, factory, *, options=None, description="")``.

    Factory: ``factory(options, *, num_classes)``, with ``num_classes: int`` from the dataset.

    Returns: a float ``torch.nn.Module`` mapping images to logits. A model that can run stage by
    stage (CMT-KD; the default layers of attention losses, ``"<model>:stages"``) defines
    ``stage_paths`` and ``forward_stage(k, x)``: see ``kdtoolkit.models.StagedModel``.
    """


@hookspec
def register_quantizers(register):
    """Register quantizers for quantization-aware training.

    :param register: ``register(name, factory, *, options=..., description="")``; the options
        class must have ``weight_bits`` and ``act_bits`` fields.

    Factory: ``factory(options)``.

    Returns: a ``kdtoolkit.quant.Quantizer``: ``weight_quantizer(bits, module)`` and
    ``act_quantizer(bits, module)`` return ``nn.Module`` fake-quantizers (see ``kdtoolkit.quant.base``
    for what export and warm start need of them).
    """


@hookspec
def register_losses(register):
    """Register loss functions (classification and distillation).

    :param register: ``register(name, factory, *, options=None, description="", inputs=(...))``.
        ``inputs`` names the loss's keyword arguments (``("student", "teacher")``); without it the
        factory's ``inputs`` attribute is read; neither is a registration error. ``student``,
        ``logits`` and ``teacher`` default to the pipeline's roles; ``labels`` is filled from the
        batch; a term's ``fusion`` combines a list given as ``teacher``.

    Factory: ``factory(options)``: a class or a plain function.

    Returns: a callable ``loss(**inputs) -> scalar Tensor``, unweighted (``kdtoolkit.losses.Loss``).
    Optional: ``detach`` (input names the core detaches before the call: fixed targets) and
    ``setup(shapes)`` (each input's shape, a list for list inputs, once before training: e.g. to
    build a FitNet regressor), ``param_groups()`` (default parameter groups of its parameters).
    """


@hookspec
def register_fusions(register):
    """Register teacher-fusion strategies (how several teachers' outputs become one target).

    :param register: ``register(name, factory, *, options=None, description="", needs_labels=False)``.
        ``needs_labels=True``: the fusion is called with ``labels=`` (its ``forward`` must take them).

    Factory: ``factory(options, *, num_inputs)``, with ``num_inputs: int`` (the number of tensors).

    Returns: an ``nn.Module`` whose ``forward(tensors, temperature=None)`` (plus ``labels=`` when
    registered with ``needs_labels``) fuses a list of tensors into one. Learnable fusions hold their
    parameters as the module's own; optional ``param_groups()`` gives their default groups.
    """


@hookspec
def register_schedules(register):
    """Register schedules: multipliers of a learning rate or a loss weight over training.

    :param register: ``register(name, factory, *, options=None, description="")``.

    Factory: ``factory(options)``.

    Returns: a callable ``schedule(epoch, total_epochs) -> float`` (``epoch`` is fractional inside
    an epoch). It must be a pure function of its arguments so that resumed runs are exact.
    """


@hookspec
def register_methods(register):
    """Register training methods: what one training step computes.

    :param register: ``register(name, factory, *, options=None, description="", requires=None)``.
        The factory must be a subclass of ``kdtoolkit.methods.Method`` (usually of
        ``LossTermsMethod``); a public member named like a near miss of a ``Method`` member is a
        registration error.

    Factory: ``factory(options, context)``, with ``context: kdtoolkit.methods.MethodContext``.

    Returns: the method, an ``nn.Module``. The engine calls these ``Method`` members (each has a
    default on the base class), in this order:

    - ``check(options, config)``: class method; problems as ``(key_path, message)``.
    - ``outputs(options, config)``: class method; named tensors it publishes, ``name -> kind``.
    - ``extra_models(options, config)``: class method; networks it adds, ``name -> ModelConfig``.
    - ``default_losses(options, config)``: class method; ``LossConfig`` terms without ``[[losses]]``.
    - ``check_models(options, config, models)``: class method, pure; problems with the built models.
    - ``prepare_models(options, config, models)``: class method; the one step that changes them.
    - ``param_groups()``: default ``(patterns, lr_scale[, weight_decay])`` groups.
    - ``training_step(images, labels, progress)``: the named, weighted loss terms of one batch.
    - ``forward_outputs(images)``: model logits and published outputs, by reference text.
    - ``epoch_metrics()``: extra values for the epoch's metrics row.
    - ``evaluate_logits(images)``: logits of each evaluated model.
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
