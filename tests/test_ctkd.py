"""CTKD (Zhao et al., "Highlight Every Step"): checks, default terms, gradients, the loss against its
formula, the shared first conv, an end-to-end run with SIGKILL + resume, and the example pipelines."""

from __future__ import annotations

import importlib.metadata
import json
import signal
import textwrap
import tomllib
from pathlib import Path

import pytest

from conftest import run_pipeline_process
import torch
from torch import nn

import kdtoolkit_plugins.methods.ctkd as ctkd_module
from kdtoolkit import Pipeline
from kdtoolkit.engine.checks import effective_losses
from kdtoolkit.engine.optim import build_optimizer
from kdtoolkit.engine.checkpoint import Checkpoint, save_checkpoint
from kdtoolkit.errors import ConfigError
from kdtoolkit.losses import Ref
from kdtoolkit.methods import Progress
from kdtoolkit_plugins.models.wrn import WideResNet

REPO = Path(__file__).resolve().parents[1]


def ctkd_plugins() -> list:
    """The ctkd plugin module, unless its entry point is installed (then it is already loaded and
    passing it again would be a duplicate registration)."""
    if importlib.metadata.entry_points(group="kdtoolkit", name="ctkd"):
        return []
    return [ctkd_module]


def ctkd_toml(root: Path, run_dir: Path, expert: Path, *, epochs: int = 1, method: str = "", losses: str = "", extra: str = "") -> str:
    """A tiny CTKD pipeline: WRN-10-1 student, scratch teacher and expert on 512 CIFAR-10 images."""
    return textwrap.dedent(f"""
        schema_version = 1
        [run]
        name = "ctkd"
        seed = 5
        epochs = {epochs}
        output_dir = "{run_dir.as_posix()}"
        progress = "off"
        [data]
        name = "cifar10"
        root = "{root.as_posix()}"
        batch_size = 64
        eval_batch_size = 128
        train_size = 512
        test_size = 256
        [models.student]
        name = "wrn"
        depth = 10
        width = 1
        [models.scratch]
        name = "wrn"
        depth = 10
        width = 2
        role = "teacher"
        [models.expert]
        name = "wrn"
        depth = 10
        width = 1
        role = "teacher"
        frozen = true
        checkpoint = "{expert.as_posix()}"
        [method]
        name = "ctkd"
    """) + textwrap.dedent(method) + textwrap.dedent(losses) + textwrap.dedent(extra)


def make_pipe(text: str) -> Pipeline:
    return Pipeline.from_dict(tomllib.loads(text), plugins=ctkd_plugins())


def problems(fn) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        fn()
    return dict(err.value.problems)


@pytest.fixture(scope="module")
def fake_expert(tmp_path_factory) -> Path:
    """An untrained WRN-10-1 saved as a run's best checkpoint (for tests that need no trained expert)."""
    run = tmp_path_factory.mktemp("fake_expert")
    torch.manual_seed(11)
    module = nn.ModuleDict({"models": nn.ModuleDict({"expert": WideResNet(10, 1, 10)})})
    save_checkpoint(run / "checkpoints" / "best.safetensors", module, meta={"epoch": 0, "student": "expert"}, include_rng=False)
    return run


def batch(pipe: Pipeline):
    built = pipe.build()
    images, labels = next(iter(built.data[1]))
    return built, images, labels


PROGRESS = Progress(epoch=0, step=0, steps_per_epoch=8, total_epochs=1)


# --- checks --------------------------------------------------------------------------------------


