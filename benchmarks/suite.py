"""Run a paper's experiments as a suite, at a chosen scale, and tabulate our result beside the paper's.

    python -m benchmarks.suite SUITE [--scale smoke|mini|paper] [--seeds N] [--dataset cifar10|cifar100|imagenet]
                               [--runs id,id,...|all] [--data-root DIR] [--work-dir DIR] [--results-dir DIR]
                               [--estimate]

SUITE is one of ``ctkd``, ``cmtkd``, ``quantizers``, ``baselines`` (see ``benchmarks/suites.py``) or
``all``. Every run is an example pipeline from ``examples/`` changed only in scale (and, for a run
that needs another, in the checkpoint it loads). The estimate of the whole suite (hours on this CPU,
or GPU-hours at the paper scale) is printed before anything starts; ``--estimate`` stops there.

Each run trains in ``WORK_DIR/<run>-s<seed>`` (default ``runs/suites/<suite>-<scale>-<dataset>``).
An interrupted suite continues where it stopped: finished runs are not redone (``suite.json`` in
the work directory records them) and a run with a checkpoint resumes exactly. After every run the
tables are rewritten in RESULTS_DIR (default the work directory): ``results.csv``, ``results.md``,
``curves.png`` (accuracy per epoch, mean over seeds) and, for CMT-KD runs, ``fusion.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from benchmarks._common import REPO, default_cifar10_root
from benchmarks.suites import DATASETS, SCALES, SUITES, Run, Scale, Suite, rescale
from kdtoolkit.config.toml_write import value as toml_value

EXAMPLES = REPO / "examples"
STATE = "suite.json"
#: effective multiply-accumulates per second assumed for estimates (stated in every estimate)
CPU_MACS = 9e10     # WRN-16-1 trains at ~1,100 img/s in bf16 on 2 cores (benchmarks/RESULTS.md)
GPU_MACS = 2e13     # ~40 TFLOP/s of bf16 convolution sustained on one A100-class GPU


def plan(suite: Suite, selected: list[str] | None, seeds: int) -> list[tuple[Run, int]]:
    """(run, seed) jobs in dependency order: runs other runs load come first, with seed 0."""
    by_id = {r.id: r for r in suite.runs}
    wanted = list(by_id) if selected is None else selected
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        raise SystemExit(f"error: --runs: unknown run {', '.join(map(repr, unknown))} in suite {suite.name!r}; runs: {', '.join(by_id)}")
    closure: list[str] = []

    def add(rid: str) -> None:
        run = by_id[rid]
        deps = list(run.needs.values())
        if suite.warm_start_from and rid != suite.warm_start_from:
            deps.append(suite.warm_start_from)
        for dep in deps:
            if dep not in closure:
                add(dep)
        if rid not in closure:
            closure.append(rid)

    for rid in wanted:
        add(rid)
    sources = sources_of(suite)
    jobs = []
    for rid in closure:
        run = by_id[rid]
        n = 1 if (run.once or (rid in sources and rid not in wanted)) else seeds
        jobs.extend((run, seed) for seed in range(n))
    # the runs others depend on first (seed 0), then everything else in suite order
    return sorted(jobs, key=lambda j: (0 if j[0].id in sources and j[1] == 0 else 1, closure.index(j[0].id), j[1]))


def sources_of(suite: Suite) -> set[str]:
    out = {dep for r in suite.runs for dep in r.needs.values()}
    if suite.warm_start_from:
        out.add(suite.warm_start_from)
    return out


def job_dir(work: Path, run: Run, seed: int) -> Path:
    return work / f"{run.id}-s{seed}"


def pipeline_for(suite: Suite, run: Run, seed: int, scale: Scale, *, dataset: str, work: Path, root: str | None) -> tuple[dict, list[str]]:
    """The run's pipeline (plain dict) and the ``--set`` overrides that turn the example into it."""
    if dataset not in run.examples:
        raise SystemExit(f"error: run {run.id!r} of suite {suite.name!r} has no {dataset} pipeline; it has {', '.join(run.examples)}")
    example = tomllib.loads((EXAMPLES / run.examples[dataset]).read_text())
    raw = rescale(example, scale, dataset=dataset, source=run.id in sources_of(suite))
    for spec in raw.get("models", {}).values():
        if run.overrides.get("quantizer_name") and isinstance(spec.get("quantizer"), dict):
            spec["quantizer"]["name"] = run.overrides["quantizer_name"]
    for model, dep in run.needs.items():
        raw["models"][model]["checkpoint"] = str(job_dir(work, _run(suite, dep), 0))
    if scale.warm_start and suite.warm_start_from and run.id != suite.warm_start_from:
        source = str(job_dir(work, _run(suite, suite.warm_start_from), 0))
        for spec in raw["models"].values():
            if spec.get("quantizer") and not spec.get("frozen") and not spec.get("checkpoint"):
                spec["checkpoint"], spec["checkpoint_model"] = source, _student_of(suite, suite.warm_start_from, scale, dataset)
    out = job_dir(work, run, seed)
    raw["run"].update(seed=seed, name=out.name, output_dir=str(out), progress="off")
    if root:
        raw["data"]["root"] = root
    if raw["data"].get("name") != "imagenet":
        raw["data"]["download"] = False if root else raw["data"].get("download", False)
    return raw, overrides_between(example, raw)


