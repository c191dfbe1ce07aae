"""`make reproduce-tables`: run the studies of a profile, then rebuild every table and figure from the
run folders (never from numbers typed by hand).

Studies: ``methods`` (main metric per task x method, mean +- std over seeds, parameters in use, time),
``initial_rank`` (GeoLoRA from several initial ranks: parameters in use and validation metric over
training, the paper's Figure 2a/b) and ``robustness`` (learning rate x rank budget, GeoLoRA vs AdaLoRA,
diverged runs shown as nan, Figure 2c/d). Every study is one or more Hydra multiruns of ``run.py``
(``--hydra hydra/launcher=...`` sends them to a cluster); each run lands in
``results/runs/<profile>/<study>/<its swept overrides>/`` and is skipped when the command is run again.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .records import finished_summary

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Study:
    name: str
    kind: str  # methods | initial_rank | robustness
    axes: dict[str, str]  # what a table or figure groups by -> the override key that sets it
    sweeps: list[list[str]]  # one Hydra multirun each: overrides, "key=a,b" sweeps over a and b


def _sweep_command(study: Study, sweep: list[str], study_dir: Path, hydra_args: list[str]) -> list[str]:
    """``run.py -m`` for one sweep; each run lands in ``study_dir/<axis overrides>`` (e.g.
    ``method=lora,seed=0,task=movie_reviews``), so a rerun finds and skips the finished ones."""
    keys = {override.split("=", 1)[0] for override in sweep} | {"progress", "skip_finished"}
    not_in_name = sorted(keys - set(study.axes.values()))
    return [sys.executable, str(ROOT / "run.py"), "-m", *sweep, "progress=false", "skip_finished=true",
            f"hydra.sweep.dir={study_dir}", "hydra.sweep.subdir=${hydra.job.override_dirname}",
            f"hydra.job.config.override_dirname.exclude_keys=[{','.join(not_in_name)}]", *hydra_args]


def _axis(name: str, values) -> str:
    return f"{name}={','.join(str(v) for v in values)}"


def profile(name: str) -> list[Study]:
    """The studies of a profile. ``paper`` needs a GPU and the hub; ``offline`` runs here in < 90 min;
    ``smoke`` runs every study on tiny budgets in a few minutes (used by the tests)."""
    methods = {"method": "method", "task": "task", "seed": "seed"}
    initial_rank = {"method": "method", "init_rank": "method.init_rank", "seed": "seed"}
    robustness = {"method": "method", "lr": "trainer.lr", "budget": "method.rank_budget", "seed": "seed"}
    all_methods = _axis("method", ["lora", "adalora", "geolora"])
    if name == "paper":
        glue = [f"glue/{t}" for t in ("mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb")]
        fig2 = ["model=vit", "task=cifar10", "trainer.batch_size=256", "trainer.epochs=5", "logger=none"]
        grid = [_axis("trainer.lr", [1e-1, 1e-2, 1e-3, 1e-4]),
                _axis("method.rank_budget", [100, 200, 300, 400, 500, 600]), _axis("seed", range(3))]
        return [
            Study("glue", "methods", methods, [["model=deberta", "logger=none", _axis("task", glue), all_methods,
                                                _axis("seed", range(5))]]),
            Study("vit", "methods", methods, [["model=vit", "logger=none", "task=cifar10,cifar100,tiny_imagenet",
                                               all_methods, _axis("seed", range(3))]]),
            Study("initial_rank", "initial_rank", initial_rank, [fig2 + [
                "method=geolora", _axis("method.init_rank", [2, 4, 8, 16, 32, 64]), "method.max_rank=64",
                _axis("seed", range(4)), "trainer.lr=1e-3", "method.coefficient_steps=50", "method.tau=0.15"]]),
            Study("robustness", "robustness", robustness, [
                fig2 + grid + ["method=geolora", "method.init_rank=16", "method.max_rank=32"],
                fig2 + grid + ["method=adalora", "method.init_rank=16"]]),
        ]
    if name == "offline":
        small = ["task.max_train_samples=2000", "trainer.epochs=1", "logger=none"]
        grid = small + [_axis("trainer.lr", [5e-2, 1e-2, 2e-3, 5e-4]), _axis("method.rank_budget", [72, 144, 288]),
                        _axis("seed", range(3))]
        return [
            Study("initial_rank", "initial_rank", initial_rank, [small + [
                "method=geolora", _axis("method.init_rank", [2, 4, 8, 16, 32]), "method.max_rank=32", "seed=0",
                "trainer.eval_every=16"]]),
            Study("robustness", "robustness", robustness, [
                grid + ["method=geolora", "method.init_rank=8", "method.max_rank=16"],
                grid + ["method=adalora", "method.init_rank=16", "method.tinit=6", "method.tfinal=20"]]),
            Study("movie_reviews", "methods", methods, [["model=minilm", "logger=none", "task=movie_reviews",
                                                          all_methods, _axis("seed", range(3))]]),
        ]
    if name == "smoke":
        tiny = ["model=minilm", "task=movie_reviews", "task.max_train_samples=48", "task.max_eval_samples=32",
                "trainer.batch_size=8", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.log_every=3",
                "logger=none", "method.tinit=1", "method.tfinal=1", "method.delta_t=1"]
        grid = tiny + ["trainer.lr=1e-2,1e3", "method.rank_budget=36,72", "seed=0", "method.init_rank=4"]
        return [
            Study("methods", "methods", methods, [tiny + [all_methods, "seed=0,1"]]),
            Study("initial_rank", "initial_rank", initial_rank, [tiny + [
                "method=geolora", "method.init_rank=2,8", "method.max_rank=8", "seed=0"]]),
            Study("robustness", "robustness", robustness, [grid + ["method=geolora"], grid + ["method=adalora"]]),
        ]
    raise ValueError(f"unknown profile {name!r}: use smoke, offline or paper")


# ---------------------------------------------------------------- running

def run_studies(profile_name: str, studies: list[Study], runs_root: Path, hydra_args: list[str],
                dry_run: bool = False) -> list[str]:
    """Launch every sweep of every study (finished runs are skipped by run.py); returns the failed sweeps.
    A failed run does not stop the others: Hydra finishes the sweep, then reports the failure."""
    failed = []
    for study in studies:
        for sweep in study.sweeps:
            command = _sweep_command(study, sweep, runs_root / profile_name / study.name, hydra_args)
            if dry_run:
                print(shlex.join(command))
                continue
            log.info("sweep %s: %s", study.name, " ".join(sweep))
            if subprocess.run(command, cwd=ROOT).returncode != 0:
                failed.append(f"{study.name}: {' '.join(sweep)}")
    return failed


# ---------------------------------------------------------------- reading

def _value(text: str):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def collect(study: Study, study_dir: Path) -> list[tuple[dict, dict, Path]]:
    """(point, summary, run folder) of every finished or diverged run of a study; the point holds the
    study's axes as the run's Hydra overrides (``.hydra/overrides.yaml``) set them."""
    import yaml

    by_key = {key: axis for axis, key in study.axes.items()}
    out = []
    for summary_file in sorted(study_dir.rglob("summary.json")):
        run_dir = summary_file.parent
        summary = finished_summary(run_dir)
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        if summary is None or not overrides_file.is_file():
            continue
        pairs = (o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text()))
        point = {by_key[key]: _value(value) for key, value in pairs if key in by_key}
        out.append((point, summary, run_dir))
    return out


def final_metric(summary: dict) -> float:
    """The run's final main metric; nan when it diverged or never evaluated."""
    value = summary.get("final", {}).get(summary["main_metric"])
    return float("nan") if summary.get("diverged") or value is None else float(value)


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "nan"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def paper_value(paper: dict, study: str, task: str, method: str) -> str:
    value = paper.get("tables", {}).get(study, {}).get(task, {}).get(method)
    return "—" if value is None else f"{value}"


