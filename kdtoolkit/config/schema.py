"""The pipeline schema (``pipeline.toml``), version 1.

Frozen attrs classes. Tables that name a component (``name = "..."``) keep that plugin's own options
inline next to the generic keys; they are structured into the plugin's options class and stored in
the ``options`` field. See ``kdtoolkit.config.load`` for how a TOML file becomes a ``PipelineConfig``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import attrs

SCHEMA_VERSION = 1


from kdtoolkit.config.validators import non_negative as _non_negative
from kdtoolkit.config.validators import positive as _positive


# --- component tables ---------------------------------------------------------------------------


@attrs.frozen
class ScheduleConfig:
    """A multiplier over training (``[optimizer.schedule]``, ``losses[i].schedule``)."""

    name: str
    options: Any = None


@attrs.frozen
class FusionConfig:
    """How several teacher inputs of a loss term become one (``losses[i].fusion``)."""

    name: str
    options: Any = None


@attrs.frozen
class LayerOverride:
    """Per-layer bit-widths by module-path pattern (fnmatch); 32 means full precision."""

    pattern: str
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None


@attrs.frozen
class QuantizerConfig:
    """``quantizer = { name = "hwgq", weight_bits = 2, act_bits = 2 }`` on a model entry.

    ``weight_bits``/``act_bits`` belong to the plugin's options; ``keep_first_last`` and
    ``overrides`` are handled by the core for every quantizer.
    """

    name: str
    keep_first_last: bool = True
    overrides: list[LayerOverride] = attrs.Factory(list)
    options: Any = None


@attrs.frozen
class DataConfig:
    """``[data]``: the dataset plugin and how batches are made."""

    name: str
    root: Optional[str] = None
    download: bool = False
    batch_size: int = attrs.field(default=128, validator=_positive)
    eval_batch_size: int = attrs.field(default=512, validator=_positive)
    augment: bool = True
    num_workers: int = attrs.field(default=0, validator=_non_negative)
    options: Any = None


@attrs.frozen
class ModelConfig:
    """``[models.<name>]``: one network of the pipeline and its role.

    ``role`` is ``student`` or ``teacher``. A teacher with ``frozen = true`` is pretrained (its
    weights come from ``checkpoint``) and never updated; otherwise it is trained jointly.
    ``checkpoint`` is a run directory (its best checkpoint) or a ``.safetensors`` file;
    ``checkpoint_model`` picks the model inside it (default: that run's student).
    """

    name: str
    role: Literal["student", "teacher"] = "student"
    frozen: bool = False
    checkpoint: Optional[str] = None
    checkpoint_model: Optional[str] = None
    evaluate: bool = True
    quantizer: Optional[QuantizerConfig] = None
    options: Any = None


@attrs.frozen
class MethodConfig:
    """``[method]``: what one training step computes."""

    name: str = "supervised"
    options: Any = None


@attrs.frozen
class LossConfig:
    """``[[losses]]``: one loss term.

    ``inputs`` maps the loss's argument names to references: ``"student"`` (a model's logits),
    ``"student:block1"`` (the output of a module of that model), ``"student:stages"`` (all stage
    outputs), or a list of references (several teachers, fused by ``fusion``; or several layer
    pairs for feature losses). Omitted inputs get defaults from the loss and the roles.
    """

    name: str
    weight: float = 1.0
    label: Optional[str] = None
    inputs: dict[str, Union[str, list[str]]] = attrs.Factory(dict)
    fusion: Optional[FusionConfig] = None
    schedule: Optional[ScheduleConfig] = None
    options: Any = None


# --- plain tables -------------------------------------------------------------------------------


@attrs.frozen
class RunConfig:
    """``[run]``: run-wide settings."""

    name: str = "run"
    seed: int = 0
    epochs: int = attrs.field(default=1, validator=_positive)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    output_dir: str = "runs/{name}"
    eval_every: int = attrs.field(default=1, validator=_positive)
    max_steps_per_epoch: Optional[int] = attrs.field(default=None, validator=_positive)
    progress: Literal["auto", "on", "off"] = "auto"
    metrics_format: Literal["jsonl", "csv"] = "jsonl"
    best_metric: Optional[str] = None  # e.g. "test/student/top1"; default: the student's top-1
    #: "reuse": glibc malloc keeps freed tensor memory (no page faults per step; kdtoolkit.engine.memory)
    host_memory: Literal["reuse", "system"] = "reuse"


@attrs.frozen
class ParamGroupConfig:
    """``[[optimizer.param_groups]]``: parameters matched by fnmatch on their qualified names
    (``models.student.*``, ``method.*``, ``losses.*``) get their own learning-rate scale and
    weight decay. The first matching group wins; unmatched parameters use the optimizer's values."""

    params: list[str]
    lr_scale: float = 1.0
    weight_decay: Optional[float] = None


@attrs.frozen
class OptimizerConfig:
    """``[optimizer]``: one optimizer over every trained parameter, with parameter groups."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = attrs.field(default=0.1, validator=_positive)
    momentum: float = attrs.field(default=0.9, validator=_non_negative)
    nesterov: bool = False
    weight_decay: float = attrs.field(default=5e-4, validator=_non_negative)
    betas: tuple[float, float] = (0.9, 0.999)
    param_groups: list[ParamGroupConfig] = attrs.Factory(list)
    schedule: Optional[ScheduleConfig] = None


@attrs.frozen
class PluginsConfig:
    """``[plugins]``: plugins not to load (by entry-point name)."""

    blocked: list[str] = attrs.Factory(list)


@attrs.frozen
class PipelineConfig:
    """A whole pipeline."""

    data: DataConfig
    models: dict[str, ModelConfig]
    schema_version: int = SCHEMA_VERSION
    run: RunConfig = attrs.Factory(RunConfig)
    method: MethodConfig = attrs.Factory(MethodConfig)
    losses: list[LossConfig] = attrs.Factory(list)
    optimizer: OptimizerConfig = attrs.Factory(OptimizerConfig)
    plugins: PluginsConfig = attrs.Factory(PluginsConfig)

    # role filters, in declaration order
    @property
    def students(self) -> list[str]:
        """Names of the models with ``role = "student"``."""
        return [n for n, s in self.models.items() if s.role == "student"]

    @property
    def teachers(self) -> list[str]:
        """Names of the models with ``role = "teacher"``."""
        return [n for n, s in self.models.items() if s.role == "teacher"]

    @property
    def trained(self) -> list[str]:
        """Names of the models that are not ``frozen``."""
        return [n for n, s in self.models.items() if not s.frozen]

    @property
    def evaluated(self) -> list[str]:
        """Names of the models with ``evaluate = true``."""
        return [n for n, s in self.models.items() if s.evaluate]


#: component table classes -> the registry kind their ``name`` refers to
COMPONENT_KINDS: dict[type, str] = {
    DataConfig: "dataset",
    ModelConfig: "model",
    QuantizerConfig: "quantizer",
    MethodConfig: "method",
    LossConfig: "loss",
    FusionConfig: "fusion",
    ScheduleConfig: "schedule",
}
