"""Model plugins: registration, options, parameter counts, the StagedModel protocol."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdtoolkit_plugins.models as model_plugin
from kdtoolkit import Pipeline
from kdtoolkit.errors import ConfigError
from kdtoolkit.models import StagedModel, run_stages
from kdtoolkit.plugins import get_plugin_manager, collect
from kdtoolkit_plugins.models import (
    AlexNetOptions,
    CifarResNetOptions,
    TorchvisionOptions,
    WRNOptions,
    build_alexnet_bn,
    build_resnet_cifar,
    build_torchvision,
    build_wrn,
)
from kdtoolkit_plugins.models.torchvision_models import StagedResNet, replace_head


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def registry():
    return collect(get_plugin_manager(load_entrypoints=False, plugins=[model_plugin]))


def test_registered_models(registry):
    assert set(registry.names("model")) >= {"wrn", "resnet18_cifar", "alexnet_bn", "torchvision"}
    for name in ("wrn", "resnet18_cifar", "alexnet_bn", "torchvision"):
        component = registry.get("model", name)
        assert component.description
        assert component.plugin == model_plugin.__name__


def test_factory_through_registry(registry):
    component = registry.get("model", "wrn")
    model = component.factory(component.make_options(depth=10, width=1), num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


# ---- parameter counts against independent references -------------------------------------------


def wrn_param_count(depth: int, width: int, num_classes: int) -> int:
    """Parameters of WRN-d-k counted layer by layer from the paper's description."""
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    total = 3 * 16 * 9  # conv1
    for g in range(3):
        cin, cout = widths[g], widths[g + 1]
        for i in range(n):
            c = cin if i == 0 else cout
            total += 2 * c + c * cout * 9 + 2 * cout + cout * cout * 9  # bn1, conv1, bn2, conv2
            if c != cout:
                total += c * cout  # 1x1 shortcut
    return total + 2 * widths[3] + widths[3] * num_classes + num_classes  # bn, fc


@pytest.mark.parametrize(
    "depth,width,classes,published",
    [(16, 1, 10, 0.175e6), (40, 1, 100, 0.57e6), (16, 2, 100, 0.70e6), (40, 2, 100, 2.26e6)],
)
def test_wrn_param_count(depth, width, classes, published):
    model = build_wrn(WRNOptions(depth=depth, width=width), num_classes=classes)
    count = n_params(model)
    assert count == wrn_param_count(depth, width, classes)
    assert abs(count - published) / published < 0.01  # the figures quoted in papers (RepDistiller table)


def test_resnet_cifar_param_count():
    # torchvision's resnet18/34 (11,689,512 / 21,797,672 with 1000 classes) minus the 7x7 stem
    # (+3x3 stem) and with a 10-way head: the CIFAR ResNet-18/34 figures (11,173,962 / 21,282,122).
    for depth, torchvision_count in ((18, 11_689_512), (34, 21_797_672)):
        expected = torchvision_count - 3 * 64 * 49 + 3 * 64 * 9 - (512 * 1000 + 1000) + (512 * 10 + 10)
        assert n_params(build_resnet_cifar(CifarResNetOptions(depth=depth), num_classes=10)) == expected
    assert expected == 21_282_122


def test_wrn_structure():
    model = build_wrn(WRNOptions(depth=16, width=2), num_classes=10)
    assert model.stage_paths == ("block1", "block2", "block3")
    for name in ("conv1", "block1", "block2", "block3", "bn", "fc"):
        assert hasattr(model, name)
    assert [len(getattr(model, f"block{i}")) for i in (1, 2, 3)] == [2, 2, 2]
    assert model.fc.in_features == 128
    block = model.block2[0]
    assert isinstance(block.conv1, nn.Conv2d) and block.conv1.stride == (2, 2)
    assert isinstance(block.shortcut, nn.Conv2d)
    assert model.block2[1].shortcut is None


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def wrn_reference_forward(model, x):
    """Functional WRN forward after the attention-transfer reference code (szagoruyko/attention-transfer):
    ``o1 = relu(bn0(x)); z = conv1(relu(bn1(conv0(o1)))); out = z + (convdim(o1) if widths differ else x)``."""
    h = F.conv2d(x, model.conv1.weight, padding=1)
    for g, stride in ((model.block1, 1), (model.block2, 2), (model.block3, 2)):
        for i, block in enumerate(g):
            s = stride if i == 0 else 1
            o1 = F.relu(_bn(h, block.bn1))
            y = F.conv2d(o1, block.conv1.weight, stride=s, padding=1)
            z = F.conv2d(F.relu(_bn(y, block.bn2)), block.conv2.weight, padding=1)
            h = z + (F.conv2d(o1, block.shortcut.weight, stride=s) if block.shortcut is not None else h)
    o = F.relu(_bn(h, model.bn))
    return F.linear(F.avg_pool2d(o, o.shape[-1]).flatten(1), model.fc.weight, model.fc.bias)


