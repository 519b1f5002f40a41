"""Loss terms: a loss plugin bound to its inputs, weight, fusion and schedule.

A pipeline's ``[[losses]]`` become ``LossTerm`` modules. Inputs are *references*:

- ``"student"``: the logits of model ``student``;
- ``"student:block2.0.conv1"``: the output of that module of ``student`` (a forward-hook tap);
- ``"student:stages"``: the outputs of all of the model's stages (a list; see ``StagedModel``);
- ``"labels"``: the batch labels;
- a name the method publishes (``Method.outputs``): ``"combined_teacher"``, ``"fused:stages"``;
- a list of references: several tensors; for the ``teacher`` input they are combined by the
  term's ``fusion`` when one is set, otherwise the loss receives the list.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping, Protocol, Sequence, Union

import attrs
import torch
from torch import nn

from kdtoolkit.schedules import Schedule

Value = Union[torch.Tensor, list[torch.Tensor]]

class Loss(Protocol):
    """What a loss plugin's factory returns: a callable (usually an ``nn.Module``) taking its inputs
    as keyword arguments and returning the unweighted scalar loss.

    The inputs it takes are declared at registration (``register(..., inputs=(...))``) or by an
    ``inputs`` attribute of the factory; ``labels`` is filled from the batch. ``detach`` (optional)
    names the inputs it treats as fixed targets: the core detaches them before the call
    (:func:`call_loss`), so the loss itself never calls ``.detach()`` on an input. An optional
    ``setup(shapes)`` receives each input's shape (a list of shapes for list inputs) once before
    training, to create parameters (a FitNet regressor)."""

    detach: ClassVar[tuple[str, ...]]

    def __call__(self, **inputs) -> torch.Tensor: ...


def call_loss(loss: Callable[..., torch.Tensor], **inputs: Value) -> torch.Tensor:
    """``loss(**inputs)`` with the inputs named in ``loss.detach`` detached (lists element-wise):
    how the core calls every loss."""
    for name in getattr(loss, "detach", ()):
        value = inputs.get(name)
        if isinstance(value, torch.Tensor):
            inputs[name] = value.detach()
        elif isinstance(value, (list, tuple)):
            inputs[name] = [v.detach() for v in value]
    return loss(**inputs)


#: the input name that a term's ``fusion`` applies to
FUSED_INPUT = "teacher"

#: kinds of the tensors a method may publish (``Method.outputs``)
OUTPUT_KINDS = ("logits", "features", "stages")
#: the feature path that names all of a model's (or a method output's) stages
STAGES = "stages"


def output_refs(outputs: Mapping[str, str]) -> dict[str, str]:
    """Reference text -> kind of each output a method declares: ``name`` for logits and features,
    ``name:stages`` for stage lists."""
    return {(f"{name}:{STAGES}" if kind == STAGES else name): kind for name, kind in outputs.items()}


@attrs.frozen
class Ref:
    """A parsed input reference: a model's logits (``feature is None``), one of its module outputs,
    or (``model == "labels"``) the labels."""

    model: str
    feature: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Ref":
        model, _, feature = text.partition(":")
        return cls(model.strip(), feature.strip() or None)

    def __str__(self) -> str:
        return self.model if self.feature is None else f"{self.model}:{self.feature}"


def default_inputs(loss_inputs: Sequence[str], students: Sequence[str], teachers: Sequence[str]) -> dict[str, str | list[str]]:
    """Inputs a term gets when the pipeline does not say: logits/student -> the student, teacher ->
    the teacher(s), labels -> the labels."""
    out: dict[str, str | list[str]] = {}
    for name in loss_inputs:
        if name == "labels":
            continue
        if name in ("logits", "student") and len(students) == 1:
            out[name] = students[0]
        elif name == "teacher" and teachers:
            out[name] = teachers[0] if len(teachers) == 1 else list(teachers)
    return out


class LossTerm(nn.Module):
    """One weighted, named loss term. Its submodules (the loss, the fusion) are saved in
    checkpoints and trained with the networks when they have parameters."""

    def __init__(
        self,
        label: str,
        loss: Callable[..., torch.Tensor],
        inputs: Mapping[str, Ref | list[Ref]],
        *,
        weight: float = 1.0,
        fusion: nn.Module | None = None,
        schedule: Schedule | None = None,
        temperature: float | None = None,
        takes_labels: bool = False,
        fusion_needs_labels: bool = False,
    ):
        """``takes_labels``: the loss declares a ``labels`` input; ``fusion_needs_labels``: the
        fusion was registered with ``needs_labels=True`` (it is called with ``labels=``)."""
        super().__init__()
        self.label = label
        self.loss = loss
        self.fusion = fusion
        self.inputs = dict(inputs)
        self.weight = float(weight)
        self.schedule = schedule
        self.temperature = temperature
        self.takes_labels = takes_labels
        self.fusion_needs_labels = fusion_needs_labels

    def current_weight(self, epoch: float, total_epochs: int) -> float:
        if self.schedule is None:
            return self.weight
        return self.weight * float(self.schedule(epoch, total_epochs))

    def forward(self, value: Callable[[Ref], Value], labels: torch.Tensor, epoch: float, total_epochs: int) -> torch.Tensor:
        weight = self.current_weight(epoch, total_epochs)
        if weight == 0.0:  # e.g. a scheduled-off stage: skip the computation entirely
            return torch.zeros((), device=labels.device)
        kwargs = {}
        for name, ref in self.inputs.items():
            if isinstance(ref, list):
                tensors = []
                for r in ref:
                    v = value(r)
                    tensors.extend(v if isinstance(v, list) else [v])
                if self.fusion is not None and name == FUSED_INPUT:
                    extra = {"labels": labels} if self.fusion_needs_labels else {}
                    kwargs[name] = self.fusion(tensors, temperature=self.temperature, **extra)
                else:
                    kwargs[name] = tensors
            else:
                kwargs[name] = value(ref)
        if self.takes_labels:
            kwargs["labels"] = labels
        return weight * call_loss(self.loss, **kwargs)
