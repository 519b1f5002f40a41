"""The benchmark suite runner (benchmarks/suite.py): plans, reproducible overrides, smoke runs, resume."""

from __future__ import annotations

import csv
import json
import tomllib

import pytest

from benchmarks import suite as runner
from benchmarks.suites import SCALES, SUITES
from kdtoolkit.config import apply_overrides


def _ids(jobs):
    return [(run.id, seed) for run, seed in jobs]


def test_plan_adds_dependencies_once_and_orders_them_first():
    jobs = _ids(runner.plan(SUITES["cmtkd"], ["average_teacher"], 3))
    # the warm-start float model and the three separately trained teachers, each once, before the student runs
    assert jobs[:4] == [("single_fp", 0), ("single_w4a4", 0), ("single_w6a6", 0), ("single_w8a8", 0)]
    assert jobs[4:] == [("average_teacher", 0), ("average_teacher", 1), ("average_teacher", 2)]


def test_plan_runs_a_selected_source_with_every_seed():
    jobs = _ids(runner.plan(SUITES["ctkd"], None, 2))
    assert jobs[0] == ("expert", 0) and ("expert", 1) not in jobs  # a teacher is trained once
    assert jobs.count(("student", 1)) == 1 and ("ctkd", 1) in jobs
    with pytest.raises(SystemExit, match="unknown run 'nope'"):
        runner.plan(SUITES["ctkd"], ["nope"], 1)


@pytest.mark.parametrize("suite", sorted(SUITES))
@pytest.mark.parametrize("scale", ["smoke", "mini", "paper"])
def test_recorded_overrides_rebuild_the_pipeline_exactly(suite, scale, tmp_path):
    s = SUITES[suite]
    for run, seed in runner.plan(s, None, 2):
        raw, overrides = runner.pipeline_for(s, run, seed, SCALES[scale], dataset="cifar10", work=tmp_path, root="/data")
        example = tomllib.loads((runner.EXAMPLES / run.examples["cifar10"]).read_text())
        assert apply_overrides(example, overrides) == raw, (run.id, overrides)
        assert raw["run"]["seed"] == seed and raw["data"]["name"] == "cifar10"
        for name, dep in run.needs.items():
            assert raw["models"][name]["checkpoint"] == str(tmp_path / f"{dep}-s0")


def test_mini_scale_warm_starts_every_quantized_network_from_the_float_run(tmp_path):
    s = SUITES["cmtkd"]
    raw, _ = runner.pipeline_for(s, next(r for r in s.runs if r.id == "cmtkd"), 1, SCALES["mini"], dataset="cifar10", work=tmp_path, root=None)
    assert {n: (m["checkpoint"], m["checkpoint_model"]) for n, m in raw["models"].items()} == {
        n: (str(tmp_path / "single_fp-s0"), "student") for n in ("student", "t4", "t6", "t8")}
    assert raw["run"]["epochs"] == SCALES["mini"].epochs and raw["optimizer"]["schedule"] == {"name": "cosine"}
    fp, _ = runner.pipeline_for(s, s.runs[0], 0, SCALES["mini"], dataset="cifar10", work=tmp_path, root=None)
    assert fp["run"]["epochs"] == SCALES["mini"].source_epochs  # the float model others start from trains longer


@pytest.mark.slow
def test_every_suite_pipeline_validates(tmp_path):
    from kdtoolkit import Pipeline

    for s in SUITES.values():
        for run, seed in runner.plan(s, None, 1):
            for dataset in ("cifar10", "cifar100"):
                raw, _ = runner.pipeline_for(s, run, seed, SCALES["mini"], dataset=dataset, work=tmp_path, root=None)
                Pipeline(raw)  # structure and cross-table checks; raises ConfigError with the key path


def test_paper_scale_prints_a_gpu_hours_estimate_before_starting(tmp_path, capsys):
    runner.main(["cmtkd", "--scale", "paper", "--runs", "single_fp", "--seeds", "1", "--dataset", "cifar100",
                 "--work-dir", str(tmp_path / "w"), "--estimate"])
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "1 runs" in out
    hours = float(out.split("estimate: ")[1].split(" GPU-hours")[0])
    # ResNet-18 (CIFAR): ~0.56 GMAC forward, x3 for training, 50k images x 120 epochs: ~1e16 MAC
    assert 0.05 < hours < 1.0
    assert not (tmp_path / "w").exists()  # --estimate writes nothing


