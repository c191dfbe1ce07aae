"""`make reproduce-tables`: run the studies of a profile, then rebuild every table and figure from the
run folders (never from numbers typed by hand).

Studies: ``methods`` (main metric per task x method, mean +- std over seeds, parameters in use, time),
``initial_rank`` (GeoLoRA from several initial ranks: parameters in use and validation metric over
training, the paper's Figure 2a/b) and ``robustness`` (learning rate x rank budget, GeoLoRA vs AdaLoRA,
diverged runs shown as nan, Figure 2c/d). Each run lands in ``results/runs/<profile>/<study>/<run>/`` with
the ``point.json`` it was made for; finished runs are skipped when the command is run again.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
DONE = ("finished", "diverged")
ADALORA_GRID_INIT_RANK = 16  # the paper's AdaLoRA init r in the robustness study (Figure 2c/d)


@dataclass
class Study:
    name: str
    kind: str  # methods | initial_rank | robustness
    points: list[dict]  # one per run: axis values (method, task, seed, lr, budget, init_rank, ...)
    base: list[str]  # overrides shared by every run of the study

    def overrides(self, point: dict) -> list[str]:
        out = list(self.base) + [f"method={point['method']}", f"seed={point['seed']}"]
        if "task" in point:
            out.append(f"task={point['task']}")
        if "init_rank" in point:
            out += [f"method.init_rank={point['init_rank']}", f"method.max_rank={max(point['init_rank'], point['max_rank'])}"]
        if "lr" in point:
            out.append(f"trainer.lr={point['lr']}")
        if "budget" in point:
            if point["method"] == "adalora":  # AdaLoRA's budget is its average rank per layer
                out += [f"method.target_r={max(1, round(point['budget'] / point['layers']))}",
                        f"method.init_rank={ADALORA_GRID_INIT_RANK}"]
            else:
                out.append(f"method.rank_budget={point['budget']}")
        return out


def run_id(point: dict) -> str:
    skip = ("layers", "max_rank")
    return ",".join(f"{k}={v}" for k, v in point.items() if k not in skip).replace("/", "-")


def _grid(**axes) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def profile(name: str) -> list[Study]:
    """The studies of a profile. ``paper`` needs a GPU and the hub; ``offline`` runs here in < 90 min;
    ``smoke`` runs every study on tiny budgets in a few minutes (used by the tests)."""
    if name == "paper":
        glue = [f"glue/{t}" for t in ("mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb")]
        fig2 = ["model=vit", "task=cifar10", "trainer.batch_size=256", "trainer.epochs=5", "logger=none"]
        return [
            Study("glue", "methods", _grid(task=glue, method=["lora", "adalora", "geolora"], seed=range(5)),
                  ["model=deberta", "logger=none"]),
            Study("vit", "methods", _grid(task=["cifar10", "cifar100", "tiny_imagenet"],
                                          method=["lora", "adalora", "geolora"], seed=range(3)),
                  ["model=vit", "logger=none"]),
            Study("initial_rank", "initial_rank",
                  _grid(method=["geolora"], init_rank=[2, 4, 8, 16, 32, 64], seed=range(4), max_rank=[64]),
                  fig2 + ["trainer.lr=1e-3", "method.coefficient_steps=50", "method.tau=0.15"]),
            Study("robustness", "robustness",
                  _grid(method=["geolora", "adalora"], lr=[1e-1, 1e-2, 1e-3, 1e-4],
                        budget=[100, 200, 300, 400, 500, 600], seed=range(3), layers=[72]),
                  fig2 + ["method.init_rank=16", "method.max_rank=32"]),
        ]
    if name == "offline":
        small = ["task.max_train_samples=2000", "trainer.epochs=1", "logger=none"]
        return [
            Study("initial_rank", "initial_rank",
                  _grid(method=["geolora"], init_rank=[2, 4, 8, 16, 32], seed=[0], max_rank=[32]),
                  small + ["trainer.eval_every=16"]),
            Study("robustness", "robustness",
                  _grid(method=["geolora", "adalora"], lr=[1e-2, 2e-3, 5e-4], budget=[72, 144, 288], seed=[0],
                        layers=[36]),
                  small + ["method.init_rank=8", "method.max_rank=16", "method.tinit=6", "method.tfinal=20"]),
            Study("movie_reviews", "methods", _grid(task=["movie_reviews"], method=["lora", "adalora", "geolora"],
                                                    seed=range(3)), ["model=minilm", "logger=none"]),
        ]
    if name == "smoke":
        tiny = ["model=minilm", "task.max_train_samples=48", "task.max_eval_samples=32", "trainer.batch_size=8",
                "trainer.max_steps=6", "trainer.eval_every=3", "trainer.log_every=3", "logger=none",
                "method.tinit=1", "method.tfinal=1", "method.delta_t=1"]
        return [
            Study("methods", "methods", _grid(task=["movie_reviews"], method=["lora", "adalora", "geolora"],
                                              seed=[0, 1]), tiny),
            Study("initial_rank", "initial_rank", _grid(method=["geolora"], init_rank=[2, 8], seed=[0], max_rank=[8]),
                  tiny),
            Study("robustness", "robustness", _grid(method=["geolora", "adalora"], lr=[1e-2, 1e3], budget=[36, 72],
                                                    seed=[0], layers=[36]), tiny + ["method.init_rank=4"]),
        ]
    raise ValueError(f"unknown profile {name!r}: use smoke, offline or paper")


# ---------------------------------------------------------------- running

def run_studies(profile_name: str, studies: list[Study], runs_root: Path) -> None:
    """Run every point of every study in-process, skipping runs whose summary says they are done."""
    from hydra import compose, initialize_config_dir

    from .config import register
    from .train import train

    register()
    for study in studies:
        for point in study.points:
            run_dir = runs_root / profile_name / study.name / run_id(point)
            summary = run_dir / "summary.json"
            if summary.is_file() and json.loads(summary.read_text()).get("status") in DONE:
                log.info("skip %s (done)", run_dir)
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "point.json").write_text(json.dumps(point, sort_keys=True))
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=study.overrides(point) + ["progress=false"])
            log.info("run %s", run_dir)
            train(cfg, run_dir)


# ---------------------------------------------------------------- reading

def collect(study_dir: Path) -> list[tuple[dict, dict, Path]]:
    """(point, summary, run folder) of every finished or diverged run of a study."""
    out = []
    for summary_file in sorted(study_dir.glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        point_file = summary_file.parent / "point.json"
        if summary.get("status") in DONE and point_file.is_file():
            out.append((json.loads(point_file.read_text()), summary, summary_file.parent))
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

def methods_table(study: str, runs: list, paper: dict) -> tuple[str, str]:
    """Markdown and LaTeX: main metric (mean ± std over seeds) beside the paper's, params, time."""
    groups: dict[tuple, list] = {}
    for point, summary, _ in runs:
        groups.setdefault((point.get("task", summary["task"]), point["method"]), []).append(summary)
    header = ["task", "method", "metric", "ours (mean ± std)", "seeds", "diverged", "paper", "params in use",
              "time / run (s)"]
    rows = []
    for (task, method), summaries in sorted(groups.items()):
        rows.append([task, method, summaries[0]["main_metric"].removeprefix("eval/"),
                     _mean_std([final_metric(s) for s in summaries]), str(len(summaries)),
                     str(sum(bool(s.get("diverged")) for s in summaries)), paper_value(paper, study, task, method),
                     f"{statistics.mean(s['trainable_params_final'] for s in summaries):,.0f}",
                     f"{statistics.mean(s['total_time_s'] for s in summaries):.0f}"])
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    latex = ("\\begin{tabular}{" + "l" * 3 + "r" * (len(header) - 3) + "}\n\\toprule\n"
             + "".join(" & ".join(_latex(c) for c in r) + " \\\\\n" + ("\\midrule\n" if r is header else "")
                       for r in [header, *rows])
             + "\\bottomrule\n\\end{tabular}\n")
    return markdown, latex


