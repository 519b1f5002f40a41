"""The papers' experiments as suites of example pipelines, and the scales they run at.

A suite is a list of :class:`Run` entries, each an example pipeline under ``examples/`` (per dataset)
plus how it depends on other runs of the suite (a frozen teacher's checkpoint, a warm start).
A scale rewrites each pipeline's size only (epochs, data, widths, schedule), never its method, and
says why it is sized as it is. ``benchmarks/suite.py`` runs them; ``benchmarks/suite_report.py``
turns the finished runs into tables and plots.

The paper figures are those of ``METHODS.md`` ("Paper figures to compare against"): CIFAR-100 top-1
of the settings the papers report. At a reduced scale our numbers are not comparable to them in
value, only in ordering.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping

import attrs

DATASETS = ("cifar10", "cifar100", "imagenet")


@attrs.frozen
class Run:
    """One pipeline of a suite.

    ``examples`` maps a dataset to the example file (relative to ``examples/``); ``needs`` maps a
    model of the pipeline to the run whose best checkpoint it loads (frozen teachers);
    ``warm_start`` (mini scale) lists models initialised from the suite's warm-start run.
    ``once``: trained with the first seed only (teachers other runs depend on).
    ``rows``: extra table rows read from the same run, ``(label, metric, paper figure)``.
    """

    id: str
    label: str
    examples: Mapping[str, str]
    paper: float | None = None
    needs: Mapping[str, str] = attrs.field(factory=dict)
    overrides: Mapping[str, object] = attrs.field(factory=dict)
    #: the table's metric; None: the run's own best metric (its student's top-1)
    metric: str | None = None
    once: bool = False
    rows: tuple[tuple[str, str, float | None], ...] = ()


@attrs.frozen
class Suite:
    name: str
    title: str
    runs: tuple[Run, ...]
    #: the paper's dataset and architecture, for the table's "paper" column header
    paper_setting: str
    #: runs of the mini scale when ``--runs`` is not given (None: all)
    mini_runs: tuple[str, ...] | None = None
    #: the run every quantized network warm-starts from at the mini scale (None: from scratch)
    warm_start_from: str | None = None
    #: the paper's orderings, ``(better setting, worse setting)`` by table label; the report tests
    #: each against our seeds (Welch's t on the last-epoch top-1)
    claims: tuple[tuple[str, str], ...] = ()


def _cifar(stem: str, imagenet: str | None = None) -> dict[str, str]:
    out = {"cifar10": stem.format(ds="cifar100"), "cifar100": stem.format(ds="cifar100")}
    if imagenet:
        out["imagenet"] = imagenet
    return out


# --- CTKD: WRN-40-1 -> WRN-16-1 ----------------------------------------------------------------
CTKD = Suite(
    name="ctkd",
    title="CTKD comparison: WRN-40-1 teachers, WRN-16-1 student",
    paper_setting="CTKD paper (figures not in our copy of the text)",
    runs=(
        Run("expert", "WRN-40-1 expert (teacher)", {d: f"ctkd/{d}_expert.toml" for d in ("cifar10", "cifar100")},
            once=True),
        Run("student", "student alone", {d: f"baselines/{d}_wrn16_1_student.toml" for d in ("cifar10", "cifar100")}),
        Run("kd", "KD", {d: f"baselines/{d}_wrn16_1_kd.toml" for d in ("cifar10", "cifar100")}, needs={"teacher": "expert"}),
        Run("at", "AT", {d: f"baselines/{d}_wrn16_1_at.toml" for d in ("cifar10", "cifar100")}, needs={"teacher": "expert"}),
        Run("fitnet", "FitNet", {d: f"baselines/{d}_wrn16_1_fitnet.toml" for d in ("cifar10", "cifar100")}, needs={"teacher": "expert"}),
        Run("ctkd", "CTKD", {d: f"ctkd/{d}_ctkd.toml" for d in ("cifar10", "cifar100")}, needs={"expert": "expert"},
            rows=(("CTKD scratch teacher", "test/scratch/top1", None),)),
    ),
    # the paper's claims (its tables are not in our copy of the text): CTKD above every baseline,
    # and each baseline above the student trained alone
    claims=(("CTKD", "student alone"), ("CTKD", "KD"), ("CTKD", "AT"), ("CTKD", "FitNet"),
            ("KD", "student alone"), ("AT", "student alone"), ("FitNet", "student alone")),
)

# --- CMT-KD ablation (Tables 1-3, ResNet-18 column) --------------------------------------------
_R = "cmtkd/cifar100_resnet18_{name}.toml"
_I = "cmtkd/imagenet_resnet18_{name}.toml"
CMTKD = Suite(
    name="cmtkd",
    title="CMT-KD ablation: 2-bit HWGQ students (paper: ResNet-18)",
    paper_setting="CIFAR-100 ResNet-18 (Tables 1-3)",
    warm_start_from="single_fp",
    # the float model is every quantized network's warm start and KD's teacher: trained once (seed 0,
    # 15 epochs); its row shows that one run. The rest: the core set, 3 seeds each.
    mini_runs=("single_w2a2", "kd_fp", "cmtkd_no_ml", "cmtkd"),
    runs=(
        Run("single_fp", "single model, FP", _cifar(_R.format(name="single_fp"), _I.format(name="fp")), 75.3),
        Run("single_w8a8", "single model, 8 bit", _cifar(_R.format(name="single_w8a8"))),
        Run("single_w6a6", "single model, 6 bit", _cifar(_R.format(name="single_w6a6"))),
        Run("single_w4a4", "single model, 4 bit", _cifar(_R.format(name="single_w4a4"))),
        Run("single_w2a2", "single model, 2 bit", _cifar(_R.format(name="single_w2a2"), _I.format(name="hwgq_w2a2")), 72.9),
        Run("kd_fp", "KD from FP teacher", _cifar(_R.format(name="kd_fp_teacher")), 75.1, needs={"teacher": "single_fp"}),
        Run("average_teacher", "average teacher (4/6/8 bit)", _cifar(_R.format(name="average_teacher")), 76.0,
            needs={"t4": "single_w4a4", "t6": "single_w6a6", "t8": "single_w8a8"}),
        Run("cmtkd_no_att", "CMT-KD w/o Att", _cifar(_R.format(name="cmtkd_no_att")), 76.5),
        Run("cmtkd_no_ml", "CMT-KD w/o ML", _cifar(_R.format(name="cmtkd_no_ml")), 75.0),
        Run("cmtkd", "CMT-KD", _cifar(_R.format(name="cmtkd"), _I.format(name="cmtkd_hwgq_w2a2")), 78.3,
            rows=(("combined teacher", "test/combined_teacher/top1", 79.5),)),
        Run("cmtkd_2teachers", "CMT-KD, 2 teachers (4/8 bit)", _cifar(_R.format(name="cmtkd_2teachers"))),
    ),
    # Tables 1-2 (ResNet-18): 78.3 CMT-KD > 75.1 KD from FP, 75.0 w/o ML, 72.9 single 2-bit; combined
    # teacher 79.5 > CMT-KD; KD from FP and w/o ML both above the single 2-bit model
    claims=(("CMT-KD", "single model, 2 bit"), ("CMT-KD", "KD from FP teacher"), ("CMT-KD", "CMT-KD w/o ML"),
            ("combined teacher", "CMT-KD"), ("KD from FP teacher", "single model, 2 bit"),
            ("CMT-KD w/o ML", "single model, 2 bit"), ("average teacher (4/6/8 bit)", "single model, 2 bit"),
            ("CMT-KD", "CMT-KD w/o Att")),
)

# --- HWGQ vs LSQ (W2A2) --------------------------------------------------------------------------
_LSQ = {"quantizer_name": "lsq"}
QUANTIZERS = Suite(
    name="quantizers",
    title="HWGQ vs LSQ at W2A2, single models and CMT-KD",
    paper_setting="CIFAR-100 ResNet-18 (Table 4); ImageNet in the notes",
    warm_start_from="fp",
    runs=(
        Run("fp", "FP single model (warm start)", _cifar(_R.format(name="single_fp"), _I.format(name="fp")), 75.3, once=True),
        Run("hwgq", "HWGQ W2A2", _cifar(_R.format(name="single_w2a2"), _I.format(name="hwgq_w2a2")), 72.9),
        Run("lsq", "LSQ W2A2", _cifar(_R.format(name="single_w2a2"), _I.format(name="lsq_w2a2")), None, overrides=_LSQ),
        Run("cmtkd_hwgq", "CMT-KD (HWGQ) W2A2", _cifar(_R.format(name="cmtkd"), _I.format(name="cmtkd_hwgq_w2a2")), 78.3),
        Run("cmtkd_lsq", "CMT-KD (LSQ) W2A2", _cifar(_R.format(name="cmtkd"), _I.format(name="cmtkd_lsq_w2a2")), None, overrides=_LSQ),
    ),
    # ImageNet ResNet-18 (the paper's notes): LSQ above HWGQ, and CMT-KD above each single model
    claims=(("LSQ W2A2", "HWGQ W2A2"), ("CMT-KD (HWGQ) W2A2", "HWGQ W2A2"), ("CMT-KD (LSQ) W2A2", "LSQ W2A2")),
)

# --- common KD baselines: WRN-40-2 -> WRN-16-2 -------------------------------------------------
_B = "baselines/cifar100_wrn16_2_{name}.toml"
BASELINES = Suite(
    name="baselines",
    title="Common KD baselines: WRN-40-2 teacher, WRN-16-2 student",
    paper_setting="CIFAR-100, 240 epochs (CRD's table)",
    runs=(
        Run("teacher", "WRN-40-2 teacher", {"cifar10": "baselines/cifar100_wrn40_2_teacher.toml",
                                              "cifar100": "baselines/cifar100_wrn40_2_teacher.toml"}, once=True),
        Run("student", "student alone", _cifar(_B.format(name="student")), 73.26),
        Run("kd", "KD", _cifar(_B.format(name="kd")), 74.92, needs={"teacher": "teacher"}),
        Run("fitnet", "FitNet", _cifar(_B.format(name="fitnet")), 73.58, needs={"teacher": "teacher"}),
        Run("at", "AT", _cifar(_B.format(name="at")), 74.08, needs={"teacher": "teacher"}),
    ),
    claims=(("KD", "student alone"), ("AT", "student alone"), ("FitNet", "student alone"), ("KD", "AT"), ("AT", "FitNet")),
)

SUITES: dict[str, Suite] = {s.name: s for s in (CTKD, CMTKD, QUANTIZERS, BASELINES)}


# --- scales ------------------------------------------------------------------------------------
@attrs.frozen
class Scale:
    """How a scale resizes a pipeline. ``None`` leaves the example's value."""

    name: str
    why: str
    epochs: int | None = None
    #: epochs of the runs other runs start from (teachers, the warm-start float model)
    source_epochs: int | None = None
    train_size: int | None = None
    test_size: int | None = None
    max_steps_per_epoch: int | None = None
    #: model rewrite: ``(name, options)`` -> new ``(name, options)``; None keeps the model
    models: Callable[[str, dict], tuple[str, dict]] | None = None
    cosine: bool = False
    precision: str | None = None
    #: quantized runs warm-start from the suite's float run (QAT papers start from a float model)
    warm_start: bool = False
    batch_size: int | None = None