def test_check_reports_missing_and_ambiguous_networks(cifar10_root, tmp_path, fake_expert):
    text = ctkd_toml(cifar10_root, tmp_path / "r", fake_expert)
    no_expert = tomllib.loads(text)
    del no_expert["models"]["expert"]
    found = problems(lambda: Pipeline.from_dict(no_expert, plugins=ctkd_plugins()))
    assert "expert teacher" in found["models"]

    two_scratch = tomllib.loads(text)
    two_scratch["models"]["scratch2"] = dict(two_scratch["models"]["scratch"])
    found = problems(lambda: Pipeline.from_dict(two_scratch, plugins=ctkd_plugins()))
    assert "scratch, scratch2" in found["method.scratch"] and 'scratch = "NAME"' in found["method.scratch"]
    two_scratch["method"]["scratch"] = "scratch2"  # named: no longer ambiguous, but the other is unused
    found = problems(lambda: Pipeline.from_dict(two_scratch, plugins=ctkd_plugins()))
    assert list(found) == ["models.scratch"] and "not used" in found["models.scratch"]
    two_scratch["models"]["scratch"]["frozen"] = True  # now a second frozen teacher: the expert is ambiguous
    two_scratch["models"]["scratch"]["checkpoint"] = str(fake_expert)
    found = problems(lambda: Pipeline.from_dict(two_scratch, plugins=ctkd_plugins()))
    assert list(found) == ["method.expert"] and "scratch, expert" in found["method.expert"]
    two_scratch["method"]["expert"] = "expert"
    two_scratch["losses"] = [{"name": "ce", "inputs": {"logits": "student"}},
                             {"name": "logit_l2", "inputs": {"student": "student", "teacher": "scratch2"}},
                             {"name": "kd", "inputs": {"student": "student", "teacher": "scratch"}}]
    pipe = Pipeline.from_dict(two_scratch, plugins=ctkd_plugins())  # extra models are fine with [[losses]]
    assert [lc.name for lc in effective_losses(pipe.config, pipe.registry)] == ["ce", "logit_l2", "kd"]

    default = tomllib.loads(text)
    default["method"]["scratch"] = "scratch"  # naming the only candidate changes nothing
    pipe = Pipeline.from_dict(default, plugins=ctkd_plugins())
    l2 = next(lc for lc in effective_losses(pipe.config, pipe.registry) if lc.name == "logit_l2")
    assert l2.inputs == {"student": "student", "teacher": "scratch"}

    frozen_student = tomllib.loads(text)
    frozen_student["models"]["student"].update(frozen=True, checkpoint=str(fake_expert))
    found = problems(lambda: Pipeline.from_dict(frozen_student, plugins=ctkd_plugins()))
    assert "trained" in found["models.student.frozen"]

    wrong = tomllib.loads(text)
    wrong["method"].update(scratch="expert", expert="nope")
    found = problems(lambda: Pipeline.from_dict(wrong, plugins=ctkd_plugins()))
    assert "must be the scratch teacher" in found["method.scratch"]
    assert "no model 'nope'" in found["method.expert"]

    bad_option = tomllib.loads(text)
    bad_option["method"].update(attention_target="teacher", gamma=-1.0)
    found = problems(lambda: Pipeline.from_dict(bad_option, plugins=ctkd_plugins()))
    assert "'student', 'scratch'" in found["method.attention_target"] and ">= 0" in found["method.gamma"]


def test_default_terms_from_options(cifar10_root, tmp_path, fake_expert):
    method = """
        gamma = 0.25
        beta = 500.0
    """
    pipe = make_pipe(ctkd_toml(cifar10_root, tmp_path / "r", fake_expert, method=method))
    terms = {lc.label: lc for lc in effective_losses(pipe.config, pipe.registry)}
    assert list(terms) == ["ce_scratch", "ce_student", "logit_l2", "attention"]
    assert terms["ce_scratch"].inputs == {"logits": "scratch"} and terms["ce_student"].inputs == {"logits": "student"}
    assert terms["logit_l2"].weight == 0.25 and terms["logit_l2"].inputs == {"student": "student", "teacher": "scratch"}
    assert terms["attention"].weight == 500.0
    assert terms["attention"].inputs == {"student": "student:stages", "teacher": "expert:stages"}
    pipe.validate()


def test_attention_pairs_are_the_group_outputs(cifar10_root, tmp_path, fake_expert):
    for target in ("student", "scratch"):
        method = f'attention_target = "{target}"\n'
        built = make_pipe(ctkd_toml(cifar10_root, tmp_path / target, fake_expert, method=method)).build()
        at = next(t for t in built.method._losses if t.label == "attention")
        assert at.inputs["student"] == [Ref(target, f"block{k}") for k in (1, 2, 3)]
        assert at.inputs["teacher"] == [Ref("expert", f"block{k}") for k in (1, 2, 3)]
        l2 = next(t for t in built.method._losses if t.label == "logit_l2")
        assert l2.inputs == {"student": Ref("student"), "teacher": Ref("scratch")}