def _run(suite: Suite, rid: str) -> Run:
    return next(r for r in suite.runs if r.id == rid)


def _student_of(suite: Suite, rid: str, scale: Scale, dataset: str) -> str:
    example = tomllib.loads((EXAMPLES / _run(suite, rid).examples[dataset]).read_text())
    models = example.get("models", {})
    return next((n for n, s in models.items() if s.get("role", "student") == "student"), next(iter(models)))


def overrides_between(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``--set`` strings that turn ``old`` into ``new`` (tables replaced whole when keys disappear)."""
    out = []
    for key in new:
        path = f"{prefix}{key}"
        if isinstance(new[key], dict) and isinstance(old.get(key), dict) and set(old[key]) <= set(new[key]):
            out += overrides_between(old[key], new[key], path + ".")
        elif old.get(key) != new[key]:
            out.append(f"{path}={toml_value(new[key])}")
    return out


def macs_per_step(raw: dict) -> tuple[float, int, int]:
    """(multiply-accumulates per training image: 3x forward for trained models, 1x for frozen ones,
    training images per epoch, test images) for one pipeline, from a forward of one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kdtoolkit import Pipeline

    probe = json.loads(json.dumps(raw))
    pipe = Pipeline(probe)  # structures the options; nothing is loaded or built
    size = 224 if probe["data"].get("name") == "imagenet" else 32
    total = 0.0
    for name, spec in raw["models"].items():
        cfg = pipe.config.models[name]
        model = pipe.registry.get("model", cfg.name).factory(cfg.options, num_classes=100)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
        total += counter.get_total_flops() / 2 * (1 if spec.get("frozen") else 3)
    train = {"cifar10": 50000, "cifar100": 50000, "imagenet": 1281167}.get(probe["data"]["name"], 50000)
    test = {"imagenet": 50000}.get(probe["data"]["name"], 10000)
    train = min(train, probe["data"].get("train_size") or train)
    return total, train, min(test, probe["data"].get("test_size") or test)


def estimate(jobs: list[tuple[dict, Run, int]]) -> float:
    """Multiply-accumulates of all jobs (training steps plus one evaluation per epoch)."""
    total = 0.0
    for raw, _, _ in jobs:
        per_image, train, test = macs_per_step(raw)
        epochs = raw["run"]["epochs"]
        steps = raw["run"].get("max_steps_per_epoch")
        images = min(train, steps * raw["data"].get("batch_size", 128)) if steps else train
        total += epochs * (per_image * images + per_image / 3 * test)
    return total


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_state(work: Path) -> dict:
    path = work / STATE
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def save_state(work: Path, state: dict) -> None:
    tmp = work / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, work / STATE)


