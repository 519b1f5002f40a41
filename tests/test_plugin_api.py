"""kdtoolkit.api is the plugin API: first-party plugins import nothing else of kdtoolkit, and every
name it publishes resolves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kdtoolkit.api as api

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
ALLOWED = {"kdtoolkit", "kdtoolkit.api"}


def _kdtoolkit_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names if node.module == "kdtoolkit"]
        else:
            continue
        out += [(node.lineno, n) for n in names if n == "kdtoolkit" or n.startswith("kdtoolkit.")]
    return out


def test_plugins_import_only_kdtoolkit_and_its_api():
    files = sorted(PLUGINS.rglob("*.py"))
    assert len(files) > 10
    bad = [f"{f.relative_to(PLUGINS.parent)}:{line}: {name}" for f in files for line, name in _kdtoolkit_imports(f)
           if name not in ALLOWED and name != "kdtoolkit.hookimpl" and name != "kdtoolkit.__version__"]
    assert not bad, "plugins must import kdtoolkit / kdtoolkit.api only:\n" + "\n".join(bad)


def test_the_check_sees_a_forbidden_import(tmp_path):
    path = tmp_path / "p.py"
    path.write_text("import kdtoolkit\nfrom kdtoolkit.api import Loss\nfrom kdtoolkit.config.load import x\nimport kdtoolkit.engine\n"
                    "from kdtoolkit import features\n")
    names = [n for _, n in _kdtoolkit_imports(path)]
    assert [n for n in names if n not in ALLOWED] == ["kdtoolkit.config.load", "kdtoolkit.engine", "kdtoolkit.features"]


@pytest.mark.parametrize("name", api.__all__)
def test_every_published_name_resolves(name):
    assert getattr(api, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        api.no_such_thing  # noqa: B018


# --- nested component options: component(kind) ---------------------------------------------------

import attrs  # noqa: E402

import kdtoolkit  # noqa: E402
from kdtoolkit import Pipeline  # noqa: E402
from kdtoolkit.errors import ConfigError  # noqa: E402
from kdtoolkit.testing import TestingPlugin, tiny_pipeline  # noqa: E402


@attrs.frozen
class PeerOptions:
    peer: api.ModelConfig = api.component("model")
    extra: api.LossConfig | None = api.component("loss", default=None)
    rate: float = attrs.field(default=1.0, validator=api.positive)


class PeerMethod(api.LossTermsMethod):
    pass


class PeerPlugin:
    __name__ = "peer_plugin"

    @kdtoolkit.hookimpl
    def register_methods(self, register):
        register("with_peer", PeerMethod, options=PeerOptions, description="test: a method with a peer network")


def _raw(method):
    return tiny_pipeline(method=method)


def test_nested_component_becomes_a_full_config():
    pipe = Pipeline(_raw({"name": "with_peer", "peer": {"name": "tiny_cnn", "width": 12, "role": "teacher"},
                          "extra": {"name": "kd", "temperature": 2.0}}),
                    plugins=[TestingPlugin(), PeerPlugin()], load_entrypoints=True)
    opts = pipe.config.method.options
    assert isinstance(opts.peer, api.ModelConfig) and opts.peer.name == "tiny_cnn" and opts.peer.role == "teacher"
    assert opts.peer.options.width == 12 and opts.extra.options.temperature == 2.0
    assert pipe.raw["method"]["peer"] == {"name": "tiny_cnn", "role": "teacher", "frozen": False, "evaluate": True, "width": 12}
    # Python construction with the config objects themselves gives the same pipeline
    from kdtoolkit.config import MethodConfig, PipelineConfig

    peer = api.ModelConfig(name="tiny_cnn", role="teacher", options={"width": 12})
    cfg = attrs.evolve(pipe.config, method=MethodConfig(name="with_peer", options=PeerOptions(
        peer=peer, extra=api.LossConfig(name="kd", options={"temperature": 2.0}))))
    assert Pipeline(cfg, plugins=[TestingPlugin(), PeerPlugin()]).config == pipe.config


def test_nested_component_errors_have_key_paths_all_at_once():
    raw = _raw({"name": "with_peer", "peer": {"name": "tiny_cnm", "widht": 3}, "extra": {"name": "kd", "temprature": 2.0},
                "rate": 0})
    raw["run"]["epochs"] = "two"
    with pytest.raises(ConfigError) as err:
        Pipeline(raw, plugins=[TestingPlugin(), PeerPlugin()])
    found = dict(err.value.problems)
    assert "unknown model 'tiny_cnm' (did you mean 'tiny_cnn'?)" in found["method.peer.name"]
    assert found["method.extra.temprature"] == "unknown key (did you mean 'temperature'?)"
    assert found["method.rate"] == "must be > 0, got 0.0"
    assert "run.epochs" in found
    raw["method"]["peer"] = {"name": "tiny_cnn", "widht": 3}
    with pytest.raises(ConfigError) as err:
        Pipeline(raw, plugins=[TestingPlugin(), PeerPlugin()])
    assert dict(err.value.problems)["method.peer.widht"] == "unknown key (did you mean 'width'?)"
    raw["method"].pop("peer")
    with pytest.raises(ConfigError) as err:
        Pipeline(raw, plugins=[TestingPlugin(), PeerPlugin()])
    assert dict(err.value.problems)["method.peer"] == "required key missing"


def test_component_kind_is_checked():
    with pytest.raises(ValueError, match="component kind"):
        api.component("network")