def test_explicit_losses_replace_the_defaults(cifar10_root, tmp_path, fake_expert):
    losses = """
        [[losses]]
        name = "ce"
        inputs = { logits = "student" }
        [[losses]]
        name = "ce"
        inputs = { logits = "scratch" }
        [[losses]]
        name = "logit_l2"
        weight = 0.5
        inputs = { student = "student", teacher = "scratch" }
    """
    pipe = make_pipe(ctkd_toml(cifar10_root, tmp_path / "r", fake_expert, losses=losses))
    assert [lc.name for lc in effective_losses(pipe.config, pipe.registry)] == ["ce", "ce", "logit_l2"]
    # options that only shape the default terms are refused next to explicit [[losses]]
    found = problems(lambda: make_pipe(ctkd_toml(cifar10_root, tmp_path / "r", fake_expert, method="gamma = 2.0\n", losses=losses)))
    assert "[[losses]]" in found["method.gamma"]


# --- what a step computes ------------------------------------------------------------------------


def test_logit_hint_leaves_scratch_gradient_untouched(cifar10_root, tmp_path, fake_expert):
    built, images, labels = batch(make_pipe(ctkd_toml(cifar10_root, tmp_path / "r", fake_expert, method="gamma = 1.0\n")))
    built.module.train()
    terms = built.method.training_step(images, labels, PROGRESS)
    assert terms["logit_l2"].item() > 0
    scratch = [p for p in built.models["scratch"].parameters()]
    student = [p for p in built.models["student"].parameters()]
    total = sum(terms.values())
    without = sum(v for k, v in terms.items() if k != "logit_l2")
    g_with = torch.autograd.grad(total, scratch + student, retain_graph=True)
    g_without = torch.autograd.grad(without, scratch + student, retain_graph=True)
    n = len(scratch)
    for a, b in zip(g_with[:n], g_without[:n]):
        assert torch.equal(a, b)  # bit-identical: the hint adds nothing to the scratch teacher
    assert any(not torch.equal(a, b) for a, b in zip(g_with[n:], g_without[n:]))
    # the hint alone reaches no scratch-teacher parameter at all
    alone = torch.autograd.grad(terms["logit_l2"], scratch, retain_graph=True, allow_unused=True)
    assert all(g is None for g in alone)
    # nor does anything reach the frozen expert
    assert not any(p.requires_grad for p in built.models["expert"].parameters())


def _attention_map(f: torch.Tensor) -> torch.Tensor:
    a = f.pow(2).mean(dim=1).flatten(1)
    return a / a.norm(dim=1, keepdim=True)


def _groups(model: WideResNet, x: torch.Tensor) -> list[torch.Tensor]:
    f1 = model.block1(model.conv1(x))
    f2 = model.block2(f1)
    return [f1, f2, model.block3(f2)]


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(z - z.logsumexp(dim=1, keepdim=True)).gather(1, y.view(-1, 1)).mean()


@pytest.mark.parametrize("target", ["student", "scratch"])
def test_total_loss_matches_the_formula_in_float64(cifar10_root, tmp_path, fake_expert, target):
    gamma, beta = 0.3, 1000.0
    method = f'gamma = {gamma}\nbeta = {beta}\nattention_target = "{target}"\n'
    built, images, labels = batch(make_pipe(ctkd_toml(cifar10_root, tmp_path / "r", fake_expert, method=method)))
    built.module.double()
    x = images.double()
    built.module.train()
    total = sum(built.method.training_step(x, labels, PROGRESS).values())

    # reference, from L = CE(z_scr, y) + CE(z_s, y) + γ/B·‖sg(z_scr) − z_s‖² + β·Σ_j AT(F_target^j, F_exp^j)
    m = built.models
    assert not m["expert"].training and m["student"].training and m["scratch"].training
    with torch.no_grad():
        z_s, z_scr = m["student"](x), m["scratch"](x)
        feats = {"student": _groups(m["student"], x), "scratch": _groups(m["scratch"], x)}
        f_exp = _groups(m["expert"], x)
    B = x.shape[0]
    at = sum(((_attention_map(fs) - _attention_map(fe)) ** 2).mean() for fs, fe in zip(feats[target], f_exp))
    ref = _ce(z_scr, labels) + _ce(z_s, labels) + gamma / B * ((z_scr - z_s) ** 2).sum() + beta * at
    assert total.dtype == torch.float64
    torch.testing.assert_close(total.detach(), ref, rtol=1e-12, atol=1e-12)


# --- the shared first conv -----------------------------------------------------------------------


