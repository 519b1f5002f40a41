"""The ``register_commands`` hook: plugins add CLI commands (CMT-KD's ``plot-fusion`` among them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import click
import pytest
from click.testing import CliRunner

import kdtoolkit
from kdtoolkit.cli import main
from kdtoolkit.commands import plugin_commands
from kdtoolkit.errors import PluginError
from kdtoolkit.plugins import get_plugin_manager

HELLO = textwrap.dedent('''
    import click
    import kdtoolkit
    from kdtoolkit.errors import ConfigError

    @kdtoolkit.hookimpl
    def register_commands(cli):
        @cli.command()
        @click.option("--name", default="world")
        @click.option("--fail", is_flag=True)
        def hello(name, fail):
            """Say hello."""
            if fail:
                raise ConfigError(problems=[("hello.name", f"cannot greet {name!r}")])
            click.echo(f"hello {name}")
''')


def fake_distribution(root, module: str, source: str) -> None:
    """An installed distribution ``module`` with one ``kdtoolkit`` entry point, under ``root``."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kdtoolkit]\n{module} = {module}\n")


def cli(tmp_path, *args, env=None):
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), **(env or {}))
    code = "import sys; from kdtoolkit.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=300)


def test_an_installed_plugin_adds_a_command_that_runs_inside_the_error_boundary(tmp_path):
    fake_distribution(tmp_path, "hello_plugin", HELLO)
    r = cli(tmp_path, "hello", "--name", "plugins")
    assert r.returncode == 0 and r.stdout == "hello plugins\n", r.stderr
    r = cli(tmp_path, "hello", "--fail")
    assert r.returncode == 2 and r.stderr.strip() == "error: hello.name: cannot greet 'world'", r.stderr
    r = cli(tmp_path, "--help")
    assert r.returncode == 0 and "hello" in r.stdout and "plot-fusion" in r.stdout and "validate" in r.stdout
    r = cli(tmp_path, "plot-fusion", "--help", env={"KDTOOLKIT_BLOCK_PLUGINS": "cmtkd"})
    assert r.returncode == 2 and "No such command 'plot-fusion'" in r.stderr


class Clash:
    def __init__(self, name):
        self.name = name

    @kdtoolkit.hookimpl
    def register_commands(self, cli):
        cli.add_command(click.Command(self.name, callback=lambda: None))


def test_command_names_clashing_with_a_builtin_or_another_plugin_name_both():
    pm = get_plugin_manager(load_entrypoints=False, plugins=[Clash("hello")])
    assert list(plugin_commands(pm, reserved=main.commands)) == ["hello"]
    with pytest.raises(PluginError, match="plugin 'Clash' adds the command 'run', which the kdtoolkit command line already provides"):
        plugin_commands(get_plugin_manager(load_entrypoints=False, plugins=[Clash("run")]), reserved=main.commands)
    two = Clash("hello")
    pm = get_plugin_manager(load_entrypoints=False, plugins=[Clash("hello")])
    pm.register(two, name="second")
    with pytest.raises(PluginError, match="plugin '(Clash|second)' adds the command 'hello', which plugin '(Clash|second)' already provides"):
        plugin_commands(pm)


def test_plot_fusion_through_the_cli_reads_jsonl_and_csv(tmp_path):
    rows = [{"epoch": e, "fusion/stage0/t4": 0.2 + 0.01 * e, "fusion/stage0/t8": 0.8 - 0.01 * e} for e in (1, 2)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.csv").write_text("epoch,fusion/stage0/t4,fusion/stage0/t8\n1,0.3,0.7\n2,0.4,0.6\n")
    for run in ("a", "b"):
        out = tmp_path / f"{run}.png"
        r = CliRunner().invoke(main, ["plot-fusion", str(tmp_path / run), "--out", str(out)])
        assert r.exit_code == 0 and r.output == f"wrote {out}\n", r.output
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text('{"epoch": 1, "train/loss/total": 1.0}\n')
    r = CliRunner().invoke(main, ["plot-fusion", str(tmp_path / "c"), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and r.output.startswith("error: no importance weights") and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["plot-fusion", str(tmp_path / "none"), "--out", str(tmp_path / "n.png")])
    assert r.exit_code == 2 and "no metrics.jsonl or metrics.csv" in r.output


def test_the_core_keeps_no_cmtkd_knowledge():
    from pathlib import Path

    core = Path(kdtoolkit.__file__).parent
    assert "plot-fusion" not in main.commands  # a plugin command, not a built-in one
    assert not (core / "staging.py").exists() and not (core / "plotting.py").exists()
    sources = {str(p.relative_to(core)): p.read_text() for p in core.rglob("*.py")}
    assert [name for name, text in sources.items() if "method.stages" in text or "fusion/" in text] == []
