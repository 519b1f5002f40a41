"""kdtoolkit.config.toml_write against tomllib: random documents of every TOML type written and read back."""

from __future__ import annotations

import math
import random
import string
import tomllib

import pytest

from kdtoolkit.config.load import apply_overrides
from kdtoolkit.config.toml_write import dumps, key, value


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randint(-10**6, 10**6)])
    if kind == "float":
        return rng.choice([0.1, -2.5e-300, 1e300, 3.0, math.inf, -math.inf, rng.uniform(-1e3, 1e3)])
    if kind == "str":
        alphabet = string.printable + "é\u2028\u00a0\"'\\\x00\x7f"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return random_doc(rng, depth + 1)


def random_doc(rng: random.Random, depth: int = 0) -> dict:
    keys = ["a", "b-c", "d_e", "1", "x.y", "with space", "ü", "", "\"q\""]
    return {rng.choice(keys) + str(i): random_value(rng, depth) for i in range(rng.randint(0, 5))}


@pytest.mark.parametrize("seed", range(200))
def test_random_documents_round_trip_through_tomllib(seed):
    doc = random_doc(random.Random(seed))
    assert tomllib.loads(dumps(doc)) == doc


def test_nan_and_special_keys():
    back = tomllib.loads(dumps({"x": math.nan, "a.b": 1, "": 2}))
    assert math.isnan(back["x"]) and back["a.b"] == 1 and back[""] == 2
    assert key("plain_key-1") == "plain_key-1" and key("a.b") == '"a.b"'
    with pytest.raises(TypeError, match="no TOML form"):
        value(None)


def test_a_value_is_what_set_reads_back():
    raw = {"optimizer": {"lr": 0.1}}
    new = {"name": "cosine", "warmup": [1, 2.5], "note": "a \"b\""}
    assert apply_overrides(raw, [f"optimizer.schedule={value(new)}"])["optimizer"]["schedule"] == new
