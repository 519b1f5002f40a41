"""Loss plugins against independent float64 references written here from the formulas."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import nn

import kdtoolkit_plugins.losses as losses_plugin
from kdtoolkit.losses import call_loss
from kdtoolkit.plugins import load_registry

B, C = 6, 10
ALL_LOSSES = ["ce", "kd", "attention", "fitnet", "logit_l2", "minlogit", "dml", "ensemble_kd"]


@pytest.fixture(scope="module")
def registry():
    return load_registry(load_entrypoints=False, plugins=[losses_plugin])


def make(registry, name, **options):
    component = registry.get("loss", name)
    return component.factory(component.make_options(**options)).double()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0, grad=True):
    t = (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale)
    return t.requires_grad_(grad)


def labels(seed=0, n=B, c=C):
    return torch.randint(0, c, (n,), generator=gen(seed + 100))


# --- references, written from the formulas -------------------------------------------------------

def ref_softmax(z):
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def ref_kl(p, z, T):
    """T² · mean_b Σ_c p (log p − log softmax(z/T)), p a fixed distribution."""
    q = ref_softmax(z / T)
    return T * T * (p * (torch.log(p) - torch.log(q))).sum(dim=1).mean()


def ref_attention_map(f, p=2.0):
    a = (f.abs() ** p).mean(dim=1).reshape(f.shape[0], -1)
    return a / torch.sqrt((a * a).sum(dim=1, keepdim=True))


# --- registration --------------------------------------------------------------------------------

def test_all_losses_registered_with_options_inputs_and_detach(registry):
    assert set(ALL_LOSSES) <= set(registry.names("loss"))
    for name in ALL_LOSSES:
        component = registry.get("loss", name)
        assert component.plugin == "kdtoolkit_plugins.losses"
        assert component.options is not None and attrs.has(component.options), name
        assert component.description
        loss = component.factory(component.make_options())
        assert isinstance(loss, nn.Module)
        assert isinstance(type(loss).inputs, tuple) and all(isinstance(i, str) for i in type(loss).inputs)
        assert set(loss.detach) <= set(loss.inputs), name


def test_declared_inputs(registry):
    expected = {
        "ce": ("logits", "labels"), "kd": ("student", "teacher"), "attention": ("student", "teacher"),
        "fitnet": ("student", "teacher"), "logit_l2": ("student", "teacher"),
        "minlogit": ("logits", "labels"), "dml": ("logits", "labels"), "ensemble_kd": ("logits", "labels"),
    }
    for name, inputs in expected.items():
        assert registry.get("loss", name).factory(None).inputs == inputs


def test_options_are_validated(registry):
    for name in ("kd", "minlogit", "dml", "ensemble_kd"):
        with pytest.raises(ValueError):
            registry.get("loss", name).make_options(temperature=0.0)
    with pytest.raises(ValueError):
        registry.get("loss", "attention").make_options(form="squared")
    with pytest.raises(ValueError):
        registry.get("loss", "ce").make_options(label_smoothing=1.0)


# --- ce -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_ce_matches_reference(registry, smoothing):
    z, y = randn(B, C), labels()
    loss = make(registry, "ce", label_smoothing=smoothing)
    logp = torch.log(ref_softmax(z))
    nll = -logp[torch.arange(B), y]
    ref = ((1 - smoothing) * nll + smoothing * (-logp.mean(dim=1))).mean()
    out = loss(logits=z, labels=y)
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g, g_ref)


# --- kd -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_value_and_gradient(registry, T):
    zs, zt = randn(B, C, seed=1, scale=3), randn(B, C, seed=2, scale=3)
    loss = make(registry, "kd", temperature=T)
    assert loss.detach == ("teacher",)
    out = call_loss(loss, student=zs, teacher=zt)
    ref = ref_kl(ref_softmax(zt.detach() / T), zs, T)
    torch.testing.assert_close(out, ref)
    out.backward()
    assert zt.grad is None  # teacher detached
    # d/dz_s of T²·KL = T · (softmax(z_s/T) − softmax(z_t/T)) / B: the T² factor keeps it O(1/T) not O(1/T³)
    expected = T * (ref_softmax(zs.detach() / T) - ref_softmax(zt.detach() / T)) / B
    torch.testing.assert_close(zs.grad, expected)
    assert zs.grad.abs().sum() > 0


def test_kd_temperature_scaling(registry):
    zs, zt = randn(B, C, seed=3), randn(B, C, seed=4)
    for T in (2.0, 8.0):
        out = call_loss(make(registry, "kd", temperature=T), student=zs, teacher=zt)
        plain_kl = ref_kl(ref_softmax(zt.detach() / T), zs, T) / (T * T)
        torch.testing.assert_close(out, T * T * plain_kl)
    assert call_loss(make(registry, "kd"), student=zs, teacher=zs.detach().clone()).abs() < 1e-12


def test_kd_trains_teacher_when_asked(registry):
    zs, zt = randn(B, C, seed=5), randn(B, C, seed=6)
    loss = make(registry, "kd", detach_teacher=False)
    assert loss.detach == ()
    call_loss(loss, student=zs, teacher=zt).backward()
    zs2, zt2 = zs.detach().clone().requires_grad_(), zt.detach().clone().requires_grad_()
    T = 4.0
    ref = T * T * (ref_softmax(zt2 / T) * (torch.log(ref_softmax(zt2 / T)) - torch.log(ref_softmax(zs2 / T)))).sum(1).mean()
    ref.backward()
    torch.testing.assert_close(zt.grad, zt2.grad)
    torch.testing.assert_close(zs.grad, zs2.grad)
    assert zt.grad.abs().sum() > 0


# --- attention ----------------------------------------------------------------------------------

def feature_pairs(seed=0):
    student = [randn(B, 8, 8, 8, seed=seed), randn(B, 16, 4, 4, seed=seed + 1)]
    teacher = [randn(B, 12, 8, 8, seed=seed + 2), randn(B, 32, 4, 4, seed=seed + 3)]
    return student, teacher


def test_attention_reference_form(registry):
    student, teacher = feature_pairs()
    loss = make(registry, "attention")
    out = call_loss(loss, student=student, teacher=teacher)
    ref = sum(((ref_attention_map(s) - ref_attention_map(t.detach())) ** 2).mean() for s, t in zip(student, teacher))
    torch.testing.assert_close(out, ref)
    out.backward()
    ref_grads = torch.autograd.grad(
        sum(((ref_attention_map(s) - ref_attention_map(t.detach())) ** 2).mean() for s, t in zip(student, teacher)),
        student,
    )
    for s, g in zip(student, ref_grads):
        torch.testing.assert_close(s.grad, g)
        assert s.grad.abs().sum() > 0
    assert all(t.grad is None for t in teacher)


def test_attention_single_pair_and_p(registry):
    s, t = randn(B, 5, 6, 6, seed=7), randn(B, 9, 6, 6, seed=8)
    out = call_loss(make(registry, "attention", p=3.0), student=s, teacher=t)
    ref = ((ref_attention_map(s, 3.0) - ref_attention_map(t, 3.0)) ** 2).mean()
    torch.testing.assert_close(out, ref)


def test_attention_paper_form(registry):
    student, teacher = feature_pairs(seed=10)
    out = call_loss(make(registry, "attention", form="paper"), student=student, teacher=teacher)
    ref = 0
    for s, t in zip(student, teacher):
        a_s, a_t = ref_attention_map(s), ref_attention_map(t)
        a_s = a_s / torch.sqrt((a_s ** 2).sum(1, keepdim=True))
        a_t = a_t / torch.sqrt((a_t ** 2).sum(1, keepdim=True))
        ref = ref + torch.sqrt(((a_s - a_t) ** 2).sum(dim=1)).mean()
    torch.testing.assert_close(out, ref)
    out.backward()
    assert student[0].grad.abs().sum() > 0 and teacher[0].grad is None


def test_attention_teacher_gradient_option(registry):
    s, t = randn(B, 4, 4, 4, seed=11), randn(B, 4, 4, 4, seed=12)
    loss = make(registry, "attention", detach_teacher=False)
    assert loss.detach == ()
    call_loss(loss, student=s, teacher=t).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def test_attention_spatial_mismatch(registry):
    s, t = randn(B, 4, 8, 8, seed=13), randn(B, 6, 4, 4, seed=14)
    loss = make(registry, "attention")
    with pytest.raises(ValueError, match="spatial sizes differ"):
        call_loss(loss, student=s, teacher=t)
    with pytest.raises(ValueError, match="pool_mismatch"):
        loss.setup({"student": s.shape, "teacher": t.shape})
    pooled = make(registry, "attention", pool_mismatch=True)
    pooled.setup({"student": [s.shape], "teacher": [t.shape]})
    out = call_loss(pooled, student=s, teacher=t)
    s_pooled = s.reshape(B, 4, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 average pooling, by hand
    ref = ((ref_attention_map(s_pooled) - ref_attention_map(t)) ** 2).mean()
    torch.testing.assert_close(out, ref)


def test_attention_pair_count_mismatch(registry):
    student, teacher = feature_pairs()
    with pytest.raises(ValueError, match="student features"):
        call_loss(make(registry, "attention"), student=student, teacher=teacher[:1])


# --- fitnet -------------------------------------------------------------------------------------

def ref_regressor(regressor, x):
    conv, bn = regressor[0], regressor[1]
    y = torch.einsum("oi,bihw->bohw", conv.weight[:, :, 0, 0], x)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # training-mode BN: biased variance
    y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return torch.relu(y) if len(regressor) == 3 else y


@pytest.mark.parametrize("relu", [False, True])
def test_fitnet_regressor_from_shapes_and_reference(registry, relu):
    student, teacher = feature_pairs(seed=20)
    loss = make(registry, "fitnet", relu=relu)
    with pytest.raises(RuntimeError, match="setup"):
        call_loss(loss, student=student, teacher=teacher)
    loss.setup({"student": [s.shape for s in student], "teacher": [t.shape for t in teacher]})
    loss.double()
    assert len(loss.regressors) == 2
    assert loss.regressors[0][0].weight.shape == (12, 8, 1, 1)
    assert loss.regressors[1][0].weight.shape == (32, 16, 1, 1)
    assert isinstance(loss.regressors[0][1], nn.BatchNorm2d)
    assert (len(loss.regressors[0]) == 3) == relu
    with torch.no_grad():  # non-trivial BN affine parameters
        for r in loss.regressors:
            r[1].weight.uniform_(0.5, 1.5)
            r[1].bias.uniform_(-0.5, 0.5)
    out = call_loss(loss, student=student, teacher=teacher)
    ref = sum(((ref_regressor(r, s) - t.detach()) ** 2).mean() for r, s, t in zip(loss.regressors, student, teacher))
    torch.testing.assert_close(out, ref)
    out.backward()
    for param in loss.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0
    for s in student:
        assert s.grad.abs().sum() > 0
    assert all(t.grad is None for t in teacher)
    assert {k.split(".")[0] for k in loss.state_dict()} == {"regressors"}  # saved with checkpoints


def test_fitnet_regressor_trains(registry):
    s = randn(16, 4, 4, 4, seed=21, grad=False)
    t = (torch.einsum("oi,bihw->bohw", torch.randn(6, 4, generator=gen(22), dtype=torch.float64), s)).detach()
    loss = make(registry, "fitnet")
    loss.setup({"student": s.shape, "teacher": t.shape})
    loss.double()
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        value = call_loss(loss, student=s, teacher=t)
        first = value.item() if first is None else first
        value.backward()
        optimizer.step()
    assert value.item() < 0.5 * first
    loss.setup({"student": s.shape, "teacher": t.shape})  # idempotent: keeps the trained regressor
    assert call_loss(loss, student=s, teacher=t).item() == pytest.approx(value.item(), rel=0.5)
    with pytest.raises(ValueError):
        loss.setup({"student": torch.Size([16, 5, 4, 4]), "teacher": t.shape})


def test_fitnet_shape_errors(registry):
    loss = make(registry, "fitnet")
    with pytest.raises(ValueError, match="spatial"):
        loss.setup({"student": torch.Size([2, 4, 8, 8]), "teacher": torch.Size([2, 4, 4, 4])})


# --- logit_l2 -----------------------------------------------------------------------------------

def test_logit_l2(registry):
    zs, zt = randn(B, C, seed=30), randn(B, C, seed=31)
    loss = make(registry, "logit_l2")
    assert loss.detach == ("teacher",)
    out = call_loss(loss, student=zs, teacher=zt)
    torch.testing.assert_close(out, ((zt.detach() - zs) ** 2).sum() / B)
    out.backward()
    torch.testing.assert_close(zs.grad, -2 * (zt.detach() - zs.detach()) / B)
    assert zt.grad is None  # the scratch teacher gets no gradient


# --- mutual learning ----------------------------------------------------------------------------

def nets(n=3, seed=40):
    return [randn(B, C, seed=seed + i, scale=2) for i in range(n)]


def ref_minlogit_target(zs, y):
    out = torch.empty(B, C, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            out[b, c] = min(float(z[b, c] - z[b, y[b]]) for z in zs)
    return out


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_minlogit(registry, T):
    zs, y = nets(), labels(seed=1)
    loss = make(registry, "minlogit", temperature=T)
    assert loss.inputs == ("logits", "labels") and loss.detach == ()
    target = ref_minlogit_target([z.detach() for z in zs], y)
    assert torch.all(target[torch.arange(B), y] == 0)
    p_e = ref_softmax(target / T)
    terms = loss.per_network(zs, y)
    assert len(terms) == 3
    for term, z in zip(terms, zs):
        torch.testing.assert_close(term, ref_kl(p_e, z, T))
    out = loss(logits=zs, labels=y)
    torch.testing.assert_close(out, sum(ref_kl(p_e, z, T) for z in zs))
    out.backward()
    for z in zs:  # the ensemble target is detached: each network's gradient comes from its own term only
        torch.testing.assert_close(z.grad, T * (ref_softmax(z.detach() / T) - p_e) / B)
        assert z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels"):
        loss(logits=zs, labels=None)
    with pytest.raises(ValueError, match="at least 2"):
        loss(logits=zs[:1], labels=y)


def test_dml(registry):
    zs = nets(seed=50)
    T = 2.0
    loss = make(registry, "dml", temperature=T)
    n = len(zs)
    ps = [ref_softmax(z.detach() / T) for z in zs]
    expected_terms = [sum(ref_kl(ps[j], zs[i], T) for j in range(n) if j != i) / (n - 1) for i in range(n)]
    for term, ref in zip(loss.per_network(zs), expected_terms):
        torch.testing.assert_close(term, ref)
    out = loss(logits=zs, labels=labels())
    torch.testing.assert_close(out, sum(expected_terms))
    out.backward()
    for i, z in enumerate(zs):
        expected = sum(T * (ref_softmax(z.detach() / T) - ps[j]) / B for j in range(n) if j != i) / (n - 1)
        torch.testing.assert_close(z.grad, expected)
    assert make(registry, "dml").options.temperature == 1.0  # plain softmax, as in the paper


def test_ensemble_kd(registry):
    zs = nets(seed=60)
    T = 4.0
    loss = make(registry, "ensemble_kd", temperature=T)
    target = ref_softmax(sum(z.detach() for z in zs) / len(zs) / T)
    out = loss(logits=zs, labels=None)
    torch.testing.assert_close(out, sum(ref_kl(target, z, T) for z in zs))
    out.backward()
    for z in zs:
        torch.testing.assert_close(z.grad, T * (ref_softmax(z.detach() / T) - target) / B)


@pytest.mark.parametrize("name", ["minlogit", "dml", "ensemble_kd"])
def test_each_network_term_trains_only_that_network(registry, name):
    # Summed over networks, the gradient through a non-detached averaged target can cancel exactly
    # (ensemble_kd); term by term it cannot: network 0's term must not reach the other networks.
    zs, y = nets(seed=70), labels(seed=2)
    terms = make(registry, name, temperature=2.0).per_network(zs, y)
    grads = torch.autograd.grad(terms[0], zs, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert g is None or torch.all(g == 0)
