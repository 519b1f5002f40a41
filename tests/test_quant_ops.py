"""The quantizer ops as torch sees them: registered custom ops (kdtoolkit::lsq_forward, lsq_backward,
hwgq_forward) that pass torch.library.opcheck, show in the profiler, trace under torch.compile without
a graph break and pass torch.export, on a W2A2 WRN-16-1 built the way a pipeline builds it."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from kdtoolkit.quant import native, ops, quantize_model
from kdtoolkit_plugins.models.wrn import WideResNet
from kdtoolkit_plugins.quantizers.hwgq import HWGQActQuantizer, HWGQQuantizer
from kdtoolkit_plugins.quantizers.lsq import LSQActQuantizer, LSQQuantizer

QUANTIZERS = {"lsq": LSQQuantizer, "hwgq": HWGQQuantizer}


def w2a2_wrn16_1(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = WideResNet(16, 1, num_classes=10)
    quantize_model(model, QUANTIZERS[name](), weight_bits=2, act_bits=2)
    model(torch.randn(2, 3, 32, 32))  # LSQ's first-batch initialisation
    return model


@pytest.mark.parametrize("implementation", ["native", "aten"])
def test_ops_pass_opcheck(implementation):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch checks them."""
    context = native.disabled() if implementation == "aten" else contextlib.nullcontext()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    step = torch.tensor(0.3, requires_grad=True)
    with context:
        torch.library.opcheck(ops.lsq_forward, (x, step, 0, 3, 0.1))
        torch.library.opcheck(ops.lsq_forward, (x, torch.full((2,), 0.3, requires_grad=True), 2, 1, 0.1))
        torch.library.opcheck(ops.lsq_backward, (torch.randn(2, 3, 4, 4), x.detach(), step.detach(), 0, 3, 0.1))
        torch.library.opcheck(ops.hwgq_forward, (x, 0.5388, 1, 3, True))


def test_ops_show_in_the_profiler():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        (LSQActQuantizer(2)(x).sum() + HWGQActQuantizer(2)(x).sum()).backward()
    names = {event.name for event in prof.events()}
    assert {"kdtoolkit::lsq_forward", "kdtoolkit::lsq_backward", "kdtoolkit::hwgq_forward"} <= names


@pytest.mark.parametrize("name", ["lsq", "hwgq"])
def test_training_step_traces_without_graph_break(name):
    """The traced part of a W2A2 WRN-16-1 training step (forward and loss; the backward is traced by
    AOT autograd through the ops' autograd registration) is one graph."""
    model = w2a2_wrn16_1(name)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x, y: F.cross_entropy(model(x), y))(x, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    targets = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    assert any(f"kdtoolkit.{name}_forward" in target for target in targets)
    # and the compiled step (fullgraph) gives the eager step's loss and gradients
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    grads = []
    for forward in (model, compiled):
        model.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for eager, traced in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["lsq", "hwgq"])
def test_w2a2_model_exports(name):
    model = w2a2_wrn16_1(name).eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert sum(f"kdtoolkit.{name}_forward" in target for target in targets) >= 12
    with torch.no_grad():
        assert torch.equal(exported.module()(x), model(x))


@pytest.mark.slow
def test_inductor_compiled_and_eager_take_the_same_levels():
    """torch.compile with the default (Inductor) backend calls the same ops: identical activations."""
    model = w2a2_wrn16_1("lsq")
    x = torch.randn(4, 3, 32, 32)
    taps: list[dict] = [{}, {}]
    torch._dynamo.reset()
    for i, forward in enumerate((model, torch.compile(model))):
        handles = [m.act_quantizer.register_forward_hook(lambda mod, inp, out, i=i, n=n: taps[i].__setitem__(n, out))
                   for n, m in model.named_modules() if hasattr(m, "act_quantizer") and m.act_quantizer is not None]
        with torch.no_grad():
            forward(x)
        for handle in handles:
            handle.remove()
    # the hooks of the compiled run see the ops' outputs: compare the quantized inputs layer by layer
    assert taps[0].keys() == taps[1].keys() and len(taps[0]) >= 12
    for key in taps[0]:
        assert torch.equal(taps[0][key], taps[1][key]), key
