"""Stages declared by module paths (CMT-KD's staging module): torch.fx splitting of unstaged models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kdtoolkit.errors import ConfigError
from kdtoolkit.models import StagedModel, run_stages
from kdtoolkit_plugins.methods.cmtkd.staging import StagedFromPaths, as_staged, is_staged, staged_from_paths

CASES = {
    "mobilenet_v2": ["features.3", "features.6", "features.13"],
    "vgg11_bn": ["features.7", "features.14", "features.28"],
}


def _chain_equals_forward(model, x, training: bool) -> None:
    model.train(training)
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)  # same dropout masks: the stages run the same ops in the same order
    got = run_stages(model, x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_torchvision_model_split_keeps_parameters_and_forward(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    base = type(model)
    assert not is_staged(model)
    out = staged_from_paths(model, CASES[arch])
    assert out is model and isinstance(model, base) and isinstance(model, StagedFromPaths)
    assert isinstance(model, StagedModel) and model.stage_paths == tuple(CASES[arch])
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    _chain_equals_forward(model, x, training=False)
    _chain_equals_forward(model, x, training=True)
    # each stage ends at the output of its module
    seen = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, o)) for p in CASES[arch]]
    model.eval()
    h = x
    for k, path in enumerate(CASES[arch]):
        h = model.forward_stage(k, h)
        assert torch.equal(h, seen[path])
    for handle in handles:
        handle.remove()
    with pytest.raises(IndexError):
        model.forward_stage(len(CASES[arch]) + 1, h)


def test_gradients_flow_through_the_stages():
    model = staged_from_paths(torchvision.models.mobilenet_v2(num_classes=10), CASES["mobilenet_v2"])
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    run_stages(model, x).sum().backward()
    assert x.grad is not None and model.features[0][0].weight.grad.abs().sum() > 0


def test_stages_see_later_changes_of_the_model():
    """Stages look modules and buffers up on the live model: dtype moves, new weights and in-place
    quantization after staging all take effect."""
    from kdtoolkit.plugins import load_registry
    from kdtoolkit.quant import quantize_model

    torch.manual_seed(0)
    model = staged_from_paths(torchvision.models.mobilenet_v2(num_classes=10), CASES["mobilenet_v2"])
    model.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(run_stages(model, x), model(x))
    registry = load_registry()
    component = registry.get("quantizer", "hwgq")
    quantize_model(model, component.factory(component.make_options(weight_bits=4, act_bits=4)), weight_bits=4, act_bits=4)
    model.float()
    x = x.float()
    assert torch.equal(run_stages(model, x), model(x))


def test_forward_that_branches_on_training_mode_keeps_both_traces():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = self.b(self.a(x))
            if self.training:
                x = F.dropout(x, 0.5, True)
            return self.fc(x.mean((2, 3)))

    net = staged_from_paths(Net(), ["a", "b"])
    x = torch.randn(2, 3, 8, 8)
    _chain_equals_forward(net, x, training=False)
    _chain_equals_forward(net, x, training=True)
    assert "dropout" in net.stage_code(2, training=True) and "dropout" not in net.stage_code(2, training=False)


def _error(model, paths) -> tuple[str, str]:
    with pytest.raises(ConfigError) as info:
        staged_from_paths(model, paths)
    assert len(info.value.problems) == 1
    return info.value.problems[0]


def test_skip_connection_across_a_cut_is_a_clear_error():
    model = torchvision.models.resnet18(num_classes=10)
    path, message = _error(model, ["layer1.0.conv1", "layer2"])
    assert path == "method.stages"
    assert "skip connection" in message and "stages = [" in message and "layer1.0.conv1" in message
    assert type(model) is torchvision.models.ResNet  # nothing changed


def test_untraceable_model_is_a_clear_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            x = self.a(x)
            if x.sum() > 0:  # data-dependent control flow: not traceable
                x = -x
            return self.b(x)

    path, message = _error(Dynamic(), ["a"])
    assert path == "method.stages" and "cannot trace" in message and "stages = [" in message


def test_other_declaration_errors():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    _, message = _error(model, ["features.30"])
    assert "no module 'features.30'" in message and "features.0" in message  # names candidates
    _, message = _error(model, ["features.6", "features.3"])
    assert "execution order" in message
    _, message = _error(model, ["features.3", "features.3"])
    assert "distinct" in message

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    _, message = _error(Shared(), ["conv"])
    assert "called 2 times" in message


def test_as_staged():
    with pytest.raises(ConfigError) as info:
        as_staged(torchvision.models.mobilenet_v2(num_classes=10), None, name="t4")
    path, message = info.value.problems[0]
    assert path == "models.t4" and "stages = [" in message and "features.3" in message
    from kdtoolkit_plugins.models.torchvision_models import build_torchvision_model

    built_in = build_torchvision_model("resnet18", num_classes=10)
    assert as_staged(built_in, None) is built_in and type(built_in).__name__ == "StagedResNet"
    # declared paths override built-in stages, and a model can be re-split
    staged_from_paths(built_in, ["layer2", "layer4"])
    assert built_in.stage_paths == ("layer2", "layer4")
    staged_from_paths(built_in, ["layer1", "layer3"])
    assert built_in.stage_paths == ("layer1", "layer3") and type(built_in).__mro__[1] is StagedFromPaths
    built_in.eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(run_stages(built_in, x), built_in(x))
