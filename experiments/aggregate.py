"""Tables and figures of ``make reproduce-tables``, rebuilt from run folders alone (never from numbers
typed by hand): one builder per study kind (``KINDS``), each returning Markdown and LaTeX."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from .records import finished_summary

log = logging.getLogger(__name__)


@dataclass
class Study:
    name: str
    kind: str  # a key of KINDS
    axes: dict[str, str]  # what a table or figure groups by -> the override key that sets it
    sweeps: list[list[str]]  # one Hydra multirun each: overrides, "key=a,b" sweeps over a and b


def _value(text: str):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def collect(study: Study, study_dir: Path) -> list[tuple[dict, dict, Path]]:
    """(point, summary, run folder) of every finished or diverged run of a study; the point holds the
    study's axes as the run's Hydra overrides (``.hydra/overrides.yaml``) set them, or else as its
    resolved config (``config.yaml``) holds them."""
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
        missing = [axis for axis in study.axes if axis not in point]
        if missing:  # an axis no override set (a preset's value): the run's resolved config has it
            config = OmegaConf.load(run_dir / "config.yaml")
            point.update({axis: OmegaConf.select(config, study.axes[axis]) for axis in missing})
        out.append((point, summary, run_dir))
    return out


def final_metric(summary: dict, key: str | None = None) -> float:
    """The run's final value of ``key`` (default: its main metric); nan when it diverged or never evaluated."""
    value = summary.get("final", {}).get(key or summary["main_metric"])
    return float("nan") if summary.get("diverged") or value is None else float(value)


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "nan"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def paper_value(paper: dict, study: str, task: str, method: str) -> str:
    """The published number of a table cell on our scale (``scale`` turns percent into fractions); "—" if none."""
    table = paper.get("tables", {}).get(study, {})
    value = table.get(task, {}).get(method)
    return "—" if value is None else f"{value * table.get('scale', 1):.4f}"


RESULT_COLUMNS = ["ours (mean ± std)", "seeds", "diverged", "params in use", "time / run (s)"]


def _results(summaries: list[dict]) -> list[str]:
    """The RESULT_COLUMNS cells of a group of runs (one per seed): final metric, counts, means."""
    return [
        _mean_std([final_metric(s) for s in summaries]),
        str(len(summaries)),
        str(sum(bool(s.get("diverged")) for s in summaries)),
        f"{statistics.mean(s['trainable_params_final'] for s in summaries):,.0f}",
        f"{statistics.mean(s['total_time_s'] for s in summaries):.0f}",
    ]


def _grouped(runs: list, *axes: str) -> list[tuple[tuple, list[dict]]]:
    """Summaries grouped by the values of ``axes`` (seeds pooled), sorted."""
    groups: dict[tuple, list] = {}
    for point, summary, _ in runs:
        groups.setdefault(tuple(point[a] for a in axes), []).append(summary)
    return sorted(groups.items())


def _tables(header: list[str], rows: list[list[str]], text_columns: int) -> tuple[str, str]:
    """The same table as Markdown and as a LaTeX tabular (booktabs)."""
    markdown = (
        "\n".join(
            ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows]
        )
        + "\n"
    )
    latex = (
        "\\begin{tabular}{"
        + "l" * text_columns
        + "r" * (len(header) - text_columns)
        + "}\n\\toprule\n"
        + "".join(
            " & ".join(_latex(c) for c in r) + " \\\\\n" + ("\\midrule\n" if r is header else "")
            for r in [header, *rows]
        )
        + "\\bottomrule\n\\end{tabular}\n"
    )
    return markdown, latex


def _latex(cell: str) -> str:
    return cell.replace("±", "$\\pm$").replace("_", "\\_").replace("—", "--")


def methods_table(study: str, runs: list, out_png: Path, paper: dict) -> tuple[str, str]:
    """Main metric per task x method (mean ± std over seeds) beside the paper's, params, time."""
    header = ["task", "method", "metric", RESULT_COLUMNS[0], "paper", *RESULT_COLUMNS[1:]]
    rows = []
    for (task, method), summaries in _grouped(runs, "task", "method"):
        ours, *rest = _results(summaries)
        rows.append(
            [
                task,
                method,
                summaries[0]["main_metric"].removeprefix("eval/"),
                ours,
                paper_value(paper, study, task, method),
                *rest,
            ]
        )
    markdown, latex = _tables(header, rows, text_columns=3)
    label = paper.get("tables", {}).get(study, {}).get("label")
    if label and any(row[4] != "—" for row in rows):
        markdown += f"\npaper: {label}; {paper['tables'][study]['where']}.\n"
    return markdown, latex


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


