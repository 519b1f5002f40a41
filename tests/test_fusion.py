"""Fusion plugins against references written here from the formulas."""

from __future__ import annotations

import cattrs
import pytest
import torch

import kdtoolkit_plugins.losses.fusion as fusion_plugin
from kdtoolkit.plugins import load_registry

B, C = 5, 7


@pytest.fixture(scope="module")
def registry():
    return load_registry(load_entrypoints=False, plugins=[fusion_plugin])


def make(registry, name, num_inputs=3, **options):
    component = registry.get("fusion", name)
    return component.factory(component.make_options(**options), num_inputs=num_inputs).double()


def randn(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()


def inputs(n=3, shape=(B, C), seed=0):
    return [randn(*shape, seed=seed + i) for i in range(n)]


def ref_softmax(z):
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def test_registered(registry):
    assert registry.names("fusion") == ["avg_logits", "avg_softmax", "importance", "minlogit"]
    for component in registry.components("fusion"):
        assert component.plugin == "kdtoolkit_plugins.losses.fusion"
        assert component.options is not None and component.description


def test_loss_plugin_does_not_register_fusions():
    import kdtoolkit_plugins.losses as losses_plugin

    registry = load_registry(load_entrypoints=False, plugins=[losses_plugin])
    assert registry.names("fusion") == []


def test_avg_logits(registry):
    zs = inputs()
    out = make(registry, "avg_logits")(zs)
    torch.testing.assert_close(out, (zs[0] + zs[1] + zs[2]) / 3)
    out.sum().backward()
    for z in zs:
        torch.testing.assert_close(z.grad, torch.full_like(z, 1 / 3))


@pytest.mark.parametrize("T", [None, 1.0, 4.0])
def test_avg_softmax_reproduces_averaged_distribution(registry, T):
    zs = inputs(seed=10)
    out = make(registry, "avg_softmax")(zs, temperature=T)
    t = 1.0 if T is None else T
    averaged = sum(ref_softmax(z / t) for z in zs) / len(zs)
    torch.testing.assert_close(ref_softmax(out / t), averaged)
    torch.testing.assert_close(out, t * torch.log(averaged))
    # sanity: this is not the softmax of the averaged logits
    assert not torch.allclose(ref_softmax(out / t), ref_softmax(sum(zs) / len(zs) / t))
    out.sum().backward()  # Σ_c out changes with every input (log of a mixture)
    for z in zs:
        assert z.grad is not None and z.grad.abs().sum() > 0


def test_minlogit_fusion(registry):
    zs = inputs(seed=20)
    y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(3))
    fusion = make(registry, "minlogit")
    out = fusion(zs, temperature=2.0, labels=y)
    assert torch.all(out[torch.arange(B), y] == 0)  # exactly 0 at the target class
    for b in range(B):
        for c in range(C):
            expected = min(float(z.detach()[b, c] - z.detach()[b, y[b]]) for z in zs)
            assert out[b, c].item() == expected
    with pytest.raises(ValueError, match="labels"):
        fusion(zs)


def test_minlogit_fusion_agrees_with_the_loss_target():
    from kdtoolkit_plugins.losses.mutual import minlogit_ensemble

    zs = inputs(seed=25)
    y = torch.tensor([0, 1, 2, 3, 4])
    fused = fusion_plugin.MinLogitFusion(num_inputs=3)(zs, labels=y)
    torch.testing.assert_close(fused, minlogit_ensemble(zs, y))


@pytest.mark.parametrize("shape", [(B, C), (B, 4, 3, 3)])
def test_importance_uniform_init_and_gradients(registry, shape):
    xs = inputs(shape=shape, seed=30)
    fusion = make(registry, "importance")
    assert fusion.importance.shape == (3,)
    torch.testing.assert_close(fusion.weights(), torch.full((3,), 1 / 3, dtype=torch.float64))
    out = fusion(xs)
    torch.testing.assert_close(out, sum(xs) / 3)
    g = randn(*shape, seed=99).detach()
    (out * g).sum().backward()
    w = torch.softmax(fusion.importance.detach(), 0)
    dots = torch.stack([(x.detach() * g).sum() for x in xs])
    torch.testing.assert_close(fusion.importance.grad, w * (dots - (w * dots).sum()))
    assert fusion.importance.grad.abs().sum() > 0
    for i, x in enumerate(xs):
        torch.testing.assert_close(x.grad, w[i] * g)


def test_importance_init_option(registry):
    xs = inputs(n=2, seed=40)
    fusion = make(registry, "importance", num_inputs=2, init=(1.0, -1.0))
    w = torch.softmax(torch.tensor([1.0, -1.0], dtype=torch.float64), 0)
    torch.testing.assert_close(fusion.weights(), w)
    assert not fusion.weights().requires_grad
    torch.testing.assert_close(fusion(xs), w[0] * xs[0] + w[1] * xs[1])
    assert "importance" in dict(fusion.named_parameters())
    with pytest.raises(ValueError, match="init"):
        make(registry, "importance", num_inputs=3, init=(1.0, -1.0))


def test_importance_options_from_config(registry):
    options_cls = registry.get("fusion", "importance").options
    options = cattrs.Converter().structure({"init": [0.5, 0.0, 1.0]}, options_cls)
    assert options.init == (0.5, 0.0, 1.0)
    assert cattrs.Converter().structure({}, options_cls).init is None


def test_wrong_number_or_shape_of_inputs(registry):
    fusion = make(registry, "avg_logits", num_inputs=3)
    with pytest.raises(ValueError, match="3 inputs"):
        fusion(inputs(n=2))
    with pytest.raises(ValueError, match="shapes"):
        fusion([randn(B, C), randn(B, C), randn(B, C + 1)])


def test_entry_points_name_the_plugin_modules():
    import importlib.metadata as md

    eps = {ep.name: ep.value for ep in md.entry_points(group="kdtoolkit")}
    assert eps.get("losses") == "kdtoolkit_plugins.losses"
    assert eps.get("fusions") == "kdtoolkit_plugins.losses.fusion"
    (fusions,) = tuple(md.entry_points(group="kdtoolkit", name="fusions"))
    assert hasattr(fusions.load(), "register_fusions")
