"""Model conversion: quantize_model, layer paths, first/last rule, overrides, float warm start,
bf16 autocast + channels_last, no host syncs. Small models are defined here (no model zoo)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.quant import (
    LayerOverride,
    QConv2d,
    QLinear,
    load_float_state_dict,
    plan_bits,
    quantize_model,
    quantized_layers,
    quantizer_state_keys,
)
from kdtoolkit_plugins.quantizers.hwgq import HWGQQuantizer, HWGQOptions
from kdtoolkit_plugins.quantizers.lsq import LSQQuantizer, LSQOptions


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + self.shortcut(pre)


class TinyNet(nn.Module):
    """conv -> two pre-activation blocks -> bn/relu -> pool -> fc."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.block1 = nn.Sequential(Block(8, 8, 1))
        self.block2 = nn.Sequential(Block(8, 16, 2))
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.conv1(x)))
        return self.fc(F.relu(self.bn(x)).mean(dim=(2, 3)))


ALL_LAYERS = [
    "conv1",
    "block1.0.conv1", "block1.0.conv2", "block1.0.shortcut",
    "block2.0.conv1", "block2.0.conv2", "block2.0.shortcut",
    "fc",
]
QUANTIZERS = {"hwgq": lambda: HWGQQuantizer(HWGQOptions()), "lsq": lambda: LSQQuantizer(LSQOptions())}


@pytest.fixture(params=sorted(QUANTIZERS))
def quantizer(request):
    return QUANTIZERS[request.param]()


def test_paths_and_parameter_names_do_not_change(quantizer):
    model = TinyNet()
    float_params = dict(model.named_parameters())
    float_keys = set(model.state_dict())
    converted = quantize_model(model, quantizer, weight_bits=2, act_bits=2)
    assert converted == ALL_LAYERS[1:-1]
    for name, p in model.named_parameters():
        if ".weight_quantizer." in name or ".act_quantizer." in name:
            continue
        assert float_params[name] is p  # same names, same tensors (in-place conversion)
    extra = set(model.state_dict()) - float_keys
    assert float_keys <= set(model.state_dict())
    assert extra == set(quantizer_state_keys(model))
    assert all(".weight_quantizer." in k or ".act_quantizer." in k for k in extra)
    layer = model.block1[0].conv1
    assert isinstance(layer, QConv2d) and isinstance(layer, nn.Conv2d)
    assert layer.weight_quantizer is not None and layer.act_quantizer is not None
    assert dict(model.named_modules())["block1.0.conv1"] is layer


def test_first_and_last_layers_stay_full_precision_by_default(quantizer):
    model = TinyNet()
    quantize_model(model, quantizer, weight_bits=2, act_bits=2)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    every = TinyNet()
    assert quantize_model(every, QUANTIZERS["hwgq"](), weight_bits=2, act_bits=2, keep_first_last=False) == ALL_LAYERS
    assert isinstance(every.fc, QLinear) and isinstance(every.conv1, QConv2d)


def test_overrides_later_ones_win_and_32_means_full_precision():
    model = TinyNet()
    overrides = [
        LayerOverride("block2.*", weight_bits=4),
        LayerOverride("*.shortcut", weight_bits=8, act_bits=8),
        LayerOverride("block1.0.conv2", weight_bits=32, act_bits=32),
        LayerOverride("block1.0.conv1", act_bits=32),
        LayerOverride("fc", weight_bits=4, act_bits=4),
    ]
    converted = quantize_model(model, HWGQQuantizer(), weight_bits=2, act_bits=3, overrides=overrides)
    bits = {p: (m.weight_bits, m.act_bits) for p, m in quantized_layers(model).items()}
    assert bits == {
        "block1.0.conv1": (2, 32),
        "block1.0.shortcut": (8, 8),
        "block2.0.conv1": (4, 3),
        "block2.0.conv2": (4, 3),
        "block2.0.shortcut": (8, 8),
        "fc": (4, 4),
    }
    assert converted == list(bits)
    assert model.block1[0].conv1.act_quantizer is None
    assert type(model.block1[0].conv2) is nn.Conv2d
    with pytest.raises(ValueError, match="match no"):
        plan_bits(TinyNet(), weight_bits=2, act_bits=2, overrides=[LayerOverride("nothing.*", 4)])
    with pytest.raises(ValueError):
        LayerOverride("fc", weight_bits=12)


def test_default_bits_come_from_the_options_and_double_conversion_is_refused():
    model = TinyNet()
    quantize_model(model, HWGQQuantizer(HWGQOptions(weight_bits=3, act_bits=4)))
    assert model.block1[0].conv1.weight_bits == 3 and model.block1[0].conv1.act_bits == 4
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, HWGQQuantizer())


def test_forward_hooks_registered_before_conversion_still_fire(quantizer):
    model = TinyNet()
    seen = []
    model.block2[0].conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    quantize_model(model, quantizer, weight_bits=2, act_bits=2)
    model(torch.randn(2, 3, 8, 8))
    assert seen == [torch.Size([2, 16, 4, 4])]


