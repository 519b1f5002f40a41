"""Feature taps: forward hooks by module path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.errors import ConfigError
from kdtoolkit.features import FeatureTaps, UnknownModulePath, resolve_module, suggest_paths, unwrap


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = nn.Sequential(Block(4, 4), Block(4, 8))
        self.heads = nn.ModuleList([nn.Linear(8, 5), nn.Linear(8, 3)])
        self.extra = nn.Conv2d(8, 8, 1)

    def forward(self, x, use_extra=False):
        x = self.block1(self.stem(x))
        if use_extra:
            x = self.extra(x)
        return self.heads[0](x.mean(dim=(2, 3)))


class Wrapper(nn.Module):
    """DDP-like: holds the model as ``.module`` and forwards to it."""

    def __init__(self, model, attr="module"):
        super().__init__()
        setattr(self, attr, model)
        self._attr = attr

    def forward(self, *args, **kwargs):
        return getattr(self, self._attr)(*args, **kwargs)


def manual(net, x):
    """The tapped tensors computed by hand, without hooks."""
    out = {}
    s = net.stem(x)
    b0 = net.block1[0]
    c1 = b0.conv1(s)
    out["block1.0.conv1"] = c1
    h = b0.conv2(F.relu(b0.bn1(c1)))
    out["block1.0"] = h
    b1 = net.block1[1]
    out["block1.1.conv2"] = b1.conv2(F.relu(b1.bn1(b1.conv1(h))))
    out["block1"] = out["block1.1.conv2"]
    return out


PATHS = ["block1.0.conv1", "block1.0", "block1.1.conv2", "block1"]


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def x_input(seed=1):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_taps_capture_the_right_tensors(net):
    x = x_input()
    with FeatureTaps(net, PATHS) as taps:
        net(x)
        assert set(taps.features) == set(PATHS)
        expected = manual(net, x)
        for path in PATHS:
            torch.testing.assert_close(taps[path], expected[path])
        assert taps.get(["block1", "block1.0"])[1] is taps["block1.0"]
    assert taps.features  # still readable after removal


def test_taps_keep_autograd(net):
    with FeatureTaps(net, ["block1.0.conv1"]) as taps:
        net(x_input())
        feature = taps["block1.0.conv1"]
        assert feature.requires_grad
        feature.pow(2).sum().backward()
    assert net.block1[0].conv1.weight.grad.abs().sum() > 0


def test_features_cleared_at_each_forward(net):
    taps = FeatureTaps(net, ["extra", "block1"])
    net(x_input(), use_extra=True)
    first = taps["block1"]
    assert set(taps.features) == {"extra", "block1"}
    net(x_input(seed=2))
    assert set(taps.features) == {"block1"}  # "extra" was not run this time
    assert not torch.equal(first, taps["block1"])
    with pytest.raises(KeyError, match="extra"):
        taps["extra"]
    taps.clear()
    assert taps.features == {}
    taps.remove()
    net(x_input())
    assert taps.features == {}  # no hooks any more
    assert not net._forward_hooks and not net._forward_pre_hooks
    assert not net.block1._forward_hooks


def test_integer_components(net):
    assert resolve_module(net, "block1.1.conv2") is net.block1[1].conv2
    assert resolve_module(net, "block1.-1.conv2") is net.block1[1].conv2
    assert resolve_module(net, "heads.1") is net.heads[1]
    assert resolve_module(net, "") is net


def test_wrong_path_lists_near_matches(net):
    with pytest.raises(UnknownModulePath) as info:
        resolve_module(net, "block1.0.conv3")
    err = info.value
    assert isinstance(err, ConfigError)
    assert err.path == "block1.0.conv3"
    assert "block1.0.conv1" in err.suggestions and "block1.0.conv2" in err.suggestions
    assert "block1.0.conv2" in str(err) and "block1.0.conv3" in str(err)
    with pytest.raises(ConfigError, match="block1.1"):
        FeatureTaps(net, ["block1.1", "blok1.1"])
    assert not net.block1[1]._forward_hooks  # nothing registered when a path is wrong
    assert suggest_paths(net, "heads.7", n=2) and len(suggest_paths(net, "heads.7", n=2)) <= 2
    with pytest.raises(UnknownModulePath):
        resolve_module(net, "block1.5")


def test_ddp_like_wrapper(net):
    wrapped = Wrapper(net)
    assert unwrap(wrapped) is net
    # a path for the bare model works on the wrapped one, and vice versa
    assert resolve_module(wrapped, "block1.0.conv1") is net.block1[0].conv1
    assert resolve_module(wrapped, "module.block1.0.conv1") is net.block1[0].conv1
    assert resolve_module(net, "module.block1.0.conv1") is net.block1[0].conv1
    # nested: compile-like inside DDP-like
    nested = Wrapper(Wrapper(net, "_orig_mod"))
    assert resolve_module(nested, "block1.1") is net.block1[1]
    assert resolve_module(net, "module._orig_mod.block1.1") is net.block1[1]
    with pytest.raises(UnknownModulePath) as info:
        resolve_module(wrapped, "module.block1.0.conv9")
    assert "block1.0.conv1" in info.value.suggestions
    x = x_input()
    with FeatureTaps(wrapped, PATHS) as taps:
        wrapped(x)
        expected = manual(net, x)
        for path in PATHS:
            torch.testing.assert_close(taps[path], expected[path])


def test_a_real_child_named_module_is_not_a_wrapper():
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.other = nn.Linear(2, 2)

    owner = Owner()
    assert unwrap(owner) is owner
    assert resolve_module(owner, "module") is owner.module


def test_channels_last(net):
    net = net.to(memory_format=torch.channels_last)
    x = x_input().to(memory_format=torch.channels_last)
    with FeatureTaps(net, PATHS) as taps:
        net(x)
        expected = manual(net, x_input())
        for path in PATHS:
            torch.testing.assert_close(taps[path], expected[path])
        assert taps["block1.0.conv1"].is_contiguous(memory_format=torch.channels_last)


class FakeQuant(nn.Module):
    def __init__(self, step=0.25):
        super().__init__()
        self.step = step

    def forward(self, w):
        return torch.round(w / self.step) * self.step


class QConv2d(nn.Conv2d):
    """A quantized conv: subclass of nn.Conv2d with a child weight quantizer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = FakeQuant()

    def forward(self, x):
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


def test_quantized_layer(net):
    old = net.block1[0].conv1
    q = QConv2d(4, 4, 3, padding=1, bias=False)
    q.load_state_dict(old.state_dict())
    net.block1[0].conv1 = q  # same path after quantization
    x = x_input()
    with FeatureTaps(net, ["block1.0.conv1", "block1.0.conv1.weight_quantizer"]) as taps:
        net(x)
        s = net.stem(x)
        expected = F.conv2d(s, torch.round(q.weight / 0.25) * 0.25, padding=1)
        torch.testing.assert_close(taps["block1.0.conv1"], expected)
        torch.testing.assert_close(taps["block1.0.conv1.weight_quantizer"], torch.round(q.weight / 0.25) * 0.25)
        assert not torch.allclose(taps["block1.0.conv1"], F.conv2d(s, q.weight, padding=1))
