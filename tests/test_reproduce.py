"""`make reproduce-tables PROFILE=smoke`: every table and figure built from real (tiny) runs."""

import json
import logging
import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from wandb_records import run_file, run_info

from experiments import reproduce
from experiments.config import register, validate

pytestmark = pytest.mark.slow  # whole profiles of runs: `make test-all`

GOLDEN = Path(__file__).parent / "golden"
MEASURED = (
    "ours",
    "params in use",
    "time / run",
    "budget ",
    "held-out",
    "train-view",
    "class MSE",
    "prior drift",
    "rank UNet",
    "adapter KiB",
    "step ms",
    "peak MiB",
)  # headers of columns holding measurements


def layout(markdown: str) -> str:
    """A table file with its measured cells masked: what the study defines (rows, columns, seeds, diverged
    counts, nan for diverged cells, the run folders listed as sources) stays; numbers become ``#``."""
    lines, header = markdown.splitlines(), []
    for i, line in enumerate(lines):
        cells = line.split(" | ")
        if line.startswith("Provenance: "):  # commits and versions change with every commit
            lines[i] = "Provenance: #"
        elif i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = cells
        elif line.startswith("| ") and len(cells) == len(header):
            lines[i] = " | ".join(
                re.sub(r"\d[\d,.]*", "#", c) if h.lstrip("| ").startswith(MEASURED) else c
                for c, h in zip(cells, header)
            )
    return "\n".join(lines) + "\n"


def test_smoke_profile_builds_every_table_and_figure_and_skips_finished_runs(tmp_path, caplog):
    reproduce.main(["--profile", "smoke", "--out", str(tmp_path)])
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    for name in (
        "smoke_methods.md",
        "smoke_methods.tex",
        "smoke_initial_rank.md",
        "smoke_initial_rank.tex",
        "smoke_robustness.md",
        "smoke_robustness.tex",
        "smoke_dreambooth.md",
        "smoke_dreambooth.tex",
        "smoke_coefficient_steps.md",
        "smoke_coefficient_steps.tex",
    ):
        assert (tables / name).is_file(), name
    for name in ("smoke_initial_rank.png", "smoke_robustness.png", "smoke_dreambooth.png"):
        assert (figures / name).stat().st_size > 1000, name

    methods = (tables / "smoke_methods.md").read_text()
    for method in ("lora", "adalora", "geolora"):
        assert f"| movie_reviews | {method} | accuracy |" in methods
    assert "±" in methods and "| 2 |" in methods  # two seeds each
    assert "—" in methods  # no paper number for the stand-in task
    assert "$\\pm$" in (tables / "smoke_methods.tex").read_text()
    robustness = (tables / "smoke_robustness.md").read_text()
    assert "| adalora | 1000 | nan | nan |" in robustness  # lr 1e3 diverges: shown as nan, not dropped
    assert "| adalora | 1000 | 36 | nan | 1 | 1 |" in robustness  # the full table counts the diverged seed
    initial_rank = (tables / "smoke_initial_rank.md").read_text().splitlines()
    assert sum(line.startswith(("| 2 |", "| 8 |")) for line in initial_rank) == 2
    cycles = (tables / "smoke_coefficient_steps.md").read_text()
    for c in (0, 3):
        for h in ("tangent", "lr"):
            assert f"| movie_reviews | {c} | {h} | zero |" in cycles

    # Same layout as the committed tables (UPDATE_GOLDEN=1 rewrites them after an intended change).
    for table in sorted(tables.glob("*.md")):
        golden = GOLDEN / table.name
        if os.environ.get("UPDATE_GOLDEN") == "1":
            golden.write_text(layout(table.read_text()))
        assert layout(table.read_text()) == golden.read_text(), f"{table.name} differs from {golden}"
    assert sorted(p.name for p in GOLDEN.glob("smoke_*.md")) == sorted(p.name for p in tables.glob("*.md"))

    run_dirs = sorted((tmp_path / "runs" / "smoke").glob("*/*/summary.json"))
    assert len(run_dirs) == 6 + 2 + 8 + 3 + 4
    for summary in run_dirs:  # each run is named by its swept overrides and listed as a source
        assert json.loads(summary.read_text())["method"] in summary.parent.name or "coefficient" in str(summary)
        assert summary.parent.name in (tables / f"smoke_{summary.parent.parent.name}.md").read_text()
        # one offline W&B run per run folder, grouped by profile/study, the method as job type
        info = run_info(run_file(summary.parent))
        assert info.run_group == f"smoke/{summary.parent.parent.name}"
        assert info.job_type == json.loads(summary.read_text())["method"]

    written = [p for d in run_dirs for p in (d, d.parent / ".hydra" / "config.yaml", d.parent / "run.log")]
    stamps = {p: p.stat().st_mtime_ns for p in written}
    caplog.set_level(logging.INFO, logger="experiments.reproduce")
    caplog.clear()
    reproduce.main(["--profile", "smoke", "--out", str(tmp_path)])
    assert {p: p.stat().st_mtime_ns for p in written} == stamps  # finished runs are neither run nor touched
    sweeps = sum(len(study.sweeps) for study in reproduce.profile("smoke"))
    assert sum("every run finished" in r.getMessage() for r in caplog.records) == sweeps