def test_share_first_conv_is_one_parameter_through_save_and_load(cifar10_root, tmp_path, fake_expert):
    text = ctkd_toml(cifar10_root, tmp_path / "r", fake_expert, method="share_first_conv = true\n")
    built, images, labels = batch(make_pipe(text))
    student, scratch = built.models["student"], built.models["scratch"]
    assert student.conv1.weight is scratch.conv1.weight
    assert student.block1[0].conv1.weight is not scratch.block1[0].conv1.weight
    opt = build_optimizer(built.config, built.module)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sum(p is scratch.conv1.weight for p in params) == 1
    assert len(params) == len({id(p) for p in params})
    names = [n for g in opt.param_groups for n in g["names"]]
    assert sum(n.endswith(".conv1.weight") and n.count(".") == 3 for n in names) == 1  # models.<m>.conv1.weight once

    # its gradient is the sum of both networks' contributions
    built.module.train()
    terms = built.method.training_step(images, labels, PROGRESS)
    sum(terms.values()).backward()
    assert scratch.conv1.weight.grad is not None
    opt.step()
    assert student.conv1.weight is scratch.conv1.weight

    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, built.module, optimizer=opt, meta={"epoch": 1})
    state = Checkpoint(path).module_state
    assert torch.equal(state["models.student.conv1.weight"], state["models.scratch.conv1.weight"])
    fresh = make_pipe(text).build()
    fresh.module.load_state_dict(state)
    assert fresh.models["student"].conv1.weight is fresh.models["scratch"].conv1.weight
    for k, v in built.module.state_dict().items():
        assert torch.equal(fresh.module.state_dict()[k], v), k
    fresh_opt = build_optimizer(fresh.config, fresh.module)
    fresh_opt.load_state_dict(Checkpoint(path).optimizer_state())


def test_share_first_conv_needs_matching_shapes(cifar10_root, tmp_path, fake_expert):
    text = ctkd_toml(cifar10_root, tmp_path / "r", fake_expert, method="share_first_conv = true\nfirst_conv = \"block1.0.conv1\"\n")
    found = problems(lambda: make_pipe(text).build())  # widths 16 vs 32 in the first block
    assert "shape" in found["method.share_first_conv"]


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expert_run(tmp_path_factory, cifar10_root) -> Path:
    """A tiny supervised WRN-10-1 run: the expert teacher of the end-to-end tests."""
    from conftest import tiny_pipeline

    tmp = tmp_path_factory.mktemp("expert")
    raw = tomllib.loads(tiny_pipeline(cifar10_root, tmp / "run", epochs=1, model="expert", losses=""))
    result = Pipeline.from_dict(raw).fit()
    assert result["best"]["metric"] == "test/expert/top1"
    return tmp / "run"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ctkd_end_to_end_sigkill_and_resume_is_bit_identical(tmp_path, cifar10_root, expert_run):
    method = """
        share_first_conv = true
        [optimizer]
        lr = 0.05
        schedule = { name = "kill_at" }
    """
    tomls = {}
    for name in ("ref", "crash"):
        tomls[name] = tmp_path / f"{name}.toml"
        tomls[name].write_text(ctkd_toml(cifar10_root, tmp_path / name, expert_run, epochs=3, method=method))

    ref = run_pipeline_process(tmp_path, tomls["ref"], "fresh")
    assert ref.returncode == 0, ref.stderr
    crashed = run_pipeline_process(tmp_path, tomls["crash"], "fresh", kill_at=1.5)  # half-way through the second epoch
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert Checkpoint(tmp_path / "crash" / "checkpoints" / "last.safetensors").meta["epoch"] == 1
    resumed = run_pipeline_process(tmp_path, tomls["crash"], "resume")
    assert resumed.returncode == 0, resumed.stderr

    a = Checkpoint(tmp_path / "ref" / "checkpoints" / "last.safetensors")
    b = Checkpoint(tmp_path / "crash" / "checkpoints" / "last.safetensors")
    assert b.meta["epoch"] == 3
    for model in ("student", "scratch", "expert"):
        sa, sb = a.model_state(model), b.model_state(model)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (model, k)
    # the shared first conv stayed one tensor through the kill and the resume
    assert torch.equal(b.model_state("student")["conv1.weight"], b.model_state("scratch")["conv1.weight"])
    # the frozen expert is still the supervised run's network
    expert = Checkpoint(expert_run / "checkpoints" / "best.safetensors").model_state("expert")
    for k, v in expert.items():
        assert torch.equal(b.model_state("expert")[k], v), k

    ra, rb = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "crash")
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    assert {"train/loss/ce_scratch", "train/loss/ce_student", "train/loss/logit_l2", "train/loss/attention",
            "test/student/top1", "test/scratch/top1", "test/expert/top1"} <= set(ra[0])
    for x, y in zip(ra, rb):
        assert x["train/loss/total"] == y["train/loss/total"] and x["test/student/top1"] == y["test/student/top1"]
    assert rb[-1]["train/loss/total"] < rb[0]["train/loss/total"]  # it learns