def test_wrn_matches_functional_reference():
    torch.manual_seed(0)
    model = build_wrn(WRNOptions(depth=16, width=2), num_classes=10)
    _randomize_bn(model, torch.Generator().manual_seed(2))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), wrn_reference_forward(model, x), rtol=1e-4, atol=1e-5)


def resnet_reference_forward(model, x):
    """Functional CIFAR ResNet (He et al. 2016, option B shortcuts): relu(bn2(conv2(relu(bn1(conv1 x)))) + sc)."""
    h = F.relu(_bn(F.conv2d(x, model.conv1.weight, padding=1), model.bn1))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            s = block.conv1.stride[0]
            y = F.relu(_bn(F.conv2d(h, block.conv1.weight, stride=s, padding=1), block.bn1))
            y = _bn(F.conv2d(y, block.conv2.weight, padding=1), block.bn2)
            if block.downsample is not None:
                h = _bn(F.conv2d(h, block.downsample[0].weight, stride=s), block.downsample[1])
            h = F.relu(y + h)
    return F.linear(h.mean((2, 3)), model.fc.weight, model.fc.bias)


def test_resnet_cifar_matches_functional_reference():
    torch.manual_seed(0)
    model = build_resnet_cifar(num_classes=10)
    _randomize_bn(model, torch.Generator().manual_seed(2))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resnet_reference_forward(model, x), rtol=1e-4, atol=1e-4)


# ---- options validation ------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [4, 12, 15, 17])
def test_wrn_depth_must_be_6n_plus_4(depth):
    with pytest.raises(ValueError, match="6n\\+4"):
        WRNOptions(depth=depth)


@pytest.mark.parametrize(
    "make",
    [
        lambda: WRNOptions(width=0),
        lambda: WRNOptions(dropout=1.0),
        lambda: CifarResNetOptions(depth=50),
        lambda: AlexNetOptions(fc_width=0),
        lambda: AlexNetOptions(geometry="imagenet64"),
    ],
)
def test_bad_options(make):
    with pytest.raises(ValueError):
        make()


def test_torchvision_unknown_arch_suggests_close_names():
    with pytest.raises(ValueError, match="resnet18") as info:
        TorchvisionOptions(arch="resnet19")
    assert "unknown torchvision" in str(info.value)
    with pytest.raises(ValueError, match="mobilenet_v2"):
        TorchvisionOptions(arch="mobilenetv2")


# ---- StagedModel protocol ----------------------------------------------------------------------


STAGED = {
    "wrn-10-2": lambda: build_wrn(WRNOptions(depth=10, width=2), num_classes=10),
    "wrn-16-1-dropout": lambda: build_wrn(WRNOptions(depth=16, width=1, dropout=0.3), num_classes=10),
    "resnet18_cifar": lambda: build_resnet_cifar(num_classes=100),
    "alexnet_bn": lambda: build_alexnet_bn(AlexNetOptions(fc_width=64), num_classes=100),
    "torchvision-resnet18": lambda: build_torchvision(TorchvisionOptions(arch="resnet18"), num_classes=10),
}


def _randomize_bn(model: nn.Module, generator: torch.Generator) -> None:
    # non-trivial running statistics so eval mode is a real test
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)


@pytest.mark.parametrize("name", sorted(STAGED))
def test_staged_models_honour_protocol(name):
    _check_staged_protocol(name, STAGED[name], torch.randn(2, 3, 32, 32))


def _check_staged_protocol(name, make, x):
    torch.manual_seed(0)
    model = make()
    _randomize_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    assert isinstance(model, StagedModel)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, run_stages(model, x))
        # stage_paths name the modules whose outputs end the stages
        captured = {}
        handles = [
            model.get_submodule(path).register_forward_hook(
                lambda mod, inp, out, path=path: captured.__setitem__(path, out.clone())
            )
            for path in model.stage_paths
        ]
        model(x)
        for h in handles:
            h.remove()
        h = x
        for k, path in enumerate(model.stage_paths):
            h = model.forward_stage(k, h)
            assert torch.equal(captured[path], h), (name, path)
    with pytest.raises(IndexError):
        model.forward_stage(len(model.stage_paths) + 1, x)


