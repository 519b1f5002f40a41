"""Tables and plots of a suite's finished runs (``benchmarks/suite.py`` calls ``write_report``).

``results.csv``: one row per run and seed (best and last value of the run's metric, its best epoch,
wall time, images/s, the example and the ``--set`` overrides that reproduce it). ``results.md``: one
row per setting, mean ± sample std over seeds beside the paper's figure, then the protocol (commit,
command, scale). ``curves.png``: the metric per epoch, mean over seeds, one line per setting.
``fusion.png``: CMT-KD's importance weights over training (seed 0), when a run logged them.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

from benchmarks.suites import SCALES, Suite

FUSION_KEY = re.compile(r"^fusion/(?P<stage>[^/]+)/(?P<teacher>.+)$")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a partial last line of an interrupted run
    return rows


def _metric_of(rows: list[dict], wanted: str | None, recorded: str | None) -> str | None:
    if wanted:
        return wanted
    if recorded:
        return recorded
    keys = [k for row in rows for k in row if k.startswith("test/") and k.endswith("/top1")]
    return keys[0] if keys else None


def collect(suite: Suite, state: dict, work: Path) -> list[dict]:
    """One record per finished (run, seed) and table row."""
    out = []
    for key, info in state.get("runs", {}).items():
        if not info.get("done"):
            continue
        run = next((r for r in suite.runs if r.id == info["run"]), None)
        if run is None:
            continue
        rows = read_rows(work / key)
        series = [(run.label, run.metric, run.paper)] + list(run.rows)
        for label, wanted, paper in series:
            metric = _metric_of(rows, wanted, info.get("best_metric"))
            values = [(r["epoch"], r[metric]) for r in rows if metric and isinstance(r.get(metric), (int, float))]
            if not values:
                continue
            best_epoch, best = max(values, key=lambda ev: ev[1])
            speeds = [r["train/images_per_s"] for r in rows if isinstance(r.get("train/images_per_s"), (int, float))]
            out.append({
                "setting": label, "run": run.id, "seed": info["seed"], "metric": metric, "best": best, "best_epoch": best_epoch,
                "last": values[-1][1], "last_epoch": values[-1][0], "paper": paper,
                "seconds": info.get("seconds"), "images_per_s": statistics.fmean(speeds) if speeds else None,
                "example": info.get("example"), "overrides": " ".join(info.get("overrides", [])), "curve": values,
                "rows": rows if label == run.label else [],
            })
    return out


#: two-sided 95% quantiles of Student's t for 1-30 degrees of freedom (above 30: 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def welch(a: list[float], b: list[float]) -> dict | None:
    """Welch's t-test of mean(a) - mean(b): the difference, its standard error, t, the
    Welch-Satterthwaite degrees of freedom and the 95% critical value (at floor(df): conservative).
    None with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"diff": diff, "se": 0.0, "t": math.copysign(math.inf, diff) if diff else 0.0, "df": math.inf, "critical": 1.96}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    k = int(math.floor(df))
    critical = T975[k - 1] if 1 <= k <= len(T975) else 1.96
    return {"diff": diff, "se": se, "t": diff / se, "df": df, "critical": critical}


def verdict(test: dict | None) -> str:
    if test is None:
        return "not testable (one seed on a side)"
    separated = abs(test["t"]) > test["critical"]
    if test["diff"] > 0:
        return "**agrees**: separated beyond the seed spread (p < 0.05)" if separated else "same sign, within the seed spread"
    return "**disagrees**: the reverse, beyond the seed spread (p < 0.05)" if separated else "reverse sign, within the seed spread"


