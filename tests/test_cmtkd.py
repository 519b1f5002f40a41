"""CMT-KD (Pham, Hoang, Do, WACV 2023): fusion wiring, gradients, the loss terms against references
written from the paper's formulas, checks, and end-to-end runs with exact resume."""

from __future__ import annotations

import json
import signal
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from conftest import run_pipeline_process
import torch

from kdtoolkit import Pipeline
from kdtoolkit.engine.assemble import build_parts
from kdtoolkit.engine.optim import build_optimizer
from kdtoolkit.engine.checkpoint import Checkpoint
from kdtoolkit.errors import ConfigError
from kdtoolkit.methods import Progress

CPU = torch.device("cpu")
STEP = Progress(0, 0, 1, 1)


def cmtkd_plugins() -> list:
    """The plugin module to pass explicitly until the ``cmtkd`` entry point is installed (then none:
    registering it twice would be a duplicate)."""
    if entry_points(group="kdtoolkit", name="cmtkd"):
        return []
    import kdtoolkit_plugins.methods.cmtkd as module

    return [module]


def quant(bits: int | None):
    return None if bits is None else {"name": "hwgq", "weight_bits": bits, "act_bits": bits}


def make_raw(teachers=(4, 8), student_bits=2, model=None, **method) -> dict:
    model = model or {"name": "wrn", "depth": 10, "width": 1}
    models = {"student": dict(model)}
    if quant(student_bits):
        models["student"]["quantizer"] = quant(student_bits)
    for bits in teachers:
        spec = dict(model, role="teacher")
        if quant(bits):
            spec["quantizer"] = quant(bits)
        models[f"t{bits}"] = spec
    return {
        "data": {"name": "cifar10"},
        "models": models,
        "method": {"name": "cmtkd", **method},
        "run": {"progress": "off", "device": "cpu"},
    }


def build(raw: dict, sample_shape=(4, 3, 16, 16), seed: int = 0):
    pipe = Pipeline.from_dict(raw, plugins=cmtkd_plugins())
    torch.manual_seed(seed)
    sample = torch.randn(*sample_shape)
    return build_parts(pipe.config, pipe.registry, num_classes=10, device=CPU, sample=sample)


