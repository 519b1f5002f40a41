"""Meta-tests: the hook docstrings are the contract, so they must say what the engine really does.

Every hook is documented in sections (``:param register:``, ``Factory:``, ``Returns:``) with the
factory's real call signature, and every ``Method`` member the engine calls is on the base class and
named in ``register_methods``'s docstring with its real signature. The engine's source is scanned so
that a new call site (or a new keyword passed to a factory) without documentation fails here.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from kdtoolkit import hookspecs
from kdtoolkit.methods import LossTermsMethod, Method
from kdtoolkit.plugins import HOOKS, KINDS
from kdtoolkit.registration import METHOD_MEMBERS

CORE = Path(__file__).resolve().parents[1] / "kdtoolkit"
ENGINE_SOURCES = [CORE / "pipeline.py", *sorted((CORE / "engine").glob("*.py"))]

FACTORY = {
    "dataset": "factory(options, *, root, download)",
    "model": "factory(options, *, num_classes)",
    "quantizer": "factory(options)",
    "loss": "factory(options)",
    "fusion": "factory(options, *, num_inputs)",
    "schedule": "factory(options)",
    "method": "factory(options, context)",
}


def doc(kind: str) -> str:
    return inspect.getdoc(getattr(hookspecs, HOOKS[kind]))


@pytest.mark.parametrize("kind", KINDS)
def test_hook_is_documented_in_sections_with_the_factory_signature(kind):
    text = doc(kind)
    assert text.count(":param register: ``register(name, factory, *, ") == 1, kind
    assert f"Factory: ``{FACTORY[kind]}``" in text, kind
    assert "\nReturns: " in text, kind


def test_factory_keywords_the_engine_passes_are_documented():
    passed = set()
    for path in ENGINE_SOURCES + [CORE / "export.py"]:
        for call in re.findall(r"\.factory\(([^()]*(?:\([^()]*\)[^()]*)*)\)", path.read_text()):
            passed |= set(re.findall(r"(\w+)=", call))
    documented = set()
    for signature in FACTORY.values():
        documented |= set(re.findall(r"\*, (.*)\)", signature)[0].split(", ")) if "*" in signature else set()
    assert passed == documented


def method_signature(name: str) -> str:
    params = [p for p in inspect.signature(getattr(Method, name)).parameters if p not in ("self", "cls")]
    return f"``{name}({', '.join(params)})``"


def engine_method_calls() -> set[str]:
    """Names of the Method members the engine calls (on the method, its class or the factory)."""
    names = set()
    for path in ENGINE_SOURCES:
        text = path.read_text()
        names |= set(re.findall(r"\bmethod\.(\w+)\(", text))
        names |= set(re.findall(r"\bmethod\.factory\.(\w+)\(", text))
        names |= set(re.findall(r"method_component\([^()]*\)\.factory\.(\w+)\(", text))
    return names - {"to", "train", "eval"}


def test_every_method_member_the_engine_calls_is_on_the_base_class_and_documented():
    called = engine_method_calls()
    assert {"check", "check_models", "prepare_models", "default_losses", "outputs", "extra_models",
            "param_groups", "epoch_metrics", "training_step", "evaluate_logits", "forward_outputs"} <= called
    text = doc("method")
    for name in called:
        assert name in vars(Method), f"the engine calls {name} but Method does not define it"
        assert method_signature(name) in text, f"{method_signature(name)} is not in register_methods' docstring"
        assert name in METHOD_MEMBERS, name


def test_every_member_registration_knows_is_defined():
    for name in METHOD_MEMBERS:
        assert name in vars(Method) or name in vars(LossTermsMethod), name


def test_the_engine_finds_no_member_by_probing():
    for path in ENGINE_SOURCES:
        text = path.read_text()
        assert not re.search(r"(hasattr|getattr)\([^)]*(method|factory)\b", text), path.name
