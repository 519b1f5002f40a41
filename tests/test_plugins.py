"""Plugin discovery and registration: fresh managers, duplicates, misspelled hooks, broken plugins."""

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


def test_broken_plugin_is_named_and_can_be_blocked(fake_distribution, monkeypatch):
    fake_distribution.install("kdtoolkit-broken", version="0.0.1", entry_points={"broken": "broken_plugin"},
                              files={"broken_plugin.py": "import no_module_named_foo\n"})
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


# --- option names that collide with the generic keys of their table (issue 9) -------------------


@attrs.frozen
class WeightedOpts:
    weight: float = 2.0
    scale: float = 1.0


class Colliding:
    __name__ = "collide"

    @kdtoolkit.hookimpl
    def register_losses(self, register):
        register("collide", lambda o: None, options=WeightedOpts)


def test_option_named_like_a_generic_key_is_a_registration_error():
    with pytest.raises(PluginError) as err:
        load_registry(load_entrypoints=False, plugins=[Colliding()])
    msg = str(err.value)
    assert "plugin 'collide'" in msg and "'weight'" in msg and "scale" not in msg.split("(generic")[0]


def test_generic_keys_come_from_the_schema_for_every_kind():
    from kdtoolkit.config.schema import KIND_CONFIGS, generic_keys

    for kind, cls in KIND_CONFIGS.items():
        for key in generic_keys(cls):
            opts = attrs.make_class("Opts", {key: attrs.field(default=None)}, frozen=True)

            class P:
                __name__ = f"p_{kind}_{key}"

            def hook(register, _kind=kind, _opts=opts):
                register("x", lambda *a, **k: None, options=_opts)

            hook = kdtoolkit.hookimpl(hook)
            setattr(P, HOOKS[kind], staticmethod(hook))
            with pytest.raises(PluginError, match=f"'{key}'"):
                load_registry(load_entrypoints=False, plugins=[P()])
    assert {"weight", "label", "inputs", "schedule"} <= set(generic_keys(KIND_CONFIGS["loss"]))
    assert {"role", "checkpoint"} <= set(generic_keys(KIND_CONFIGS["model"]))
    assert {"root", "batch_size"} <= set(generic_keys(KIND_CONFIGS["dataset"]))


COLLIDE_SRC = '''
import attrs, kdtoolkit

@attrs.frozen
class Opts:
    weight: float = 2.0

@kdtoolkit.hookimpl
def register_losses(register):
    register("collide", lambda options: None, options=Opts)
'''


def test_colliding_plugin_fails_validate_with_exit_2(fake_distribution, tmp_path):
    from click.testing import CliRunner

    from kdtoolkit.cli import main

    fake_distribution.install("kdtoolkit-collide", entry_points={"collide": "collide_plugin"},
                              files={"collide_plugin.py": COLLIDE_SRC})
    path = tmp_path / "p.toml"
    path.write_text('[data]\nname = "cifar10"\n[models.student]\nname = "wrn"\n[[losses]]\nname = "collide"\nweight = 3.0\n')
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "plugin 'collide'" in result.output and "'weight'" in result.output
    assert "Traceback" not in result.output


# --- entry-point names published by two distributions (issue 9) --------------------------------


SHADOW_SRC = '''
import kdtoolkit

@kdtoolkit.hookimpl
def register_schedules(register):
    register("shadow", lambda options: (lambda epoch, total: 1.0))
'''


@pytest.mark.parametrize("order", ["first", "last"])
def test_entry_point_clash_names_both_distributions(fake_distribution, monkeypatch, order):
    import sys

    site = fake_distribution.install("kdtoolkit-shadow", version="9.9", entry_points={"losses": "shadow_losses"},
                                     files={"shadow_losses.py": SHADOW_SRC})
    if order == "last":
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(site)] + [str(site)])
    with pytest.raises(PluginError) as err:
        load_registry()
    msg = str(err.value)
    assert "'losses'" in msg and "kdtoolkit-shadow 9.9" in msg and "kdtoolkit 0.1.0" in msg


def test_same_distribution_twice_on_sys_path_is_not_a_clash(fake_distribution, monkeypatch, tmp_path):
    import sys

    from kdtoolkit.testing import FakeDistributions

    fake_distribution.install("kdtoolkit-shadow", entry_points={"shadow": "shadow_mod"}, files={"shadow_mod.py": SHADOW_SRC})
    FakeDistributions(tmp_path / "second", monkeypatch).install(
        "kdtoolkit-shadow", entry_points={"shadow": "shadow_mod"}, files={"shadow_mod.py": SHADOW_SRC})
    assert "shadow" in load_registry().names("schedule")
