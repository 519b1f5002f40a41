"""CMT-KD regression: loss terms and gradients on a fixed batch equal those recorded from the
implementation before CMT-KD moved onto the common loss system (``tests/data/cmtkd_regression.json``).

The JSON was written by running this module as a script (``python tests/test_cmtkd_regression.py``)
at the commit that added it, when CMT-KD still computed its own Eq. 10 with method options α, β, γ.
Every case builds a pipeline through the engine from the same method options, re-initialises every
network, importance factor and FitNet regressor from generators seeded by its name (so the numbers do
not depend on how many random numbers the assembly draws, or in which order), runs one training step
on a fixed batch and back-propagates the total.

What is compared has the same meaning before and after: the cross-entropy of the student and of the
combined teacher, the mutual-learning sum ``β·(KL_S + KL_T)`` (one ``minlogit`` term, or the two
``kl_*`` terms of the old implementation), the feature term, the total, and the gradient norms of every
network, of every stage's importance factors π (the whole vector), of the combined teacher's π and of
the FitNet regressors.
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

RECORD = Path(__file__).resolve().parent / "data" / "cmtkd_regression.json"

CASES: dict[str, dict] = {
    # 3 HWGQ teachers, attention on stages 0 and 2, heads averaged, non-default α/β/γ/T
    "hwgq_attention_mean": dict(
        quantizer="hwgq", teachers=(4, 6, 8),
        method=dict(alpha=0.7, beta=0.3, gamma=50.0, temperature=3.0, feature_stages=[0, 2], combine="mean"),
    ),
    # 2 LSQ teachers, FitNet on every stage, heads combined by learned importance
    "lsq_fitnet_importance": dict(
        quantizer="lsq", teachers=(4, 8),
        method=dict(alpha=0.8, beta=0.6, gamma=2.0, temperature=5.0, feature_loss="fitnet", combine="importance"),
    ),
    # F_k a fixed target of the feature loss; learned head combination
    "hwgq_attention_importance_detached": dict(
        quantizer="hwgq", teachers=(4, 8),
        method=dict(alpha=1.2, beta=0.4, gamma=80.0, combine="importance", detach_fused_target=True),
    ),
    # the paper's defaults except β = 0 ("w/o ML")
    "hwgq_defaults_without_ml": dict(quantizer="hwgq", teachers=(4, 8), method=dict(beta=0.0)),
}


def raw_config(case: dict) -> dict:
    model = {"name": "wrn", "depth": 10, "width": 1}
    q = case["quantizer"]
    models = {"student": dict(model, quantizer={"name": q, "weight_bits": 2, "act_bits": 2})}
    for bits in case["teachers"]:
        models[f"t{bits}"] = dict(model, role="teacher", quantizer={"name": q, "weight_bits": bits, "act_bits": bits})
    return {
        "data": {"name": "cifar10"},
        "models": models,
        "method": {"name": "cmtkd", **case["method"]},
        "run": {"progress": "off", "device": "cpu"},
    }


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


@torch.no_grad()
def _reinit_layers(module: nn.Module, g: torch.Generator) -> None:
    """Conv/Linear weights ~ N(0, 2/fan_in), BN affine near (1, 0), in module order; weight quantizers
    that derive their state from the weight (LSQ's step) re-derive it; activation quantizers keep
    initialising from the first batch."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            quantizer = getattr(m, "weight_quantizer", None)
            if quantizer is not None and hasattr(quantizer, "initialize"):
                quantizer.initialize(m.weight)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def named_parts(module: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """The importance fusions (qualified name -> module) and FitNet losses of a built pipeline."""
    from kdtoolkit_plugins.losses.fitnet import FitNetLoss
    from kdtoolkit_plugins.losses.fusion import ImportanceFusion

    mods = list(module.named_modules())
    return {
        "importance": [(n, m) for n, m in mods if isinstance(m, ImportanceFusion)],
        "fitnet": [(n, m) for n, m in mods if isinstance(m, FitNetLoss)],
    }


def build(raw: dict):
    """The assembled pipeline (models, loss terms, method) for ``raw``, on the CPU."""
    from kdtoolkit import Pipeline
    from kdtoolkit.engine.assemble import build_parts

    pipe = Pipeline.from_dict(raw)
    sample = torch.randn(4, 3, 16, 16, generator=_generator("sample"))
    return build_parts(pipe.config, pipe.registry, num_classes=10, device=torch.device("cpu"), sample=sample)


def importance_key(qualified: str) -> str:
    """``method.fusion.1`` -> ``pi/stage1``; ``method.combine_fusion`` -> ``pi/combine``."""
    tail = qualified.split(".")
    return "pi/combine" if "combine_fusion" in tail else f"pi/stage{tail[-1]}"


def compute(case: dict, raw: dict | None = None) -> dict[str, float | list[float]]:
    from kdtoolkit.methods import Progress

    built = build(raw or raw_config(case))
    for name in sorted(built.models):
        _reinit_layers(built.models[name], _generator(f"model/{name}"))
    parts = named_parts(built.module)
    with torch.no_grad():
        for qualified, fusion in parts["importance"]:
            key = importance_key(qualified)
            fusion.importance.copy_(torch.randn(fusion.importance.shape, generator=_generator(key)))
    for _, loss in parts["fitnet"]:
        _reinit_layers(loss.regressors, _generator("fitnet"))

    g = _generator("batch")
    images = torch.randn(8, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    built.module.train()
    terms = built.method.training_step(images, labels, Progress(0, 0, 1, 1))
    total = sum(terms.values())
    total.backward()

    out: dict[str, float | list[float]] = {f"term/{k}": float(v.detach()) for k, v in sorted(terms.items())}
    out["total"] = float(total.detach())
    for name in sorted(built.models):
        grads = [p.grad.detach().flatten() for p in built.models[name].parameters() if p.grad is not None]
        out[f"grad_norm/{name}"] = float(torch.cat(grads).norm()) if grads else 0.0
    for qualified, fusion in parts["importance"]:
        grad = fusion.importance.grad
        out[f"grad/{importance_key(qualified)}"] = [0.0] * fusion.importance.numel() if grad is None else grad.tolist()
    for _, loss in parts["fitnet"]:
        grads = [p.grad.flatten() for p in loss.regressors.parameters() if p.grad is not None]
        out["grad_norm/fitnet_regressors"] = float(torch.cat(grads).norm())
    return out


#: new term name -> the old terms whose sum it is (identity for the others)
MEANING = {"term/mutual": ("term/kl_student", "term/kl_teacher")}


def comparable(values: dict) -> dict:
    """The recorded values in today's vocabulary: the two ``kl_*`` terms become one mutual-learning sum;
    a term switched off by a zero weight (reported as 0 before, left out now) is dropped."""
    out = {k: v for k, v in values.items() if not (k.startswith("term/") and v == 0.0)}
    for new, old in MEANING.items():
        if any(k in out for k in old):
            out[new] = sum(out.pop(k, 0.0) for k in old)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_cmtkd_losses_and_gradients_equal_the_recorded_implementation(name):
    recorded = comparable(json.loads(RECORD.read_text())[name])
    now = comparable(compute(CASES[name]))
    assert set(now) == set(recorded)
    for key, expected in recorded.items():
        actual = now[key]
        if isinstance(expected, list):
            torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-5, atol=1e-8, msg=key)
        else:
            assert actual == pytest.approx(expected, rel=1e-5, abs=1e-8), key
    assert recorded["total"] > 0


def explicit_losses_raw() -> dict:
    """Case ``hwgq_attention_mean`` written as explicit ``[[losses]]`` instead of α, β, γ, T."""
    case = CASES["hwgq_attention_mean"]
    raw = raw_config(dict(case, method={"feature_stages": [0, 2]}))
    raw["losses"] = [
        {"name": "ce", "label": "ce_student", "weight": 0.7, "inputs": {"logits": "student"}},
        {"name": "ce", "label": "ce_teacher", "weight": 0.7, "inputs": {"logits": "combined_teacher"}},
        {"name": "minlogit", "label": "mutual", "weight": 0.3, "temperature": 3.0,
         "inputs": {"logits": ["combined_teacher", "student"]}},
        {"name": "attention", "label": "feature", "weight": 50.0, "detach_teacher": False,
         "inputs": {"student": "student_features:stages", "teacher": "fused:stages"}},
    ]
    return raw


def test_the_default_terms_written_as_explicit_losses_give_the_recorded_numbers():
    recorded = comparable(json.loads(RECORD.read_text())["hwgq_attention_mean"])
    now = comparable(compute(CASES["hwgq_attention_mean"], explicit_losses_raw()))
    assert set(now) == set(recorded)
    for key, expected in recorded.items():
        torch.testing.assert_close(torch.tensor(now[key]), torch.tensor(expected), rtol=1e-5, atol=1e-8, msg=key)


if __name__ == "__main__":  # writes the record; only ever run against the implementation it records
    record = {name: compute(case) for name, case in sorted(CASES.items())}
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}", file=sys.stderr)