def coefficient_steps_table(study: str, runs: list, out_png: Path, paper: dict) -> tuple[str, str]:
    """Final metric, parameters in use (after the final truncation) and time per run for each coefficient-cycle
    setting: c, how the new blocks start (h) and their second moments (seeds pooled)."""
    rows = [
        [task, str(c), h, moments, *_results(summaries)]
        for (task, c, h, moments), summaries in _grouped(runs, "task", "c", "h", "moments")
    ]
    return _tables(["task", "c", "new blocks h", "new moments", *RESULT_COLUMNS], rows, text_columns=4)


def initial_rank_figure(study: str, runs: list, out_png: Path, paper: dict) -> tuple[str, str]:
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


def robustness_figure(study: str, runs: list, out_png: Path, paper: dict) -> tuple[str, str]:
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
    rows = [
        "| method | lr | " + " | ".join(f"budget {b}" for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    grids = {}
    for method in methods:
        grid = grids[method] = np.full((len(lrs), len(budgets)), np.nan)
        for i, lr in enumerate(lrs):
            for j, budget in enumerate(budgets):
                values = cells.get((method, lr, budget), [])
                if values and not any(math.isnan(v) for v in values):
                    grid[i, j] = statistics.mean(values)
            rows.append(
                f"| {method} | {lr:g} | " + " | ".join("nan" if math.isnan(v) else f"{v:.4f}" for v in grid[i]) + " |"
            )
    finite = [v for grid in grids.values() for v in grid.flat if not math.isnan(v)]
    low = min(finite, default=0.0)  # one colour scale for every panel, so cells compare across methods
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")  # diverged cells
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = grids[method]
        ax.imshow(grid, vmin=low, vmax=max(finite, default=1.0), cmap=cmap)
        for i, j in itertools.product(range(len(lrs)), range(len(budgets))):
            diverged = np.isnan(grid[i, j])
            ax.text(
                j,
                i,
                "nan" if diverged else f"{grid[i, j]:.3f}",
                ha="center",
                va="center",
                color="black" if diverged else "white",
                fontsize=8,
            )
        ax.set(
            xticks=range(len(budgets)),
            xticklabels=budgets,
            yticks=range(len(lrs)),
            yticklabels=[f"{lr:g}" for lr in lrs],
            xlabel="rank budget",
            ylabel="learning rate",
            title=method,
        )
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    detail = [
        [method, f"{lr:g}", str(budget), *_results(summaries)]
        for (method, lr, budget), summaries in _grouped(runs, "method", "lr", "budget")
    ]
    markdown, latex = _tables(["method", "lr", "rank budget", *RESULT_COLUMNS], detail, text_columns=3)
    return "\n".join(rows) + "\n\n" + markdown, latex


DENOISING = [
    ("heldout_mse", "held-out MSE"),
    ("instance_mse", "train-view MSE"),
    ("prior_mse", "class MSE"),
    ("prior_drift", "prior drift"),
]
SUBJECT = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


def dreambooth_figure(study: str, runs: list, out_png: Path, paper: dict) -> tuple[str, str]:
    """Per method (and lr): final denoising losses and prior drift (mean ± std over seeds), parameters in use,
    ranks, adapter size, step time, memory. Figure: each method's sample grid (first seed) above the training
    loss (moving average, mean over seeds) and the held-out MSE over training."""
    from matplotlib.image import imread

    from .plots import plt

    subject = [k for k in SUBJECT if any(k in s.get("subject", {}) for _, s, _ in runs)]  # with pretrained DINO/CLIP
    header = [
        "method",
        "lr",
        *(label for _, label in DENOISING),
        *(SUBJECT[k] for k in subject),
        "seeds",
        "diverged",
        "params in use",
        "rank UNet / text",
        "adapter KiB",
        "step ms",
        "peak MiB",
        "time / run (s)",
    ]
    rows = []
    for (method, lr), summaries in _grouped(runs, "method", "lr"):

        def mean(key: str) -> float:
            return statistics.mean(s.get(key) or 0 for s in summaries)

        finals = [_mean_std([final_metric(s, f"eval/{k}") for s in summaries]) for k, _ in DENOISING]
        finals += [_mean_std([s.get("subject", {}).get(k, float("nan")) for s in summaries]) for k in subject]
        diverged = sum(bool(s.get("diverged")) for s in summaries)
        rows.append(
            [
                method,
                f"{lr:g}",
                *finals,
                str(len(summaries)),
                str(diverged),
                f"{mean('trainable_params_final'):,.0f}",
                f"{mean('rank_unet'):.0f} / {mean('rank_text_encoder'):.0f}",
                f"{mean('adapter_bytes') / 1024:.0f}",
                f"{1e3 * mean('step_time_median_s'):.0f}",
                f"{mean('peak_memory_mb'):.0f}",
                f"{mean('total_time_s'):.0f}",
            ]
        )
    groups: dict[tuple, list[Path]] = {}
    for point, _, run_dir in sorted(runs, key=lambda r: (r[0]["method"], r[0]["lr"], r[0]["seed"])):
        groups.setdefault((point["method"], point["lr"]), []).append(run_dir)
    labels = [f"{m} (lr {lr:g})" if len({k[1] for k in groups}) > 1 else m for m, lr in groups]
    n = len(groups)
    fig = plt.figure(figsize=(4.5 * max(n, 2), 8))
    grid = fig.add_gridspec(2, 2 * n)  # samples: two columns each; the two curves: n columns each
    for i, (label, run_dirs) in enumerate(zip(labels, groups.values())):
        ax = fig.add_subplot(grid[0, 2 * i : 2 * i + 2])
        samples = run_dirs[0] / "samples.png"
        if samples.is_file():
            ax.imshow(imread(samples))
        ax.set_axis_off()
        ax.set_title(label)
    loss_ax, heldout_ax = fig.add_subplot(grid[1, :n]), fig.add_subplot(grid[1, n:])
    for label, run_dirs in zip(labels, groups.values()):
        steps, losses = _mean_curve([_curves(d, "train/loss") for d in run_dirs])
        window = max(1, len(losses) // 10)
        smooth = [statistics.mean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        loss_ax.plot(steps, smooth, label=label)
        heldout_ax.plot(*_mean_curve([_curves(d, "eval/heldout_mse") for d in run_dirs]), marker=".", label=label)
    loss_ax.set(xlabel="step", ylabel="training loss (moving average)", title="training loss")
    heldout_ax.set(xlabel="step", ylabel="held-out denoising MSE", title="held-out view")
    loss_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return _tables(header, rows, text_columns=2)


def _provenance(summaries: list[dict]) -> str:
    """The commits and package versions the runs were made with (their summaries' ``provenance``)."""
    recorded = [s["provenance"] for s in summaries if s.get("provenance")]
    commits = sorted(
        {f"{(p['commit'] or 'unknown')[:10]}{' (uncommitted changes)' if p.get('dirty') else ''}" for p in recorded}
    )
    versions = sorted({", ".join(f"{k} {v}" for k, v in p["versions"].items() if v) for p in recorded})
    unrecorded = len(summaries) - len(recorded)
    parts = [f"commit {', '.join(commits)}", *versions] if recorded else []
    if unrecorded:
        parts.append(f"{unrecorded} run(s) made before provenance was recorded")
    return "; ".join(parts)


KINDS = {
    "methods": (methods_table, False),
    "coefficient_steps": (coefficient_steps_table, False),
    "dreambooth": (dreambooth_figure, True),
    "initial_rank": (initial_rank_figure, True),
    "robustness": (robustness_figure, True),
}
"""Study kind -> (builder(study name, runs, figure path, paper numbers), whether it draws a figure)."""


def aggregate(profile_name: str, studies: list, runs_root: Path, out: Path, paper: dict) -> list[Path]:
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
        build, draws = KINDS[study.kind]
        markdown, latex = build(study.name, runs, out / "figures" / f"{stem}.png", paper)
        if draws:
            written.append(out / "figures" / f"{stem}.png")
        (out / "tables" / f"{stem}.tex").write_text(latex)
        written.append(out / "tables" / f"{stem}.tex")
        (out / "tables" / f"{stem}.md").write_text(
            f"# {profile_name}: {study.name}\n\n{markdown}\n"
            f"Built from these run folders:\n{sources}\n\n"
            f"Provenance: {_provenance([s for _, s, _ in runs])}\n"
        )
        written.append(out / "tables" / f"{stem}.md")
    return written