def randomize_importance(method, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fusion in method.fusion:
            fusion.importance.copy_(torch.randn(fusion.importance.shape, generator=g))


def batch(n=4, size=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


# --- the collaborative pass ----------------------------------------------------------------------


def test_fused_feature_is_the_input_of_the_next_stage_of_every_teacher():
    built = build(make_raw(teachers=(4, 6, 8)))
    method = built.method
    randomize_importance(method)
    method.eval()
    teachers = [built.models[n] for n in ("t4", "t6", "t8")]
    ends, nexts = ["block1", "block2", "block3"], ["block2", "block3", "bn"]  # WRN stage ends / next stage starts
    outs: dict = {}
    ins: dict = {}
    handles = []
    for i, t in enumerate(teachers):
        for k, (end, nxt) in enumerate(zip(ends, nexts)):
            handles.append(t.get_submodule(end).register_forward_hook(lambda m, a, o, i=i, k=k: outs.__setitem__((i, k), o.detach().clone())))
            handles.append(t.get_submodule(nxt).register_forward_pre_hook(lambda m, a, i=i, k=k: ins.__setitem__((i, k), a[0].detach().clone())))
        handles.append(t.fc.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__((i, "fc"), o.detach().clone())))
    images, _ = batch()
    with torch.no_grad():
        logits = method.evaluate_logits(images)
    for h in handles:
        h.remove()
    for k in range(3):
        w = torch.softmax(method.fusion[k].importance.detach(), dim=0)
        assert not torch.allclose(w, torch.full_like(w, 1 / 3))  # really non-uniform
        expected = sum(w[i] * outs[(i, k)] for i in range(3))
        for i in range(3):
            # every teacher's next stage reads the fused feature, not its own output
            torch.testing.assert_close(ins[(i, k)], expected, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(ins[(i, k)], outs[(i, k)])
    z_t = sum(outs[(i, "fc")] for i in range(3)) / 3  # combine = "mean" of the heads on the last fused feature
    torch.testing.assert_close(logits["combined_teacher"], z_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits["student"], built.models["student"](images))


def test_one_teacher_with_fixed_weights_equals_its_plain_forward():
    built = build(make_raw(teachers=(4,)))
    method = built.method
    with torch.no_grad():
        for fusion in method.fusion:
            fusion.importance.fill_(3.7)  # softmax over one teacher is exactly 1
    method.eval()
    images, _ = batch()
    with torch.no_grad():
        combined = method.evaluate_logits(images)["combined_teacher"]
        plain = built.models["t4"](images)
    assert torch.equal(combined, plain)


@pytest.mark.parametrize("combine", ["mean", "importance"])
def test_gradients_reach_importance_weights_every_teacher_and_the_student(combine):
    built = build(make_raw(teachers=(4, 6, 8), combine=combine))
    method = built.method
    randomize_importance(method)
    method.train()
    images, labels = batch(8)
    terms = method.training_step(images, labels, STEP)
    assert set(terms) == {"ce_student", "ce_teacher", "mutual", "feature"}
    sum(terms.values()).backward()
    for k, fusion in enumerate(method.fusion):
        assert fusion.importance.grad is not None and fusion.importance.grad.abs().sum() > 0, k
    if combine == "importance":
        assert method.combine_fusion.importance.grad.abs().sum() > 0
    for name, model in built.models.items():
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads), name
        # the first conv (stage 0) and the classifier get gradient in every network
        assert model.conv1.weight.grad.abs().sum() > 0, name
        assert model.fc.weight.grad.abs().sum() > 0, name


def test_feature_loss_gradient_reaches_teachers_unless_detached():
    for detach in (False, True):
        built = build(make_raw(teachers=(4, 8), alpha=0.0, beta=0.0, detach_fused_target=detach))
        method = built.method
        method.train()
        images, labels = batch(8)
        terms = method.training_step(images, labels, STEP)
        assert set(terms) == {"feature"}  # alpha = beta = 0: the other default terms are left out
        terms["feature"].backward()
        assert built.models["student"].conv1.weight.grad.abs().sum() > 0
        teacher_grad = built.models["t4"].conv1.weight.grad
        pi_grad = method.fusion[0].importance.grad
        if detach:
            assert teacher_grad is None and pi_grad is None
        else:
            assert teacher_grad.abs().sum() > 0 and pi_grad.abs().sum() > 0


# --- the loss terms against the formulas ---------------------------------------------------------


def _at_map(f):
    a = f.pow(2).mean(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def test_loss_terms_match_the_papers_formulas_in_float64():
    alpha, beta, gamma, T = 0.7, 0.3, 50.0, 3.0
    built = build(make_raw(teachers=(None, None), student_bits=None, alpha=alpha, beta=beta, gamma=gamma, temperature=T, feature_stages=[0, 2]))
    method = built.method
    built.module.double()
    randomize_importance(method)
    method.eval()  # deterministic BN so the reference pass sees the same networks
    images, labels = batch(6)
    images = images.double()
    terms = method.training_step(images, labels, STEP)

    z_t, fused, _ = method.teachers_forward(images)
    z_s, feats = method.student_forward(images)
    assert z_t.dtype == torch.float64
    # Eq. 7: shift each network so its target logit is 0, take the element-wise minimum
    idx = labels.view(-1, 1)
    ens = torch.minimum(z_t - z_t.gather(1, idx), z_s - z_s.gather(1, idx))
    p = torch.softmax(ens / T, dim=1)

    def kl(z):  # T² · KL(p ‖ softmax(z / T)), batch mean, written out
        q = torch.softmax(z / T, dim=1)
        return T * T * (p * (p.log() - q.log())).sum(1).mean()

    def ce(z):
        return -torch.log_softmax(z, dim=1).gather(1, idx).mean()

    feat = sum(((_at_map(feats[k]) - _at_map(fused[k])) ** 2).mean() for k in (0, 2))
    expected = {
        "ce_student": alpha * ce(z_s), "ce_teacher": alpha * ce(z_t),
        "mutual": beta * (kl(z_s) + kl(z_t)), "feature": gamma * feat,
    }
    assert set(terms) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-10, atol=1e-12, msg=key)
    # the same terms as the published outputs they are computed from
    outputs = method.forward_outputs(images)
    torch.testing.assert_close(outputs["combined_teacher"], z_t, rtol=0, atol=0)
    assert len(outputs["fused:stages"]) == len(outputs["student_features:stages"]) == 2
    torch.testing.assert_close(outputs["fused:stages"][1], fused[2], rtol=0, atol=0)


def test_zero_weights_switch_terms_off():
    built = build(make_raw(teachers=(4, 8), gamma=0.0))
    assert [t.label for t in built.module.losses] == ["ce_student", "ce_teacher", "mutual"]
    images, labels = batch(8)
    terms = built.method.training_step(images, labels, STEP)
    assert "feature" not in terms and float(terms["mutual"].detach()) > 0

    built = build(make_raw(teachers=(4, 8), beta=0.0))
    terms = built.method.training_step(images, labels, STEP)
    assert set(terms) == {"ce_student", "ce_teacher", "feature"} and float(terms["feature"].detach()) > 0


def test_fitnet_feature_loss_builds_regressors_without_touching_model_state():
    raw = make_raw(teachers=(4, 8), feature_loss="fitnet")
    for spec in raw["models"].values():
        spec["quantizer"]["name"] = "lsq"
    built = build(raw)
    method = built.method
    feature = {t.label: t for t in built.module.losses}["feature"]
    assert feature.weight == 1.0  # the FitNet default of gamma
    assert len(feature.loss.regressors) == 3
    names = [n for n, _ in built.module.named_parameters()]
    assert "losses.3.loss.regressors.0.0.weight" in names
    # the shape pass over the sample batch did not initialise LSQ's activation steps
    from kdtoolkit.quant import quantized_layers

    for model in built.models.values():
        for layer in quantized_layers(model).values():
            if layer.act_quantizer is not None and hasattr(layer.act_quantizer, "initialized"):
                assert not bool(layer.act_quantizer.initialized)
    images, labels = batch(8)
    terms = method.training_step(images, labels, STEP)
    sum(terms.values()).backward()
    assert feature.loss.regressors[0][0].weight.grad.abs().sum() > 0


def test_param_groups_epoch_metrics_and_state_dict():
    raw = make_raw(teachers=(4, 6, 8), combine="importance")
    raw["optimizer"] = {"lr": 0.1}
    built = build(raw)
    pipe = Pipeline.from_dict(raw, plugins=cmtkd_plugins())
    opt = build_optimizer(pipe.config, built.module)
    groups = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    for k in range(3):
        assert groups[f"method.fusion.{k}.importance"] == pytest.approx(0.01)
    assert groups["method.combine_fusion.importance"] == pytest.approx(0.01)
    assert groups["models.student.conv1.weight"] == pytest.approx(0.1)
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert decay["method.fusion.0.importance"] == decay["models.student.conv1.weight"] == 5e-4  # default: the optimizer's
    raw["method"]["importance_weight_decay"] = 0.0
    pipe, rebuilt = Pipeline.from_dict(raw, plugins=cmtkd_plugins()), build(raw)
    no_decay = build_optimizer(pipe.config, rebuilt.module)
    decay = {n: g["weight_decay"] for g in no_decay.param_groups for n in g["names"]}
    assert decay["method.fusion.2.importance"] == decay["method.combine_fusion.importance"] == 0.0
    assert decay["models.student.conv1.weight"] == 5e-4
    metrics = built.method.epoch_metrics()
    assert set(metrics) == {f"fusion/stage{k}/{t}" for k in range(3) for t in ("t4", "t6", "t8")} | {
        f"fusion/logits/{t}" for t in ("t4", "t6", "t8")}
    assert sum(metrics[f"fusion/stage1/{t}"] for t in ("t4", "t6", "t8")) == pytest.approx(1.0)
    state = built.module.state_dict()
    assert "method.fusion.0.importance" in state and "models.t6.block1.0.conv1.weight" in state
    assert not [k for k in state if k.startswith("method.") and ".block" in k]  # networks are not duplicated


# --- checks --------------------------------------------------------------------------------------


def _problems(raw) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(raw, plugins=cmtkd_plugins())
    return dict(info.value.problems)


def test_check_names_the_offending_keys():
    raw = make_raw(teachers=(4, 8))
    raw["models"]["t4"].update(frozen=True, checkpoint="runs/x")
    raw["method"]["alpha"] = 0.5
    raw["losses"] = [{"name": "ce"}]
    problems = _problems(raw)
    assert "remove frozen = true" in problems["models.t4.frozen"]
    assert "default loss terms" in problems["method.alpha"] and "[[losses]]" in problems["method.alpha"]

    assert "role = \"teacher\"" in _problems(make_raw(teachers=()))["models"]
    problems = _problems(make_raw(teachers=(4,), feature_stages=[0, 0]))
    assert "duplicates" in problems["method.feature_stages"]
    problems = _problems(make_raw(teachers=(4,), stages=["block1", "block2"], feature_stages=[2]))
    assert "does not exist" in problems["method.feature_stages"]
    problems = _problems(make_raw(teachers=(4,), feature_loss="at"))
    assert "method.feature_loss" in problems


def test_bad_feature_stage_is_reported_when_the_models_are_built():
    with pytest.raises(ConfigError) as info:
        build(make_raw(teachers=(4,), feature_stages=[3]))
    assert info.value.problems[0][0] == "method.feature_stages" and "0..2" in info.value.problems[0][1]


def test_declared_stages_for_a_torchvision_model():
    model = {"name": "torchvision", "arch": "mobilenet_v2"}
    with pytest.raises(ConfigError) as info:
        build(make_raw(teachers=(4, 8), model=model), sample_shape=(2, 3, 32, 32))
    path, message = info.value.problems[0]
    assert path == "models.student" and "stages = [" in message and "features.3" in message

    raw = make_raw(teachers=(4, 8), model=model, stages=["features.3", "features.6", "features.13"])
    built = build(raw, sample_shape=(2, 3, 32, 32))
    method = built.method
    assert method.num_stages == 3
    randomize_importance(method)
    images, labels = batch(4, 32)
    method.train()
    terms = method.training_step(images, labels, STEP)
    sum(terms.values()).backward()
    assert all(float(terms[k].detach()) > 0 for k in terms)
    assert method.fusion[2].importance.grad.abs().sum() > 0
    # the state dict keys of the networks are torchvision's
    assert "models.t4.features.3.conv.0.0.weight" in built.module.state_dict()


def test_skip_connection_across_a_declared_stage_is_a_clear_error():
    with pytest.raises(ConfigError) as info:
        build(make_raw(teachers=(4,), stages=["block1.0.conv1", "block2"]))
    path, message = info.value.problems[0]
    assert path == "method.stages" and "skip connection" in message and "stages = [" in message


# --- end to end ----------------------------------------------------------------------------------

def e2e_toml(root: Path, run_dir: Path, *, epochs: int, schedule: str = '{ name = "constant" }') -> str:
    return textwrap.dedent(f"""
        schema_version = 1
        [run]
        name = "cmtkd-tiny"
        seed = 5
        epochs = {epochs}
        output_dir = "{run_dir.as_posix()}"
        progress = "off"
        max_steps_per_epoch = 2
        [data]
        name = "cifar10"
        root = "{root.as_posix()}"
        batch_size = 32
        eval_batch_size = 64
        train_size = 256
        test_size = 64
        [models.student]
        name = "wrn"
        depth = 10
        width = 1
        quantizer = {{ name = "hwgq", weight_bits = 2, act_bits = 2 }}
        [models.t4]
        name = "wrn"
        depth = 10
        width = 1
        role = "teacher"
        quantizer = {{ name = "hwgq", weight_bits = 4, act_bits = 4 }}
        [models.t8]
        name = "wrn"
        depth = 10
        width = 1
        role = "teacher"
        quantizer = {{ name = "hwgq", weight_bits = 8, act_bits = 8 }}
        [method]
        name = "cmtkd"
        [optimizer]
        lr = 0.05
        weight_decay = 25e-6
        schedule = {schedule}
        [[optimizer.param_groups]]
        params = ["models.t4.*", "models.t8.*"]
        weight_decay = 1e-4
    """)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cmtkd_end_to_end_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, cifar10_root):
    schedule = '{ name = "kill_at" }'
    ref_toml, crash_toml = tmp_path / "ref.toml", tmp_path / "crash.toml"
    ref_toml.write_text(e2e_toml(cifar10_root, tmp_path / "ref", epochs=3, schedule=schedule))
    crash_toml.write_text(e2e_toml(cifar10_root, tmp_path / "crash", epochs=3, schedule=schedule))

    ref = run_pipeline_process(tmp_path, ref_toml, "fresh")
    assert ref.returncode == 0, ref.stderr
    crashed = run_pipeline_process(tmp_path, crash_toml, "fresh", kill_at=1.5)  # half-way through the second epoch
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert Checkpoint(tmp_path / "crash" / "checkpoints" / "last.safetensors").meta["epoch"] == 1
    resumed = run_pipeline_process(tmp_path, crash_toml, "resume")
    assert resumed.returncode == 0, resumed.stderr

    a = Checkpoint(tmp_path / "ref" / "checkpoints" / "last.safetensors").module_state
    b = Checkpoint(tmp_path / "crash" / "checkpoints" / "last.safetensors").module_state
    assert a.keys() == b.keys()
    assert {"method.fusion.0.importance", "models.t8.block1.0.conv1.weight", "models.student.fc.weight"} <= set(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "crash")
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        for key in x:
            if key.startswith(("train/loss/", "test/", "fusion/")):
                assert x[key] == y[key], key
    row = ra[-1]
    assert {"train/loss/ce_student", "train/loss/ce_teacher", "train/loss/mutual", "train/loss/feature", "test/student/top1", "test/combined_teacher/top1", "fusion/stage2/t8"} <= set(row)
    # the importance weights moved during training (and the figure can be drawn from the rows)
    assert any(row[f"fusion/stage{k}/t4"] != 0.5 for k in range(3))
    from kdtoolkit_plugins.methods.cmtkd.plotting import plot_fusion_weights

    assert plot_fusion_weights(ra, tmp_path / "fig.png").stat().st_size > 0


