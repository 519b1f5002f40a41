"""Plugin discovery and registration: fresh managers, duplicates, misspelled hooks, broken plugins."""

import importlib.metadata

import attrs
import pytest

import kdtoolkit
from kdtoolkit.errors import PluginError
from kdtoolkit.plugins import KINDS, HOOKS, collect, get_plugin_manager, load_registry
from kdtoolkit import hookspecs


@attrs.frozen
class Opts:
    scale: float = 1.0


class LossPlugin:
    @kdtoolkit.hookimpl
    def register_losses(self, register):
        register("my_loss", lambda o: None, options=Opts, description="test", inputs=("logits",))


def test_every_kind_has_a_documented_hook():
    for kind in KINDS:
        spec = getattr(hookspecs, HOOKS[kind])
        assert spec.__doc__ and "Factory" in spec.__doc__, kind


def test_fresh_manager_per_call():
    a = get_plugin_manager(load_entrypoints=False, plugins=[LossPlugin()])
    b = get_plugin_manager(load_entrypoints=False)
    assert collect(a).names("loss") == ["my_loss"]
    assert collect(b).names("loss") == []


def test_registry_records_plugin_and_options():
    reg = load_registry(load_entrypoints=False, plugins=[LossPlugin()])
    comp = reg.get("loss", "my_loss")
    assert comp.plugin == "LossPlugin" and comp.options is Opts
    assert comp.make_options(scale=2.0) == Opts(2.0)


def test_duplicate_names_name_both_plugins():
    class Other:
        @kdtoolkit.hookimpl
        def register_losses(self, register):
            register("my_loss", lambda o: None, inputs=("logits",))

    with pytest.raises(PluginError) as err:
        load_registry(load_entrypoints=False, plugins=[LossPlugin(), Other()])
    assert "LossPlugin" in str(err.value) and "Other" in str(err.value) and "my_loss" in str(err.value)


def test_misspelled_hook_is_an_error():
    class Typo:
        @kdtoolkit.hookimpl
        def register_loss(self, register):  # missing the final "es"
            pass

    with pytest.raises(PluginError, match="register_loss"):
        get_plugin_manager(load_entrypoints=False, plugins=[Typo()])


def test_options_must_be_attrs():
    class Bad:
        @kdtoolkit.hookimpl
        def register_losses(self, register):
            register("x", lambda o: None, options=dict, inputs=("logits",))

    with pytest.raises(PluginError, match="attrs"):
        load_registry(load_entrypoints=False, plugins=[Bad()])


class _FakeEP:
    def __init__(self, name, exc):
        self.name, self.group, self.exc = name, "kdtoolkit", exc

    def load(self):
        raise self.exc


class _FakeDist:
    def __init__(self, eps):
        self.entry_points = eps
        self.metadata = {"name": "kdtoolkit-broken"}
        self.version = "0.0.1"


def test_broken_plugin_is_named_and_can_be_blocked(monkeypatch):
    real = importlib.metadata.distributions

    def fake():
        return [*real(), _FakeDist([_FakeEP("broken", ImportError("no module named foo"))])]

    monkeypatch.setattr(importlib.metadata, "distributions", fake)
    with pytest.raises(PluginError) as err:
        get_plugin_manager()
    assert "'broken'" in str(err.value) and "kdtoolkit-broken" in str(err.value) and "KDTOOLKIT_BLOCK_PLUGINS" in str(err.value)
    # blocked by argument (the pipeline's [plugins] blocked) and by environment variable
    assert get_plugin_manager(blocked=["broken"]).get_plugin("broken") is None
    monkeypatch.setenv("KDTOOLKIT_BLOCK_PLUGINS", "broken, other")
    pm = get_plugin_manager()
    assert pm.is_blocked("broken")


def test_first_party_plugins_come_through_entry_points():
    pm = get_plugin_manager()
    names = dict(pm.list_name_plugin())
    for expected in ("models", "datasets", "methods", "schedules", "losses", "fusions", "hwgq", "lsq"):
        assert expected in names
    reg = collect(pm)
    assert {"wrn", "resnet18_cifar", "alexnet_bn", "torchvision"} <= set(reg.names("model"))
    assert {"cifar10", "cifar100", "svhn", "imagefolder"} <= set(reg.names("dataset"))
    assert {"ce", "kd", "attention", "fitnet", "logit_l2", "minlogit"} <= set(reg.names("loss"))
    assert {"hwgq", "lsq"} <= set(reg.names("quantizer"))
    assert {"supervised", "kd"} <= set(reg.names("method"))
