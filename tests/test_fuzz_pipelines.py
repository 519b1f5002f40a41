"""Fuzz: a few hundred pipelines mutated from ``examples/`` so that each is certainly malformed
(wrong types, unknown keys, missing names, bad values, odd strings, deep nesting, bad references,
bad overrides, undecodable bytes). Every one must give exit 2, only ``error: <where>: ...`` lines
naming the key path or the file, no traceback, and nothing written.

Cases run in-process through click's CliRunner (``validate``; every fifth also through ``run`` with
the data step replaced by a marker, so a case that ``run`` would start training on is caught).
"""

from __future__ import annotations

import copy
import os
import random
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdtoolkit.cli import main
from kdtoolkit.config.toml_write import dumps

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = [
    "examples/quickstart.toml",
    "examples/quickstart_kd.toml",
    "examples/quickstart_qat.toml",
    "examples/baselines/cifar10_wrn16_1_at.toml",
    "examples/baselines/cifar100_minlogit_mutual.toml",
    "examples/ctkd/cifar10_ctkd.toml",
]
SEED = 20261130
PER_OPERATOR = 5  # random picks per example and operator (plus the fixed cases)
REACHED = "__fuzz_reached_build__"


# --- walking a document -----------------------------------------------------------------------------


def _join(path, key):
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def nodes(doc, path=""):
    """(path, container, key, value) of every value in ``doc``."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc)
    for k, v in items:
        p = _join(path, k)
        yield p, doc, k, v
        if isinstance(v, (dict, list)):
            yield from nodes(v, p)


def tables(doc):
    return [(p, v) for p, _, _, v in nodes(doc) if isinstance(v, dict) and not p.endswith("inputs")]


COMPONENT_PATH = re.compile(r"^(data|method|models\.[^.]+|losses\[\d+\])$|\.(quantizer|schedule|fusion)$")


def components(doc):
    return [(p, v) for p, v in tables(doc) if "name" in v and COMPONENT_PATH.search(p)]


def top(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0]


# --- the mutations: each returns (case id, doc or raw bytes, overrides, expected text in an error) ---


def wrong_types(name, doc, rng):
    leaves = [(p, c, k, v) for p, c, k, v in nodes(doc) if not isinstance(v, (dict, list)) and not p.endswith(("inputs", "params"))]
    leaves = [leaf for leaf in leaves if "inputs." not in leaf[0]]
    for p, c, k, v in rng.sample(leaves, min(PER_OPERATOR, len(leaves))):
        bad = 12345 if isinstance(v, str) else "text" if not isinstance(v, dict) else 5
        d = copy.deepcopy(doc)
        _set(d, p, bad)
        yield f"{name}:type:{p}", d, [], p


def unknown_keys(name, doc, rng):
    for p, _ in rng.sample(tables(doc), min(PER_OPERATOR, len(tables(doc)))):
        if p == "models":
            continue
        d = copy.deepcopy(doc)
        _get(d, p)["zz_unknown"] = 1
        yield f"{name}:unknown:{p}", d, [], _join(p, "zz_unknown")


def missing_names(name, doc, rng):
    for p, _ in components(doc):
        d = copy.deepcopy(doc)
        del _get(d, p)["name"]
        yield f"{name}:noname:{p}", d, [], _join(p, "name")


BAD_VALUES = [
    ("run.epochs", 0), ("run.epochs", -3), ("data.batch_size", 0), ("optimizer.lr", -0.1), ("run.seed", 10**30),
    ("run.seed", -1), ("optimizer.betas", [-0.1, 2.0]), ("optimizer.momentum", -1.0), ("run.eval_every", 0),
    ("run.precision", "fp8"), ("run.device", "tpu"), ("data.num_workers", -1), ("schema_version", 99), ("plugins", 5),
    ("plugins.blocked", "x"), ("optimizer.weight_decay", -1.0), ("run.max_steps_per_epoch", 0),
    ("optimizer.param_groups", [{"params": ["models.*"], "lr_scale": -1.0}]),
    ("optimizer.param_groups", [{"params": ["models.*"], "weight_decay": -1.0}]),
    ("optimizer.schedule", {"name": "multistep", "milestones": [-2, 1]}),
    ("run.metrics_format", "xml"), ("run.on_nonfinite", "ignore"),
]
ODD_STRINGS = [
    ("run.name", "a\u0000b"), ("run.name", "x" * 300), ("run.name", ""), ("run.output_dir", "runs/{nam}"),
    ("run.output_dir", "runs/{0}"), ("run.output_dir", "runs/{"), ("run.output_dir", ""), ("data.name", ""),
    ("data.name", "cifar\u000010"), ("method.name", ""), ("optimizer.name", "sgd\n"),
]


def bad_values(name, doc, rng):
    for p, v in BAD_VALUES + ODD_STRINGS:
        d = copy.deepcopy(doc)
        _set(d, p, v)
        yield f"{name}:value:{p}={str(v)[:20]!r}", d, [], top(p) if p != "schema_version" else "schema_version"


def deep(name, doc, rng):
    nested = 1
    for _ in range(100):
        nested = {"a": nested}
    d = copy.deepcopy(doc)
    d.setdefault("run", {})["deep"] = nested
    yield f"{name}:deep-table", d, [], "nested"
    yield f"{name}:deep-set", doc, ["run.x=" + "[" * 100 + "]" * 100], "nested"


def bad_references(name, doc, rng):
    models = list(doc.get("models", {}))
    refs = ["student:", "labels:block1", "nosuchmodel", f"{models[0]}:no.such.module", f"{models[0]}:", ":stages"]
    for ref in refs:
        d = copy.deepcopy(doc)
        losses = d.setdefault("losses", [{"name": "ce"}])
        term = next((t for t in losses if t.get("name") in ("kd", "attention", "fitnet")), None)
        if term is None:
            losses.append({"name": "kd", "inputs": {"student": ref, "teacher": models[0]}})
            where = f"losses[{len(losses) - 1}]"
        else:
            key = "student" if "student" in term.get("inputs", {}) or term["name"] != "kd" else "student"
            term.setdefault("inputs", {})[key] = ref
            where = f"losses[{losses.index(term)}]"
        yield f"{name}:ref:{ref}", d, [], where
    d = copy.deepcopy(doc)
    d["models"] = {("" if i == 0 else k): v for i, (k, v) in enumerate(d["models"].items())}
    yield f"{name}:ref:empty-model-name", d, [], "models"


BAD_OVERRIDES = [
    ("=5", "--set"), (".=5", "--set"), ("run.epochs=[1", "run.epochs"), ('run.name="abc', "run.name"),
    ("run.epochs.x=1", "run.epochs"), ("losses[99].weight=1", "losses[99]"), ("run.epochs=two", "run.epochs"),
    ("novalue", "--set"), ("run.epochs==3", "run.epochs"),
]


def bad_overrides(name, doc, rng):
    for item, where in BAD_OVERRIDES:
        yield f"{name}:set:{item}", doc, [item], where


def quantizer_overrides(name, doc, rng):
    for mname, model in doc.get("models", {}).items():
        q = model.get("quantizer")
        if not isinstance(q, dict):
            continue
        for bits in (-1, 0, 9, 33):
            d = copy.deepcopy(doc)
            d["models"][mname]["quantizer"]["overrides"] = [{"pattern": "*", "weight_bits": bits}]
            yield f"{name}:qbits:{bits}", d, [], f"models.{mname}.quantizer.overrides[0].weight_bits"
        d = copy.deepcopy(doc)
        d["models"][mname]["quantizer"]["overrides"] = [{"pattern": "nomatch.*", "weight_bits": 4}]
        yield f"{name}:qpattern-nomatch", d, [], f"models.{mname}.quantizer.overrides"


def undecodable(name, doc, rng):
    text = dumps(doc).encode()
    yield f"{name}:utf8", b"# \xff\xfe comment\n" + text, [], "UTF-8"


OPERATORS = [wrong_types, unknown_keys, missing_names, bad_values, deep, bad_references, bad_overrides, quantizer_overrides, undecodable]


def _get(doc, path):
    node = doc
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    return node


def _set(doc, path, value):
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node = doc
    for part in parts[:-1]:
        if part.startswith("["):
            node = node[int(part[1:-1])]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = value
    else:
        node[last] = value


def cases():
    rng = random.Random(SEED)
    out = []
    for example in EXAMPLES:
        doc = tomllib.loads((REPO / example).read_text())
        name = Path(example).stem
        for op in OPERATORS:
            out.extend(op(name, doc, rng))
    return out


CASES = cases()

#: known failures (case id -> why); each still runs and must fail. None left.
KNOWN: dict[str, str] = {}


def test_enough_cases():
    assert len(CASES) >= 300, len(CASES)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "work").mkdir()
    (root / "files").mkdir()
    return root


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_malformed_pipeline(index, sandbox, monkeypatch):
    case_id, doc, overrides, expect = CASES[index]
    if case_id in KNOWN:
        pytest.xfail(KNOWN[case_id])
    from kdtoolkit.errors import ConfigError
    from kdtoolkit.pipeline import Pipeline

    def reached(self, device=None):
        # what the real build checks before it writes anything, without reading data: the models
        # (feature paths, check_models); every other check runs before build is called
        self.validate()
        raise ConfigError(REACHED)

    monkeypatch.setattr(Pipeline, "build", reached)
    monkeypatch.chdir(sandbox / "work")
    path = sandbox / "files" / f"case{index}.toml"
    path.write_bytes(doc if isinstance(doc, bytes) else dumps(doc).encode())
    if isinstance(expect, str) and expect == "UTF-8":
        expect = "UTF-8"
    commands = [["validate"], ["run"]] if index % 5 == 0 else [["validate"]]
    for command in commands:
        args = [*command, str(path)]
        for item in overrides:
            args += ["--set", item]
        r = CliRunner().invoke(main, args)
        out = r.output
        assert REACHED not in out, f"{case_id}: `run` accepted it and went on to build"
        assert r.exit_code == 2, f"{case_id}: exit {r.exit_code}\n{out}"
        assert "Traceback" not in out, out
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines and all(re.match(r"error: \S[^:]*: ", line) or line.startswith(f"error: {path}") for line in lines), out
        assert expect in out or str(path) in out, f"{case_id}: expected {expect!r} in\n{out}"
    assert not os.listdir(sandbox / "work"), os.listdir(sandbox / "work")