# ---------------------------------------------------------------- tables and figures

RESULT_COLUMNS = ["ours (mean ± std)", "seeds", "diverged", "params in use", "time / run (s)"]


def _results(summaries: list[dict]) -> list[str]:
    """The RESULT_COLUMNS cells of a group of runs (one per seed): final metric, counts, means."""
    return [_mean_std([final_metric(s) for s in summaries]), str(len(summaries)),
            str(sum(bool(s.get("diverged")) for s in summaries)),
            f"{statistics.mean(s['trainable_params_final'] for s in summaries):,.0f}",
            f"{statistics.mean(s['total_time_s'] for s in summaries):.0f}"]


def _grouped(runs: list, *axes: str) -> list[tuple[tuple, list[dict]]]:
    """Summaries grouped by the values of ``axes`` (seeds pooled), sorted."""
    groups: dict[tuple, list] = {}
    for point, summary, _ in runs:
        groups.setdefault(tuple(point[a] for a in axes), []).append(summary)
    return sorted(groups.items())


def _tables(header: list[str], rows: list[list[str]], text_columns: int) -> tuple[str, str]:
    """The same table as Markdown and as a LaTeX tabular (booktabs)."""
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    latex = ("\\begin{tabular}{" + "l" * text_columns + "r" * (len(header) - text_columns) + "}\n\\toprule\n"
             + "".join(" & ".join(_latex(c) for c in r) + " \\\\\n" + ("\\midrule\n" if r is header else "")
                       for r in [header, *rows])
             + "\\bottomrule\n\\end{tabular}\n")
    return markdown, latex