def test_stage_shapes_wrn_and_resnet():
    x = torch.randn(2, 3, 32, 32)
    wrn = build_wrn(WRNOptions(depth=10, width=1), num_classes=10).eval()
    resnet = build_resnet_cifar(num_classes=10).eval()
    alex = build_alexnet_bn(AlexNetOptions(fc_width=32), num_classes=10).eval()
    expected = {
        wrn: [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
        resnet: [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
        alex: [(256, 8, 8), (384, 8, 8), (256, 4, 4)],
    }
    with torch.no_grad():
        for model, shapes in expected.items():
            h = x
            for k, shape in enumerate(shapes):
                h = model.forward_stage(k, h)
                assert tuple(h.shape[1:]) == shape


def test_each_relu_module_runs_once():
    # activation quantizers replace nn.ReLU modules: each must be a distinct call site
    for model in (
        build_wrn(WRNOptions(depth=10), num_classes=10),
        build_resnet_cifar(num_classes=10),
        build_alexnet_bn(AlexNetOptions(fc_width=32), num_classes=10),
    ):
        calls = {}
        relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
        assert relus
        for name, m in relus:
            m.register_forward_hook(lambda mod, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        model.eval()(torch.randn(2, 3, 32, 32))
        assert calls == {name: 1 for name, _ in relus}


def test_training_mode_backward():
    model = build_resnet_cifar(num_classes=10)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_alexnet_larger_inputs():
    model = build_alexnet_bn(AlexNetOptions(fc_width=32, dropout=0.5), num_classes=5).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert isinstance(model.drop6, nn.Dropout)
    assert isinstance(model.bn6, nn.BatchNorm1d) and model.fc6.bias is None


# ---- AlexNet-BN geometries ---------------------------------------------------------------------


def _imagenet_alexnet(fc_width=64, num_classes=1000):
    return build_alexnet_bn(AlexNetOptions(fc_width=fc_width, geometry="imagenet"), num_classes=num_classes)


@pytest.mark.parametrize("size", [224, 227])
def test_alexnet_imagenet_geometry_shapes(size):
    model = _imagenet_alexnet().eval()
    assert model.stage_paths == ("pool2", "relu4", "pool5")
    x = torch.randn(2, 3, size, size)
    shapes = [(256, 13, 13), (384, 13, 13), (256, 6, 6), (1000,)]
    h = x
    with torch.no_grad():
        for k, shape in enumerate(shapes):
            h = model.forward_stage(k, h)
            assert tuple(h.shape) == (2, *shape), (size, k)
        assert model(x).shape == (2, 1000)
        # conv1 (padding 2) gives 55 (224) or 56 (227); both pool to 27, and pool5 is already 6x6
        conv1 = model.conv1(x).shape[-1]
        assert conv1 == {224: 55, 227: 56}[size]
        assert model.pool1(model.conv1(x)).shape[-1] == 27


def test_alexnet_imagenet_geometry_honours_protocol():
    _check_staged_protocol("alexnet_bn-imagenet", _imagenet_alexnet, torch.randn(2, 3, 227, 227))


def test_alexnet_imagenet_layout_and_param_count():
    model = _imagenet_alexnet(fc_width=64, num_classes=1000)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((11, 11), (4, 4), (2, 2))
    assert [model.get_submodule(f"conv{i}").out_channels for i in range(1, 6)] == [96, 256, 384, 384, 256]
    assert [(m.kernel_size, m.stride, m.padding) for m in (model.pool1, model.pool2, model.pool5)] == [(3, 2, 0)] * 3
    assert model.avgpool.output_size == 6 and model.fc6.in_features == 256 * 6 * 6
    # the Caffe AlexNet without channel groups, bias-free layers followed by BN (2 parameters per channel)
    convs = 96 * 3 * 11 * 11 + 256 * 96 * 5 * 5 + 384 * 256 * 9 + 384 * 384 * 9 + 256 * 384 * 9
    fcs = 256 * 36 * 64 + 64 * 64 + 64 * 1000 + 1000
    bns = 2 * (96 + 256 + 384 + 384 + 256 + 64 + 64)
    assert n_params(model) == convs + fcs + bns


@pytest.mark.parametrize("geometry", ["cifar", "imagenet"])
def test_alexnet_bn_after_every_conv_and_hidden_fc(geometry):
    model = build_alexnet_bn(AlexNetOptions(fc_width=32, geometry=geometry), num_classes=10)
    children = list(model.named_children())
    names = [n for n, _ in children]
    convs = [(i, m) for i, (n, m) in enumerate(children) if isinstance(m, nn.Conv2d)]
    linears = [(i, m) for i, (n, m) in enumerate(children) if isinstance(m, nn.Linear)]
    assert len(convs) == 5 and len(linears) == 3
    for i, conv in convs:
        bn = children[i + 1][1]
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels and conv.bias is None
        assert isinstance(children[i + 2][1], nn.ReLU)
    for i, fc in linears[:2]:
        bn = children[i + 1][1]
        assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == fc.out_features and fc.bias is None
        assert isinstance(children[i + 2][1], nn.ReLU)
    assert names[-1] == "fc8" and model.fc8.bias is not None  # the logits: no BN
    assert names == [n for n, _ in build_alexnet_bn(num_classes=10).named_children()]  # same names in both


def test_alexnet_cifar_default_unchanged():
    assert AlexNetOptions().geometry == "cifar"
    torch.manual_seed(0)
    default = build_alexnet_bn(AlexNetOptions(fc_width=32), num_classes=10)
    torch.manual_seed(0)
    explicit = build_alexnet_bn(AlexNetOptions(fc_width=32, geometry="cifar"), num_classes=10)
    assert default.geometry == "cifar"
    a, b = default.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the 32x32 layout: 5x5 stride-1 stem, padded 3/2 max pools, 4x4 before fc6
    assert (default.conv1.kernel_size, default.conv1.stride, default.conv1.padding) == ((5, 5), (1, 1), (2, 2))
    assert [(m.kernel_size, m.stride, m.padding) for m in (default.pool1, default.pool2, default.pool5)] == [(3, 2, 1)] * 3
    assert default.avgpool.output_size == 4
    assert {k: tuple(v.shape) for k, v in a.items() if k.startswith(("conv", "fc"))} == {
        "conv1.weight": (96, 3, 5, 5), "conv2.weight": (256, 96, 5, 5), "conv3.weight": (384, 256, 3, 3),
        "conv4.weight": (384, 384, 3, 3), "conv5.weight": (256, 384, 3, 3), "fc6.weight": (32, 4096),
        "fc7.weight": (32, 32), "fc8.weight": (10, 32), "fc8.bias": (10,),
    }


def test_alexnet_bad_geometry_is_a_config_error_naming_the_key():
    raw = {
        "schema_version": 1,
        "run": {"name": "t", "epochs": 1},
        "data": {"name": "cifar10"},
        "models": {"student": {"name": "alexnet_bn", "geometry": "imagenet224"}},
        "losses": [{"name": "ce"}],
    }
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(raw)
    problems = dict(info.value.problems)
    assert "models.student.geometry" in problems, problems
    message = problems["models.student.geometry"]
    assert "'cifar'" in message and "'imagenet'" in message and "imagenet224" in message
    raw["models"]["student"]["geometry"] = "imagenet"
    assert Pipeline.from_dict(raw).config.models["student"].options.geometry == "imagenet"


def test_torchvision_other_arch_not_staged():
    model = build_torchvision(TorchvisionOptions(arch="mobilenet_v3_small"), num_classes=10).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert not isinstance(model, StagedModel)


def test_torchvision_resnet_state_dict_is_torchvision_s():
    import torchvision

    model = build_torchvision(TorchvisionOptions(arch="resnet18"), num_classes=10)
    assert isinstance(model, StagedResNet)
    reference = torchvision.models.resnet18(num_classes=10)
    assert list(model.state_dict()) == list(reference.state_dict())


def test_torchvision_pretrained_replaces_head(tmp_path, monkeypatch):
    # A fake "downloaded" checkpoint in the hub cache: torch loads it instead of downloading.
    import torchvision

    weights = torchvision.models.ResNet18_Weights.DEFAULT
    torch.manual_seed(3)
    source = torchvision.models.resnet18()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(source.state_dict(), checkpoints / weights.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    model = build_torchvision(TorchvisionOptions(arch="resnet18", pretrained=True), num_classes=10)
    assert isinstance(model, StagedResNet)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.out_features == 10 and model.fc.in_features == 512
    same = build_torchvision(TorchvisionOptions(arch="resnet18", pretrained=True), num_classes=1000)
    assert torch.equal(same.fc.weight, source.fc.weight)


def test_replace_head_conv_classifier():
    import torchvision

    model = torchvision.models.squeezenet1_1()
    path = replace_head(model, 1000, 7)
    assert path == "classifier.1"
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="no classifier"):
        replace_head(model, 1000, 7)
