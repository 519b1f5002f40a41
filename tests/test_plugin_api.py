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