def test_report_gives_mean_and_std_over_seeds_beside_the_paper(tmp_path):
    from benchmarks.suite_report import write_report

    s = SUITES["cmtkd"]
    state = {"scale": "mini", "dataset": "cifar10", "seeds": 2, "commit": "abc", "command": "python -m benchmarks.suite cmtkd", "runs": {}}
    curves = {0: [40.0, 55.5, 54.0], 1: [41.0, 52.5, 53.0]}
    for seed, tops in curves.items():
        run_dir = tmp_path / f"cmtkd-s{seed}"
        run_dir.mkdir()
        rows = [{"epoch": e + 1, "test/student/top1": t, "test/combined_teacher/top1": t + 5, "train/images_per_s": 100.0 + seed,
                 "fusion/stage0/t4": 0.3, "fusion/stage0/t8": 0.7} for e, t in enumerate(tops)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "test/stu')  # a torn last line
        state["runs"][f"cmtkd-s{seed}"] = {"run": "cmtkd", "seed": seed, "done": True, "seconds": 60.0 * (seed + 1),
                                          "best_metric": "test/student/top1", "example": "x.toml", "overrides": ["run.seed=1"]}
    write_report(s, state, tmp_path, tmp_path / "out")
    table = (tmp_path / "out" / "results.md").read_text()
    # best per seed: 55.5 (epoch 2) and 53.0 (epoch 3); last: 54.0 and 53.0
    assert "| CMT-KD | 2 | 54.25 ± 1.77 | 53.50 ± 0.71 | 2/3 | 78.30 | 1.5 min | 100 |" in table
    assert "| combined teacher | 2 | 59.25 ± 1.77 | 58.50 ± 0.71 | 2/3 | 79.50 |" in table
    assert (tmp_path / "out" / "fusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_every_suite_runs_at_smoke_scale_and_an_interrupted_suite_continues(tmp_path, cifar10_root, monkeypatch, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["all", "--scale", "smoke", "--seeds", "1", "--data-root", str(cifar10_root),
            "--work-dir", str(work), "--results-dir", str(results)]
    runner.main(argv)
    total = 0
    for name, s in SUITES.items():
        with open(results / name / "results.csv") as f:
            rows = list(csv.DictReader(f))
        jobs = runner.plan(s, None, 1)
        total += len(jobs)
        assert {(r["run"], int(r["seed"])) for r in rows} == {(run.id, seed) for run, seed in jobs}
        for r in rows:
            assert 0.0 <= float(r["best"]) <= 100.0 and float(r["best"]) >= float(r["last"])
        assert (results / name / "curves.png").read_bytes()[:4] == b"\x89PNG"
        state = json.loads((work / name / "suite.json").read_text())
        assert all(info["command"].startswith("kdtoolkit run examples/") for info in state["runs"].values())
    assert "| CMT-KD | 1 |" in (results / "cmtkd" / "results.md").read_text()

    # run again: every finished run is kept, nothing is trained
    from kdtoolkit import Pipeline

    def no_training(self, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Pipeline, "fit", no_training)
    capsys.readouterr()
    runner.main(argv)
    assert capsys.readouterr().out.count("done earlier") == total


# --- the paper's orderings tested against the seeds -------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_welch_matches_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    import random

    from benchmarks.suite_report import welch

    rng = random.Random(seed)
    a = [rng.gauss(60, rng.uniform(0.1, 2)) for _ in range(rng.randint(2, 6))]
    b = [rng.gauss(60.5, rng.uniform(0.1, 2)) for _ in range(rng.randint(2, 6))]
    got = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert got["t"] == pytest.approx(ref.statistic, rel=1e-9)
    assert got["df"] == pytest.approx(ref.df, rel=1e-9)
    assert got["critical"] == pytest.approx(stats.t.ppf(0.975, min(int(got["df"]), 10**6) if got["df"] < 31 else 10**9), abs=2e-3)


def test_verdicts_of_the_ordering_table():
    from benchmarks.suite_report import verdict, welch

    assert verdict(welch([70.0, 70.2, 69.9], [65.0, 65.3, 64.8])).startswith("**agrees**")
    assert verdict(welch([65.0, 65.3, 64.8], [70.0, 70.2, 69.9])).startswith("**disagrees**")
    assert verdict(welch([70.0, 66.0, 68.0], [67.0, 69.0, 67.5])).startswith("same sign")
    assert verdict(welch([67.0, 69.0, 67.5], [70.0, 66.0, 68.5])).startswith("reverse sign")
    assert welch([70.0], [65.0, 66.0]) is None and verdict(None).startswith("not testable")


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_claim_names_settings_of_its_suite(suite):
    s = SUITES[suite]
    labels = {r.label for r in s.runs} | {row[0] for r in s.runs for row in r.rows}
    assert s.claims and all(better in labels and worse in labels for better, worse in s.claims), s.claims


def test_report_tests_the_orderings_on_the_last_epoch(tmp_path):
    from benchmarks.suite_report import write_report

    s = SUITES["ctkd"]
    state = {"scale": "mini", "dataset": "cifar10", "seeds": 3, "commit": "abc", "command": "x", "runs": {}}
    finals = {"student": [60.0, 60.4, 59.8], "kd": [62.0, 62.3, 61.9], "ctkd": [62.0, 64.0, 61.5]}
    for rid, values in finals.items():
        for seed, last in enumerate(values):
            key = f"{rid}-s{seed}"
            (tmp_path / key).mkdir()
            rows = [{"epoch": 1, "test/student/top1": last + 5.0}, {"epoch": 2, "test/student/top1": last}]  # best != last
            (tmp_path / key / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            state["runs"][key] = {"run": rid, "seed": seed, "done": True, "seconds": 60.0, "best_metric": "test/student/top1"}
    write_report(s, state, tmp_path, tmp_path / "out")
    table = (tmp_path / "out" / "results.md").read_text()
    line = next(li for li in table.splitlines() if li.startswith("| KD > student alone |"))
    assert "+2.00 ±" in line and "**agrees**" in line  # means of the last epoch: 62.07 - 60.07
    assert "same sign, within the seed spread" in next(li for li in table.splitlines() if li.startswith("| CTKD > KD |"))
    assert "| CTKD > AT | - | not run |" in table