def _latex(cell: str) -> str:
    return cell.replace("±", "$\\pm$").replace("_", "\\_").replace("—", "--")


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


def initial_rank_figure(runs: list, out_png: Path) -> str:
    """Parameters in use and validation metric over training, one line per initial rank (mean over seeds)."""
    from .plots import plt

    by_rank: dict[int, list] = {}
    for point, _, run_dir in runs:
        by_rank.setdefault(point["init_rank"], []).append(run_dir)
    metric = runs[0][1]["main_metric"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = ["| initial rank | final params in use | final metric | seeds |", "|---|---|---|---|"]
    for rank, run_dirs in sorted(by_rank.items()):
        param_steps, params = _mean_curve([_curves(d, "trainable_params") for d in run_dirs])
        metric_steps, values = _mean_curve([_curves(d, metric) for d in run_dirs])
        left.plot(param_steps, params, marker=".", label=f"init rank {rank}")
        right.plot(metric_steps, values, marker=".", label=f"init rank {rank}")
        rows.append(f"| {rank} | {params[-1]:,.0f} | {values[-1]:.4f} | {len(run_dirs)} |")
    left.set(xlabel="step", ylabel="trainable parameters in use", title="parameters in use")
    right.set(xlabel="step", ylabel=metric, title="validation metric")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return "\n".join(rows) + "\n"


def robustness_figure(runs: list, out_png: Path) -> str:
    """Final metric over learning rate x rank budget, one heatmap per method; diverged cells are nan."""
    import numpy as np

    from .plots import plt

    methods = sorted({p["method"] for p, _, _ in runs})
    lrs = sorted({p["lr"] for p, _, _ in runs}, reverse=True)
    budgets = sorted({p["budget"] for p, _, _ in runs})
    cells: dict[tuple, list] = {}
    for point, summary, _ in runs:
        cells.setdefault((point["method"], point["lr"], point["budget"]), []).append(final_metric(summary))
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    rows = ["| method | lr | " + " | ".join(f"budget {b}" for b in budgets) + " |",
            "|---|---|" + "---|" * len(budgets)]
    for ax, method in zip(axes[0], methods):
        grid = np.full((len(lrs), len(budgets)), np.nan)
        for i, lr in enumerate(lrs):
            for j, budget in enumerate(budgets):
                values = cells.get((method, lr, budget), [])
                if values and not any(math.isnan(v) for v in values):
                    grid[i, j] = statistics.mean(values)
            rows.append(f"| {method} | {lr:g} | " + " | ".join("nan" if math.isnan(v) else f"{v:.4f}"
                                                               for v in grid[i]) + " |")
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad("lightgray")  # diverged cells
        ax.imshow(grid, vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0, vmax=1, cmap=cmap)
        for i, j in itertools.product(range(len(lrs)), range(len(budgets))):
            diverged = np.isnan(grid[i, j])
            ax.text(j, i, "nan" if diverged else f"{grid[i, j]:.3f}", ha="center", va="center",
                    color="black" if diverged else "white", fontsize=8)
        ax.set(xticks=range(len(budgets)), xticklabels=budgets, yticks=range(len(lrs)),
               yticklabels=[f"{lr:g}" for lr in lrs], xlabel="rank budget", ylabel="learning rate", title=method)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return "\n".join(rows) + "\n"


def aggregate(profile_name: str, studies: list[Study], runs_root: Path, out: Path, paper: dict) -> list[Path]:
    """Rebuild every table (Markdown + LaTeX) and figure (PNG) of the profile from its run folders."""
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    written = []
    for study in studies:
        runs = collect(runs_root / profile_name / study.name)
        if not runs:
            log.warning("study %s has no finished runs", study.name)
            continue
        stem = f"{profile_name}_{study.name}"
        sources = "\n".join(f"- {os.path.relpath(r, out)}" for _, _, r in runs)
        if study.kind == "methods":
            markdown, latex = methods_table(study.name, runs, paper)
            (out / "tables" / f"{stem}.tex").write_text(latex)
            written.append(out / "tables" / f"{stem}.tex")
        elif study.kind == "initial_rank":
            markdown = initial_rank_figure(runs, out / "figures" / f"{stem}.png")
            written.append(out / "figures" / f"{stem}.png")
        else:
            markdown = robustness_figure(runs, out / "figures" / f"{stem}.png")
            written.append(out / "figures" / f"{stem}.png")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    runs_root = Path(args.runs) if args.runs else out / "runs"
    studies = profile(args.profile)
    if not args.aggregate_only:
        run_studies(args.profile, studies, runs_root)
    paper = json.loads((ROOT / "results" / "paper_numbers.json").read_text())
    for path in aggregate(args.profile, studies, runs_root, out, paper):
        print(path)


if __name__ == "__main__":
    main()