@pytest.mark.slow
def test_cmtkd_evaluate_reproduces_the_logged_accuracy(tmp_path, cifar10_root):
    path = tmp_path / "p.toml"
    path.write_text(e2e_toml(cifar10_root, tmp_path / "run", epochs=1))
    pipe = Pipeline.from_toml(path, plugins=cmtkd_plugins())
    result = pipe.fit()
    metrics = Pipeline.from_toml(path, plugins=cmtkd_plugins()).evaluate()
    for key in ("test/student/top1", "test/combined_teacher/top1", "test/combined_teacher/top5"):
        assert metrics[key] == result["last"][key], key


def test_imagenet_alexnet_examples_are_natively_staged():
    """The ImageNet AlexNet CMT-KD examples use alexnet_bn (geometry = "imagenet"), staged natively: no
    declared stages, and the quantized student splits at pool2 / relu4 / pool5 (``kdtoolkit validate``
    builds the models but not the method, so it cannot see this)."""
    from kdtoolkit.engine.assemble import build_model
    from kdtoolkit.models import StagedModel

    examples = Path(__file__).resolve().parents[1] / "examples" / "cmtkd"
    paths = sorted(examples.glob("imagenet_alexnet_cmtkd_*.toml"))
    assert len(paths) == 3
    for path in paths:
        assert "stages = [" not in path.read_text()
        pipe = Pipeline.from_toml(path, plugins=cmtkd_plugins())
        torch.manual_seed(0)
        student = build_model(pipe.config, pipe.registry, "student", 10)
        assert isinstance(student, StagedModel) and student.stage_paths == ("pool2", "relu4", "pool5")