def test_quantized_layer_computes_conv_of_quantized_input_and_weight(quantizer):
    model = TinyNet()
    quantize_model(model, quantizer, weight_bits=2, act_bits=2)
    layer = model.block1[0].conv2
    x = torch.rand(2, 8, 6, 6)
    expected = F.conv2d(layer.act_quantizer(x), layer.weight_quantizer(layer.weight), None, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    assert len(torch.unique(layer.quantized_weight())) <= 4


def test_float_state_dict_warm_start(quantizer):
    torch.manual_seed(0)
    float_model = TinyNet()
    with torch.no_grad():  # make the BN statistics non-trivial
        float_model.train()(torch.randn(8, 3, 8, 8))
    state = float_model.state_dict()
    qmodel = TinyNet()  # different random weights
    quantize_model(qmodel, quantizer, weight_bits=2, act_bits=2)
    qmodel(torch.randn(4, 3, 8, 8))  # LSQ: activation steps initialised from a batch of the *old* weights
    lacking = load_float_state_dict(qmodel, state)
    assert lacking == sorted(quantizer_state_keys(qmodel))
    for key, value in state.items():
        assert torch.equal(qmodel.state_dict()[key], value)
    if isinstance(quantizer, LSQQuantizer):
        for layer in quantized_layers(qmodel).values():
            w = layer.weight.detach()
            q_p = 2 ** (layer.weight_bits - 1) - 1
            torch.testing.assert_close(layer.weight_quantizer.step.detach(), 2 * w.abs().mean() / math.sqrt(q_p))
            assert not layer.act_quantizer.initialized  # re-initialised from the next batch
    out = qmodel(torch.randn(4, 3, 8, 8))
    assert torch.isfinite(out).all()
    # a quantized checkpoint (with quantizer state) loads as is
    again = TinyNet()
    quantize_model(again, quantizer.__class__(quantizer.options), weight_bits=2, act_bits=2)
    assert load_float_state_dict(again, qmodel.state_dict()) == []
    for key, value in qmodel.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_float_state_dict_must_be_complete_and_nothing_else(quantizer):
    state = TinyNet().state_dict()
    qmodel = TinyNet()
    quantize_model(qmodel, quantizer, weight_bits=2, act_bits=2)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    broken = dict(state)
    del broken["block1.0.bn2.running_mean"]
    with pytest.raises(KeyError, match="block1.0.bn2.running_mean"):
        load_float_state_dict(qmodel, broken)
    extra = dict(state, **{"head.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="head.weight"):
        load_float_state_dict(qmodel, extra)
    for key, value in qmodel.state_dict().items():  # nothing was loaded
        assert torch.equal(before[key], value)


@pytest.mark.parametrize("compute_dtype", ["input", "float32"])
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_bf16_autocast_channels_last_forward_backward(name, compute_dtype):
    options = {"hwgq": HWGQOptions, "lsq": LSQOptions}[name](compute_dtype=compute_dtype)
    quantizer = {"hwgq": HWGQQuantizer, "lsq": LSQQuantizer}[name](options)
    model = TinyNet()
    quantize_model(model, quantizer, weight_bits=2, act_bits=2)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    assert logits.dtype == torch.bfloat16
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.dtype == p.dtype
    if name == "lsq":
        assert model.block1[0].conv1.act_quantizer.step.grad.abs() > 0


def test_no_host_sync_in_a_training_step(quantizer, monkeypatch):
    model = TinyNet()
    quantize_model(model, quantizer, weight_bits=2, act_bits=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside a training step")

    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(2):  # the first step includes LSQ's activation init
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_training_reduces_the_loss(quantizer):
    torch.manual_seed(0)
    model = TinyNet()
    quantize_model(model, quantizer, weight_bits=2, act_bits=2)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_subclass_with_own_forward_must_be_kept_full_precision():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = TinyNet()
    model.block1[0].conv2 = MyConv(8, 8, 3, 1, 1, bias=False)
    with pytest.raises(TypeError, match="LayerOverride"):
        quantize_model(model, HWGQQuantizer(), weight_bits=2, act_bits=2)
    assert not quantized_layers(model)  # checked before anything was converted
    model = TinyNet()
    model.block1[0].conv2 = MyConv(8, 8, 3, 1, 1, bias=False)
    quantize_model(model, HWGQQuantizer(), weight_bits=2, act_bits=2,
                   overrides=[LayerOverride("block1.0.conv2", 32, 32)])
    assert type(model.block1[0].conv2) is MyConv


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_torch_compile_matches_eager(name):
    """Under torch.compile the quantizers switch to plain math: same values and gradients.

    Inputs stay away from rounding thresholds (the compiled code may compute ``x/s`` as
    ``x·(1/s)``, which moves an input lying on a threshold by one ulp)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    quantizer = QUANTIZERS[name]()
    act, weight_q = quantizer.act_quantizer(2, layer), quantizer.weight_quantizer(2, layer)
    step = 0.5388 if name == "hwgq" else 0.3
    if name == "lsq":
        act.initialize(torch.ones(1))
        with torch.no_grad():
            act.step.fill_(step)
    k = torch.randint(-1, 5, (4, 8, 6, 6)).double()
    frac = torch.rand(4, 8, 6, 6, dtype=torch.float64) * 0.3 + torch.randint(0, 2, (4, 8, 6, 6)) * 0.5 + 0.1
    x = ((k + frac) * step).float()

    def run(fn):
        xi = x.clone().requires_grad_()
        params = [p for p in act.parameters()] + [layer.weight] + [p for p in weight_q.parameters()]
        for p in params:
            p.grad = None
        out = F.conv2d(fn(act, xi), fn(weight_q, layer.weight), padding=1)
        out.backward(torch.ones_like(out))
        return [out.detach(), xi.grad] + [p.grad.clone() for p in params]

    eager = run(lambda q, v: q(v))
    compiled = run(torch.compile(lambda q, v: q(v), dynamic=False))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # a whole quantized model also compiles and trains
    model = TinyNet()
    quantize_model(model, QUANTIZERS[name](), weight_bits=2, act_bits=2)
    loss = F.cross_entropy(torch.compile(model)(torch.randn(8, 3, 8, 8)), torch.arange(8) % 5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