def test_paper_profile_is_a_set_of_hydra_multiruns(capsys):
    reproduce.main(["--profile", "paper", "--dry-run", "--hydra", "hydra/launcher=basic"])
    commands = capsys.readouterr().out.splitlines()
    # GLUE, ViT, initial rank, robustness x {GeoLoRA, AdaLoRA}, DreamBooth, coefficient cycles x 2
    assert len(commands) == 8
    assert all(" -m " in c and c.endswith("hydra/launcher=basic") for c in commands)
    assert all("logger=wandb" in c and "logger.group=paper/" in c for c in commands)
    assert "task=glue/mnli,glue/sst2" in commands[0] and "seed=0,1,2,3,4" in commands[0]
    assert "method=adalora" in commands[4] and "method.rank_budget=100,200,300,400,500,600" in commands[4]
    assert "task=dreambooth" in commands[5] and "trainer.lr=5e-6,1e-4" in commands[5]
    assert "method.coefficient_steps=0,1,10" in commands[6] and "method.new_block_step=tangent,lr" in commands[6]


def test_paper_column_shows_the_adalora_papers_baselines(tmp_path):
    """The GLUE table prints the AdaLoRA paper's LoRA r=8 / AdaLoRA numbers as fractions; GeoLoRA's stay "—"."""
    from experiments.aggregate import methods_table

    paper = json.loads((reproduce.ROOT / "results" / "paper_numbers.json").read_text())
    runs = [
        (
            {"task": "glue/rte", "method": method, "seed": 0},
            {
                "main_metric": "eval/accuracy",
                "final": {"eval/accuracy": 0.8},
                "trainable_params_final": 1,
                "total_time_s": 1.0,
            },
            tmp_path,
        )
        for method in ("lora", "adalora", "geolora")
    ]
    markdown, _ = methods_table("glue", runs, tmp_path / "x.png", paper)
    assert "| glue/rte | lora | accuracy | 0.8000 | 0.8520 |" in markdown
    assert "| glue/rte | adalora | accuracy | 0.8000 | 0.8809 |" in markdown
    assert "| glue/rte | geolora | accuracy | 0.8000 | — |" in markdown
    assert "arXiv 2303.10512" in markdown


@pytest.mark.parametrize("name", ["smoke", "offline", "paper"])
def test_every_sweep_composes_to_a_valid_config(name):
    """The first point of each sweep composes and passes validation, so no profile can rot unseen."""
    register()
    for study in reproduce.profile(name):
        for sweep in study.sweeps:
            first_point = [override.split(",")[0] for override in sweep]
            with initialize_config_dir(config_dir=str(reproduce.ROOT / "conf"), version_base="1.3"):
                validate(compose("config", overrides=first_point))