def run_suite(suite: Suite, args) -> Path:
    from benchmarks.suite_report import write_report
    from kdtoolkit import Pipeline

    scale = SCALES[args.scale]
    selected = None if args.runs in (None, "all") else args.runs.split(",")
    if selected is None and args.runs is None and args.scale == "mini" and suite.mini_runs:
        selected = list(suite.mini_runs)
    work = Path(args.work_dir or f"runs/suites/{suite.name}-{args.scale}-{args.dataset}")
    results = Path(args.results_dir) if args.results_dir else work
    # smoke runs on the small exact subset beside the repository; the other scales need the whole
    # dataset: --data-root, $KDTOOLKIT_DATA, or the download/cache the example pipelines use
    root = args.data_root or os.environ.get("KDTOOLKIT_DATA") or (
        default_cifar10_root() if args.dataset == "cifar10" and scale.name == "smoke" else None)
    jobs = [(*pipeline_for(suite, run, seed, scale, dataset=args.dataset, work=work, root=root), run, seed)
            for run, seed in plan(suite, selected, args.seeds)]
    costs = [estimate([(raw, run, seed)]) for raw, _, run, seed in jobs]
    macs = sum(costs)
    print(f"suite {suite.name} ({suite.title}), scale {scale.name}: {len(jobs)} runs, {args.seeds} seed(s), {args.dataset}")
    print(f"  {scale.why}")
    if scale.name == "paper":
        print(f"  estimate: {macs / GPU_MACS / 3600:.1f} GPU-hours (assumes {GPU_MACS * 2 / 1e12:.0f} TFLOP/s sustained: an A100-class GPU; "
              f"data loading not counted), {macs / CPU_MACS / 3600:.0f} h on 2 CPU cores")
    else:
        print(f"  estimate: {hours(macs / CPU_MACS)} on 2 CPU cores (assumes {CPU_MACS / 1e9:.0f} GMAC/s; QAT adds 5-25%)")
    if args.estimate:
        return results
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    state = load_state(work)
    commit = git_commit()
    # every commit the suite's runs were trained at (an interrupted suite may continue at a later one)
    commits = state.setdefault("commits", [state["commit"]] if "commit" in state else [])
    state.update(suite=suite.name, scale=scale.name, dataset=args.dataset, seeds=args.seeds, commit=commit,
                 command="python -m benchmarks.suite " + shlex.join(args.argv))
    save_state(work, state)
    done_macs, spent = 0.0, 0.0
    for i, (raw, overrides, run, seed) in enumerate(jobs, 1):
        key = job_dir(work, run, seed).name
        job_macs = costs[i - 1]
        if state["runs"].get(key, {}).get("done"):
            print(f"[{i}/{len(jobs)}] {key}: done earlier")
            continue
        rate = done_macs / spent if spent > 0 else CPU_MACS if scale.name != "paper" else GPU_MACS
        left = sum(c for c, (_, _, ru, s) in zip(costs[i - 1:], jobs[i - 1:]) if not state["runs"].get(job_dir(work, ru, s).name, {}).get("done"))
        print(f"[{i}/{len(jobs)}] {key}: {run.label}, seed {seed} (ETA of the suite {hours(left / rate)})", flush=True)
        if commit not in commits:
            commits.append(commit)
        resume = (job_dir(work, run, seed) / "checkpoints" / "last.safetensors").is_file()
        start = time.perf_counter()
        result = Pipeline.from_dict(raw).fit(resume=resume)
        seconds = time.perf_counter() - start
        spent += seconds
        done_macs += job_macs
        state["runs"][key] = {
            "run": run.id, "seed": seed, "done": True, "commit": commit, "seconds": seconds + state["runs"].get(key, {}).get("seconds", 0.0),
            "best_metric": (result.get("best") or {}).get("metric"), "example": run.examples[args.dataset],
            "overrides": overrides, "command": f"kdtoolkit run examples/{run.examples[args.dataset]} "
                                               + " ".join(f"--set {shlex.quote(o)}" for o in overrides),
        }
        save_state(work, state)
        write_report(suite, state, work, results)
        best = result.get("best") or {}
        print(f"    best {best.get('metric')} = {best.get('value', float('nan')):.2f} in {hours(seconds)}", flush=True)
    write_report(suite, state, work, results)
    print(f"tables: {results / 'results.md'}, {results / 'results.csv'}")
    return results


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=[*SUITES, "all"])
    p.add_argument("--scale", choices=list(SCALES), default="mini")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--runs", default=None, help="comma-separated run ids, or 'all' (default: all; the mini scale's core set where a suite has one)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--estimate", action="store_true", help="print the plan and the time estimate, then stop")
    args = p.parse_args(argv)
    args.argv = argv
    suites = list(SUITES.values()) if args.suite == "all" else [SUITES[args.suite]]
    if len(suites) > 1 and (args.work_dir or args.results_dir):
        for s in suites:
            sub = argparse.Namespace(**vars(args))
            sub.work_dir = args.work_dir and str(Path(args.work_dir) / s.name)
            sub.results_dir = args.results_dir and str(Path(args.results_dir) / s.name)
            run_suite(s, sub)
        return
    for s in suites:
        run_suite(s, args)


if __name__ == "__main__":
    main()