def _tiny(name: str, options: dict) -> tuple[str, dict]:
    # keep a WRN's depth ordering (teacher deeper than student) at the smallest size
    depth = 16 if options.get("depth", 16) > 16 else 10
    return "wrn", {"depth": depth, "width": 1}


def _mini(name: str, options: dict) -> tuple[str, dict]:
    # ResNet-18 is ~10x WRN-16-1's cost on this CPU; WRN-40-2/16-2 become WRN-40-1/16-1.
    if name == "wrn":
        return "wrn", {**options, "width": 1}
    return "wrn", {"depth": 16, "width": 1}


SCALES: dict[str, Scale] = {
    "smoke": Scale(
        "smoke", "every run of the suite end to end in seconds: checks wiring, not accuracy",
        epochs=1, source_epochs=1, train_size=256, test_size=256, max_steps_per_epoch=2, models=_tiny,
        cosine=True, precision="fp32", warm_start=True, batch_size=64,
    ),
    "mini": Scale(
        "mini",
        "about 2 hours per suite with 3 seeds on 2 CPU cores. 10k CIFAR-10 training images and the full "
        "test set (10k images: one seed's top-1 has a binomial standard error of ~0.45 points at 50-70%); "
        "WRN-16-1 students (WRN-40-1 where the paper's teacher is deeper), bf16 + channels-last, cosine lr. "
        "Quantized runs warm-start every network from one float WRN-16-1 trained first for longer "
        "(QAT papers start from a trained float model): then the higher-bit teachers are ahead of the "
        "2-bit student from the first epoch, which joint training from scratch cannot give in a few "
        "epochs, and the differences the papers report (1-5 points) can exceed the seed spread.",
        epochs=8, source_epochs=15, train_size=10000, models=_mini, cosine=True, precision="bf16",
        warm_start=True,
    ),
    "paper": Scale("paper", "the papers' own settings: the example pipelines unchanged"),
}


