"""`make reproduce-tables`: run the studies of a profile, then rebuild every table and figure from the
run folders (never from numbers typed by hand).

Studies: ``methods`` (main metric per task x method, mean +- std over seeds, parameters in use, time),
``initial_rank`` (GeoLoRA from several initial ranks: parameters in use and validation metric over
training, the paper's Figure 2a/b), ``robustness`` (learning rate x rank budget, GeoLoRA vs AdaLoRA,
diverged runs shown as nan, Figure 2c/d), ``coefficient_steps`` (GeoLoRA's coefficient cycles: c and how new
blocks start) and ``dreambooth``. Each study is a file ``conf/study/<profile>/<study>.yaml``
(adding a study is adding a file) holding one or more Hydra multiruns of ``run.py`` (``--hydra
hydra/launcher=...`` sends them to a cluster); each run lands in
``results/runs/<profile>/<study>/<its swept overrides>/`` and is skipped when the command is run again.
Tables and figures are built by ``experiments.aggregate``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from .aggregate import KINDS, Study, aggregate
from .records import clean_for_commit

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "conf" / "study"


def _sweep_command(
    study: Study, sweep: list[str], study_dir: Path, hydra_args: list[str], logger: str = "wandb"
) -> list[str]:
    """``run.py -m`` for one sweep; each run lands in ``study_dir/<axis overrides>`` (e.g.
    ``method=lora,seed=0,task=movie_reviews``), so a rerun finds and skips the finished ones. With
    ``logger="wandb"`` every run is a W&B run (offline unless WANDB_MODE says otherwise) in the group
    ``<profile>/<study>``, its job type the method, tagged with its task and seed."""
    logging_args = [f"logger={logger}"] + (
        [f"logger.group={study_dir.parent.name}/{study.name}"] if logger == "wandb" else []
    )
    keys = {o.split("=", 1)[0] for o in [*sweep, *logging_args]} | {"progress", "skip_finished"}
    not_in_name = sorted(keys - set(study.axes.values()))
    return [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        *sweep,
        *logging_args,
        "progress=false",
        "skip_finished=true",
        f"hydra.sweep.dir={study_dir}",
        "hydra.sweep.subdir=${hydra.job.override_dirname}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(not_in_name)}]",
        *hydra_args,
    ]


def profile(name: str) -> list[Study]:
    """The studies of a profile: one file each in ``conf/study/<profile>/`` (its ``kind``, the ``axes``
    its tables group by, its ``sweeps``), run in their ``order``. ``paper`` needs a GPU and the hub;
    ``offline`` runs here on 2 CPU cores; ``smoke`` runs every study on tiny budgets (the tests use it)."""
    import yaml

    folder = STUDIES / name
    if not folder.is_dir():
        raise ValueError(f"unknown profile {name!r}: use one of {sorted(p.name for p in STUDIES.iterdir())}")
    studies = []
    for path in folder.glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())
        if spec.get("kind") not in KINDS:
            raise ValueError(f"{path}: kind must be one of {sorted(KINDS)}, got {spec.get('kind')!r}")
        studies.append((spec.get("order", 0), Study(path.stem, spec["kind"], spec["axes"], spec["sweeps"])))
    return [study for _, study in sorted(studies, key=lambda item: (item[0], item[1].name))]


# ---------------------------------------------------------------- running


def _all_finished(study: Study, sweep: list[str], study_dir: Path) -> bool:
    """Whether every run of ``sweep`` already has a finished run folder (matched on the study's axes the
    sweep sets, its values expanded by Hydra's own override parser), so the sweep need not start: a started
    sweep rewrites the ``.hydra/`` files of the finished runs it skips."""
    from itertools import product

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from .aggregate import _value, collect

    axes = {key: axis for axis, key in study.axes.items()}
    swept = {}
    try:
        for override in OverridesParser.create().parse_overrides(sweep):
            if override.key_or_group in axes:
                values = (
                    list(override.sweep_string_iterator())
                    if override.is_sweep_override()
                    else [override.get_value_element_as_str()]
                )
                swept[axes[override.key_or_group]] = [_value(v) for v in values]
    except HydraException:  # glob (needs the config groups), interval, or a typo: Hydra runs it, and reports
        return False
    done = {tuple(point.get(axis) for axis in swept) for point, _, _ in collect(study, study_dir)}
    return not set(product(*swept.values())) - done


def run_studies(
    profile_name: str,
    studies: list[Study],
    runs_root: Path,
    hydra_args: list[str],
    dry_run: bool = False,
    logger: str = "wandb",
) -> list[str]:
    """Launch every sweep of every study (finished runs are skipped by run.py); returns the failed sweeps.
    A failed run does not stop the others: Hydra finishes the sweep, then reports the failure."""
    failed = []
    for study in studies:
        for sweep in study.sweeps:
            command = _sweep_command(study, sweep, runs_root / profile_name / study.name, hydra_args, logger)
            if dry_run:
                print(shlex.join(command))
                continue
            if _all_finished(study, sweep, runs_root / profile_name / study.name):
                log.info("sweep %s: every run finished (%s)", study.name, " ".join(sweep))
                continue
            log.info("sweep %s: %s", study.name, " ".join(sweep))
            if subprocess.run(command, cwd=ROOT).returncode != 0:
                failed.append(f"{study.name}: {' '.join(sweep)}")
    return failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a profile's studies and rebuild its tables and figures.")
    parser.add_argument(
        "--profile",
        default="offline",
        choices=sorted(p.name for p in STUDIES.iterdir()),
        help="a folder of conf/study/",
    )
    parser.add_argument("--out", default=str(ROOT / "results"), help="tables/ and figures/ go here")
    parser.add_argument("--runs", default=None, help="run folders (default: <out>/runs)")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild tables and figures")
    parser.add_argument("--dry-run", action="store_true", help="print the run.py -m commands, run nothing")
    parser.add_argument(
        "--logger", default="wandb", choices=("wandb", "none"), help="wandb: one W&B run per run folder (offline)"
    )
    parser.add_argument(
        "--hydra",
        nargs="*",
        default=[],
        metavar="OVERRIDE",
        help="extra overrides for every sweep, e.g. hydra/launcher=submitit_slurm trainer.device=cuda",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    runs_root = Path(args.runs) if args.runs else out / "runs"
    studies = profile(args.profile)
    failed = (
        []
        if args.aggregate_only
        else run_studies(args.profile, studies, runs_root, args.hydra, args.dry_run, args.logger)
    )
    if args.dry_run:
        return
    if runs_root.resolve().is_relative_to(ROOT):  # committed results: no absolute paths of this machine
        clean_for_commit(runs_root / args.profile, ROOT)
    paper = json.loads((ROOT / "results" / "paper_numbers.json").read_text())
    for path in aggregate(args.profile, studies, runs_root, out, paper):
        print(path)
    if failed:  # the tables above hold every run that did finish
        sys.exit(
            f"error: {len(failed)} sweep(s) had failed runs (their summary.json says why; rerun to retry "
            f"them): {'; '.join(failed)}"
        )


if __name__ == "__main__":
    main()
