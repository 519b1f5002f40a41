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
    """What a loss plugin's factory returns (an ``nn.Module``).

    ``inputs`` names its tensor arguments (``labels`` is filled from the batch); ``detach`` names
    the inputs it treats as targets and detaches itself. ``forward(**inputs)`` returns the
    unweighted scalar loss. An optional ``setup(shapes)`` receives each input's shape (a list of
    shapes for list inputs) once before training, to create parameters (a FitNet regressor)."""

    inputs: ClassVar[tuple[str, ...]]
    detach: ClassVar[tuple[str, ...]]

    def __call__(self, **inputs) -> torch.Tensor: ...


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
        loss: nn.Module,
        inputs: Mapping[str, Ref | list[Ref]],
        *,
        weight: float = 1.0,
        fusion: nn.Module | None = None,
        schedule: Schedule | None = None,
        temperature: float | None = None,
    ):
        super().__init__()
        self.label = label
        self.loss = loss
        self.fusion = fusion
        self.inputs = dict(inputs)
        self.weight = float(weight)
        self.schedule = schedule
        self.temperature = temperature

    def refs(self) -> list[Ref]:
        out = []
        for ref in self.inputs.values():
            out.extend(ref if isinstance(ref, list) else [ref])
        return out

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
                    kwargs[name] = self.fusion(tensors, temperature=self.temperature)
                else:
                    kwargs[name] = tensors
            else:
                kwargs[name] = value(ref)
        if "labels" in getattr(self.loss, "inputs", ()):
            kwargs["labels"] = labels
        return weight * self.loss(**kwargs)