# --- the example pipelines -----------------------------------------------------------------------


EXAMPLES = sorted((REPO / "examples" / "ctkd").glob("*.toml")) + sorted((REPO / "examples" / "baselines").glob("*.toml"))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    for ds in ("cifar10", "cifar100", "svhn", "tinyimagenet"):
        assert {f"{ds}_ctkd.toml", f"{ds}_expert.toml"} <= names
    for ds in ("cifar10", "cifar100"):
        assert {f"{ds}_wrn16_1_{kind}.toml" for kind in ("student", "kd", "at", "fitnet", "fitnet_two_stage")} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_validates(path):
    pipe = Pipeline.from_toml(path, plugins=ctkd_plugins())
    pipe.validate()
    cfg = pipe.config
    if cfg.method.name != "ctkd":
        return
    expert = cfg.models["expert"]
    run = expert.checkpoint.rstrip("/").split("/")[-1]
    # the expert's own supervised pipeline is next to it and writes that run directory
    sources = [tomllib.loads(p.read_text()) for p in EXAMPLES if p.parent == path.parent]
    assert any(s["run"]["name"] == run and s.get("method", {}).get("name", "supervised") == "supervised" for s in sources), run
    if not path.name.startswith("sweep_"):  # the paper's recipe, and the γ the sweep chose
        assert cfg.method.options.gamma == ctkd_module.DEFAULT_GAMMA and cfg.method.options.beta == 1000.0
        assert cfg.optimizer.lr == 0.1 and cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 5e-4
        assert cfg.data.batch_size == 128 and cfg.run.epochs == 200
        assert cfg.optimizer.schedule.name == "multistep"
        assert tuple(cfg.optimizer.schedule.options.milestones) == (60, 120, 160)
        assert cfg.optimizer.schedule.options.gamma == 0.2
        assert (cfg.models["student"].options.depth, cfg.models["student"].options.width) == (16, 1)
        for name in ("scratch", "expert"):
            assert (cfg.models[name].options.depth, cfg.models[name].options.width) == (40, 1)


def shrink(raw: dict, root: Path, run_dir: Path) -> dict:
    """An example pipeline at test scale: the CIFAR-10 subset, two steps of one epoch."""
    raw["data"].update(root=str(root), download=False, batch_size=32, eval_batch_size=128, train_size=256, test_size=128)
    raw["run"].update(epochs=1, max_steps_per_epoch=2, output_dir=str(run_dir), progress="off", precision="fp32")
    return raw


@pytest.mark.slow
def test_cifar10_examples_run(cifar10_root, tmp_path):
    ex = REPO / "examples" / "ctkd"
    expert = shrink(tomllib.loads((ex / "cifar10_expert.toml").read_text()), cifar10_root, tmp_path / "expert")
    Pipeline.from_dict(expert).fit()
    for name in ("cifar10_ctkd.toml", "cifar10_ctkd_released_code.toml"):
        raw = shrink(tomllib.loads((ex / name).read_text()), cifar10_root, tmp_path / name)
        raw["models"]["expert"]["checkpoint"] = str(tmp_path / "expert")
        pipe = Pipeline.from_dict(raw, plugins=ctkd_plugins())
        result = pipe.fit()
        models = pipe._built.models
        shared = models["student"].conv1.weight is models["scratch"].conv1.weight
        assert shared == raw["method"]["share_first_conv"]  # the tie survives channels_last conversion
        assert {"train/loss/ce_scratch", "train/loss/ce_student", "train/loss/logit_l2", "train/loss/attention",
                "test/student/top1", "test/scratch/top1", "test/expert/top1"} <= set(result["last"])