def _latex(cell: str) -> str:
    return cell.replace("±", "$\\pm$").replace("_", "\\_").replace("—", "--")


def methods_table(study: str, runs: list, paper: dict) -> tuple[str, str]:
    """Main metric per task x method (mean ± std over seeds) beside the paper's, params, time."""
    header = ["task", "method", "metric", RESULT_COLUMNS[0], "paper", *RESULT_COLUMNS[1:]]
    rows = []
    for (task, method), summaries in _grouped(runs, "task", "method"):
        ours, *rest = _results(summaries)
        rows.append([task, method, summaries[0]["main_metric"].removeprefix("eval/"), ours,
                     paper_value(paper, study, task, method), *rest])
    return _tables(header, rows, text_columns=3)


def _curves(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in a run's metrics.jsonl (nan where a value is missing)."""
    steps, values = [], []
    for line in open(run_dir / "metrics.jsonl", encoding="utf-8"):
        record = json.loads(line)
        if key in record:
            steps.append(record["step"])
            values.append(float("nan") if record[key] is None else record[key])
    return steps, values


def _mean_curve(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    length = min(len(c[0]) for c in curves)
    return curves[0][0][:length], [statistics.mean(c[1][i] for c in curves) for i in range(length)]


def initial_rank_figure(runs: list, out_png: Path) -> tuple[str, str]:
    """Parameters in use and validation metric over training, one line per initial rank (mean over seeds);
    returns the table of final results per initial rank."""
    from .plots import plt

    by_rank: dict[int, list] = {}
    for point, _, run_dir in runs:
        by_rank.setdefault(point["init_rank"], []).append(run_dir)
    metric = runs[0][1]["main_metric"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for rank, run_dirs in sorted(by_rank.items()):
        param_steps, params = _mean_curve([_curves(d, "trainable_params") for d in run_dirs])
        metric_steps, values = _mean_curve([_curves(d, metric) for d in run_dirs])
        left.plot(param_steps, params, marker=".", label=f"init rank {rank}")
        right.plot(metric_steps, values, marker=".", label=f"init rank {rank}")
    left.set(xlabel="step", ylabel="trainable parameters in use", title="parameters in use")
    right.set(xlabel="step", ylabel=metric, title="validation metric")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    rows = [[str(rank), *_results(summaries)] for (rank,), summaries in _grouped(runs, "init_rank")]
    return _tables(["initial rank", *RESULT_COLUMNS], rows, text_columns=1)


def robustness_figure(runs: list, out_png: Path) -> tuple[str, str]:
    """Final metric over learning rate x rank budget, one heatmap per method; diverged cells are nan.
    Returns the grids as Markdown followed by the full table (also as LaTeX)."""
    import numpy as np

    from .plots import plt

    methods = sorted({p["method"] for p, _, _ in runs})
    lrs = sorted({p["lr"] for p, _, _ in runs}, reverse=True)
    budgets = sorted({p["budget"] for p, _, _ in runs})
    cells: dict[tuple, list] = {}
    for point, summary, _ in runs:
        cells.setdefault((point["method"], point["lr"], point["budget"]), []).append(final_metric(summary))
    rows = ["| method | lr | " + " | ".join(f"budget {b}" for b in budgets) + " |",
            "|---|---|" + "---|" * len(budgets)]
    grids = {}
    for method in methods:
        grid = grids[method] = np.full((len(lrs), len(budgets)), np.nan)
        for i, lr in enumerate(lrs):
            for j, budget in enumerate(budgets):
                values = cells.get((method, lr, budget), [])
                if values and not any(math.isnan(v) for v in values):
                    grid[i, j] = statistics.mean(values)
            rows.append(f"| {method} | {lr:g} | " + " | ".join("nan" if math.isnan(v) else f"{v:.4f}"
                                                               for v in grid[i]) + " |")
    finite = [v for grid in grids.values() for v in grid.flat if not math.isnan(v)]
    low = min(finite, default=0.0)  # one colour scale for every panel, so cells compare across methods
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")  # diverged cells
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = grids[method]
        ax.imshow(grid, vmin=low, vmax=max(finite, default=1.0), cmap=cmap)
        for i, j in itertools.product(range(len(lrs)), range(len(budgets))):
            diverged = np.isnan(grid[i, j])
            ax.text(j, i, "nan" if diverged else f"{grid[i, j]:.3f}", ha="center", va="center",
                    color="black" if diverged else "white", fontsize=8)
        ax.set(xticks=range(len(budgets)), xticklabels=budgets, yticks=range(len(lrs)),
               yticklabels=[f"{lr:g}" for lr in lrs], xlabel="rank budget", ylabel="learning rate", title=method)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    detail = [[method, f"{lr:g}", str(budget), *_results(summaries)]
              for (method, lr, budget), summaries in _grouped(runs, "method", "lr", "budget")]
    markdown, latex = _tables(["method", "lr", "rank budget", *RESULT_COLUMNS], detail, text_columns=3)
    return "\n".join(rows) + "\n\n" + markdown, latex


def aggregate(profile_name: str, studies: list[Study], runs_root: Path, out: Path, paper: dict) -> list[Path]:
    """Rebuild every table (Markdown + LaTeX) and figure (PNG) of the profile from its run folders."""
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    written = []
    for study in studies:
        runs = collect(study, runs_root / profile_name / study.name)
        if not runs:
            log.warning("study %s has no finished runs", study.name)
            continue
        stem = f"{profile_name}_{study.name}"
        sources = "\n".join(f"- {os.path.relpath(r, out)}" for _, _, r in runs)
        if study.kind == "methods":
            markdown, latex = methods_table(study.name, runs, paper)
        else:
            draw = initial_rank_figure if study.kind == "initial_rank" else robustness_figure
            markdown, latex = draw(runs, out / "figures" / f"{stem}.png")
            written.append(out / "figures" / f"{stem}.png")
        (out / "tables" / f"{stem}.tex").write_text(latex)
        written.append(out / "tables" / f"{stem}.tex")
        (out / "tables" / f"{stem}.md").write_text(f"# {profile_name}: {study.name}\n\n{markdown}\n"
                                                   f"Built from these run folders:\n{sources}\n")
        written.append(out / "tables" / f"{stem}.md")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a profile's studies and rebuild its tables and figures.")
    parser.add_argument("--profile", default="offline", choices=["smoke", "offline", "paper"])
    parser.add_argument("--out", default=str(ROOT / "results"), help="tables/ and figures/ go here")
    parser.add_argument("--runs", default=None, help="run folders (default: <out>/runs)")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild tables and figures")
    parser.add_argument("--dry-run", action="store_true", help="print the run.py -m commands, run nothing")
    parser.add_argument("--hydra", nargs="*", default=[], metavar="OVERRIDE",
                        help="extra overrides for every sweep, e.g. hydra/launcher=submitit_slurm trainer.device=cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    runs_root = Path(args.runs) if args.runs else out / "runs"
    studies = profile(args.profile)
    failed = [] if args.aggregate_only else run_studies(args.profile, studies, runs_root, args.hydra, args.dry_run)
    if args.dry_run:
        return
    paper = json.loads((ROOT / "results" / "paper_numbers.json").read_text())
    for path in aggregate(args.profile, studies, runs_root, out, paper):
        print(path)
    if failed:  # the tables above hold every run that did finish
        sys.exit(f"error: {len(failed)} sweep(s) had failed runs (their summary.json says why; rerun to retry "
                 f"them): {'; '.join(failed)}")


if __name__ == "__main__":
    main()