def rescale(raw: dict, scale: Scale, *, dataset: str, source: bool) -> dict:
    """``raw`` (an example pipeline) at ``scale`` on ``dataset``; ``source``: a run others start from."""
    raw = copy.deepcopy(raw)
    run, data = raw.setdefault("run", {}), raw.setdefault("data", {})
    if dataset != "imagenet":
        data["name"] = dataset
        for key in ("fraction",):
            data.pop(key, None)
    epochs = scale.source_epochs if source and scale.source_epochs else scale.epochs
    if epochs:
        run["epochs"] = epochs
        if scale.cosine:
            raw.setdefault("optimizer", {})["schedule"] = {"name": "cosine"}
            # loss-weight schedules (two-stage FitNet) keep their shape over the shorter run
    if scale.train_size:
        data["train_size"] = scale.train_size
    if scale.test_size:
        data["test_size"] = scale.test_size
    if scale.batch_size:
        data["batch_size"] = scale.batch_size
        data.pop("eval_batch_size", None)
    if scale.max_steps_per_epoch:
        run["max_steps_per_epoch"] = scale.max_steps_per_epoch
    if scale.precision:
        run["precision"] = scale.precision
        run["channels_last"] = scale.precision == "bf16"
    if scale.models:
        generic = {"role", "frozen", "checkpoint", "checkpoint_model", "quantizer", "evaluate"}
        for spec in raw.get("models", {}).values():
            options = {k: v for k, v in spec.items() if k not in generic and k != "name"}
            name, new = scale.models(spec["name"], options)
            for k in options:
                spec.pop(k)
            spec["name"] = name
            spec.update(new)
    return raw