def claims_table(suite: Suite, records: list[dict]) -> list[str]:
    """The paper's orderings tested on our last-epoch top-1 (no choice of epoch on the test set)."""
    if not suite.claims:
        return []
    last = {}
    for r in records:
        last.setdefault(r["setting"], []).append(r["last"])
    paper = {r["setting"]: r["paper"] for r in records}
    lines = ["", "## The paper's orderings against our seeds", "",
             "Each row is an ordering the paper reports (better > worse). Ours: difference of the mean last-epoch "
             "top-1 ± its standard error, Welch's t with its degrees of freedom, and whether it exceeds the two-sided "
             "95% critical value (at the floored degrees of freedom). \"Smallest separable\" is the difference this "
             "seed spread could have shown (critical value × standard error).", "",
             "| paper's ordering | paper Δ | our Δ (last) | t (df) | smallest separable | verdict |",
             "|---|---|---|---|---|---|"]
    for better, worse in suite.claims:
        if better not in last or worse not in last:
            lines.append(f"| {better} > {worse} | - | not run | - | - | - |")
            continue
        p_better, p_worse = paper.get(better), paper.get(worse)
        p_diff = "-" if p_better is None or p_worse is None else f"{p_better - p_worse:+.1f}"
        test = welch(last[better], last[worse])
        if test is None:
            diff = statistics.fmean(last[better]) - statistics.fmean(last[worse])
            lines.append(f"| {better} > {worse} | {p_diff} | {diff:+.2f} | - | - | {verdict(None)} |")
            continue
        lines.append(f"| {better} > {worse} | {p_diff} | {test['diff']:+.2f} ± {test['se']:.2f} | {test['t']:+.2f} ({test['df']:.1f}) | "
                     f"{test['critical'] * test['se']:.2f} | {verdict(test)} |")
    return lines


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def write_report(suite: Suite, state: dict, work: Path, results: Path) -> None:
    records = collect(suite, state, work)
    results.mkdir(parents=True, exist_ok=True)
    fields = ["setting", "run", "seed", "metric", "best", "best_epoch", "last", "last_epoch", "paper", "seconds", "images_per_s",
              "example", "overrides"]
    tmp = results / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    tmp.replace(results / "results.csv")

    order = []
    for r in records:
        if r["setting"] not in order:
            order.append(r["setting"])
    order.sort(key=lambda s: [i for i, run in enumerate(suite.runs) if s == run.label or s in [x[0] for x in run.rows]][:1] or [99])
    scale = SCALES.get(state.get("scale", ""), None)
    lines = [f"# {suite.title}", "",
             f"Scale `{state.get('scale')}` on {state.get('dataset')}, {state.get('seeds')} seed(s). Paper column: {suite.paper_setting}.", "",
             "| setting | seeds | best top-1 (mean ± std) | last top-1 | best epoch | paper | wall time / run | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for setting in order:
        rs = [r for r in records if r["setting"] == setting]
        paper = rs[0]["paper"]
        secs = [r["seconds"] for r in rs if r["seconds"]]
        speeds = [r["images_per_s"] for r in rs if r["images_per_s"]]
        lines.append(
            f"| {setting} | {len(rs)} | {_mean_std([r['best'] for r in rs])} | {_mean_std([r['last'] for r in rs])} | "
            f"{'/'.join(str(r['best_epoch']) for r in rs)} | {'-' if paper is None else f'{paper:.2f}'} | "
            f"{(statistics.fmean(secs) / 60 if secs else math.nan):.1f} min | {(statistics.fmean(speeds) if speeds else math.nan):.0f} |")
    lines += claims_table(suite, records)
    lines += ["", "## Protocol", "",
              "- commit" + ("s (the suite was continued at a later commit)" if len(state.get("commits") or []) > 1 else "") + ": "
              + ", ".join(f"`{c}`" for c in (state.get("commits") or [state.get("commit")])),
              f"- command: `{state.get('command')}`",
              f"- scale: {scale.why if scale else state.get('scale')}",
              "- each run: the example pipeline with the `--set` overrides listed in `results.csv` "
              "(the `command` column of `suite.json` reproduces a single run)",
              "- std is the sample standard deviation over seeds; best = the highest value over epochs, last = the final epoch"]
    tmp = results / "results.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(results / "results.md")
    _plots(order, records, results)


def _plots(order: list[str], records: list[dict], results: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return  # tables only without matplotlib
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for setting in order:
        curves: dict[int, list[float]] = {}
        for r in records:
            if r["setting"] == setting:
                for epoch, value in r["curve"]:
                    curves.setdefault(epoch, []).append(value)
        if curves:
            xs = sorted(curves)
            ax.plot(xs, [statistics.fmean(curves[x]) for x in xs], marker="o", markersize=3, label=setting)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    FigureCanvasAgg(fig).print_png(str(results / "curves.png"))

    fusion = [r for r in records if r["seed"] == 0 and any(FUSION_KEY.match(k) for row in r["rows"] for k in row)]
    if not fusion:
        return
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in fusion[:1]:
        for row in r["rows"]:
            for key, value in row.items():
                m = FUSION_KEY.match(key)
                if m and isinstance(value, (int, float)):
                    panels.setdefault(m["stage"], {}).setdefault(m["teacher"], []).append((row["epoch"], value))
    fig = Figure(figsize=(3.2 * len(panels), 3.2))
    for i, (stage, teachers) in enumerate(sorted(panels.items())):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for teacher, pts in teachers.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=teacher)
        ax.set_title(f"{fusion[0]['setting']}: {stage}", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(results / "fusion.png"))
