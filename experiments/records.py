"""What a run writes: local files (the source of truth for tables) and, optionally, W&B.

Run folder: ``metrics.jsonl`` (one record per log/eval), ``ranks.csv`` (step, layer, rank),
``summary.json`` (final and best metrics, times, memory), ``config.yaml`` (resolved),
``ranks.png`` (rank evolution). Files are appended and flushed as the run goes, so a crash keeps them.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from geolora.model import rank_entries

DONE = ("finished", "diverged")  # statuses of a run that need not run again


def finished_summary(run_dir: str | Path) -> dict | None:
    """The summary of a run folder whose run finished or diverged; None when it has to (re)run."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") in DONE else None


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class RunRecords:
    """Writes one run's files and mirrors every record to W&B when a W&B run is open."""

    def __init__(
        self,
        run_dir: str | Path,
        wandb_cfg=None,
        config: dict | None = None,
        name: str | None = None,
        resume_step: int | None = None,
        wandb_id: str | None = None,
    ) -> None:
        """``resume_step``: a resumed run keeps the rows up to that step (a killed run may have logged beyond its
        checkpoint) and appends; ``wandb_id`` continues that W&B run."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self._metrics = open(self.dir / "metrics.jsonl", "w", encoding="utf-8")  # a rerun starts afresh
            self._ranks_file = open(self.dir / "ranks.csv", "w", newline="", encoding="utf-8")
            self._ranks = csv.writer(self._ranks_file)
            self._ranks.writerow(["step", "layer", "rank"])
        else:
            self._metrics = self._reopen("metrics.jsonl", lambda line: json.loads(line)["step"], resume_step)
            self._ranks_file = self._reopen(
                "ranks.csv", lambda line: int(line.split(",", 1)[0]), resume_step, header=1
            )
            self._ranks = csv.writer(self._ranks_file)
        self.wandb = self._open_wandb(wandb_cfg, config, name, wandb_id) if wandb_cfg is not None else None

    def _reopen(self, name: str, step_of, resume_step: int, header: int = 0):
        """Keep the header and the rows up to ``resume_step`` of a file, then append to it."""
        path = self.dir / name
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
        kept = lines[:header] + [line for line in lines[header:] if line.strip() and step_of(line) <= resume_step]
        path.write_text("".join(kept), encoding="utf-8")
        return open(path, "a", newline="", encoding="utf-8")

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def _open_wandb(self, cfg, config, name, run_id=None):
        os.environ["WANDB_MODE"] = cfg.mode  # env, not only init(mode=): offline then makes no DNS lookup
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        resume = {"id": run_id, "resume": "allow"} if run_id else {}
        config = config or {}
        facts = [
            f"{key}:{value}"
            for key, value in (("task", config.get("task", {}).get("name")), ("seed", config.get("seed")))
        ]
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            dir=str(self.dir),
            name=name,
            group=cfg.group,
            job_type=cfg.job_type or config.get("method", {}).get("name"),
            config=config,
            tags=[*cfg.tags, *(fact for fact in facts if not fact.endswith(":None"))],
            reinit="finish_previous",
            **resume,
        )

    def log(self, step: int, record: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in record.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def log_ranks(self, step: int, ranks: dict[str, int], trainable: int, to_wandb: bool = True) -> None:
        """Every layer's rank into ranks.csv and (``to_wandb``) W&B, as ``geolora/rank/<layer>`` beside the total
        rank and the parameters in use (the key scheme of ``GeoLoRACallback``)."""
        self._ranks.writerows([step, name, rank] for name, rank in ranks.items())
        self._ranks_file.flush()
        if self.wandb is not None and to_wandb:
            self.wandb.log(rank_entries(ranks, trainable), step=step)

    def write_json(self, name: str, data: dict) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: _clean(v) for k, v in data.items()}, indent=2, sort_keys=True))
        tmp.replace(path)
        return path

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self, summary: dict | None = None) -> None:
        self._metrics.close()
        self._ranks_file.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
            self.wandb = None


class NoRecords:
    """The records of a process that writes nothing (ranks other than 0 of a multi-process launch)."""

    wandb_id = None

    def log(self, step: int, record: dict) -> None:
        pass

    def log_ranks(self, step: int, ranks: dict, trainable: int, to_wandb: bool = True) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        pass

    def write_json(self, name: str, data: dict) -> None:
        pass

    def close(self, summary: dict | None = None) -> None:
        pass


TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl", ".log", ".md", ".csv", ".txt")


def clean_for_commit(folder: str | Path, root: str | Path) -> int:
    """Make run folders fit to commit: in every text file the absolute path of ``root`` (the repository) becomes
    ``.`` and the home folder ``~``; Hydra's ``.hydra/config.yaml`` / ``hydra.yaml`` copies are removed (the run's
    own ``config.yaml`` and ``.hydra/overrides.yaml`` stay), and so are the checkpoints of finished runs (binary,
    large, and never resumed). Returns the number of files and folders changed."""
    import shutil

    replacements = [(str(Path(root).resolve()), "."), (str(Path.home()), "~")]
    changed = 0
    for done in [p.parent for p in Path(folder).rglob("summary.json") if finished_summary(p.parent)]:
        for name in ("checkpoint", "checkpoint.old"):
            if (done / name).is_dir():
                shutil.rmtree(done / name)
                changed += 1
    for path in sorted(Path(folder).rglob("*")):
        if path.parent.name == ".hydra" and path.name in ("config.yaml", "hydra.yaml"):
            path.unlink()
            changed += 1
        elif path.is_file() and path.suffix in TEXT_SUFFIXES:
            text = new = path.read_text(encoding="utf-8", errors="surrogateescape")
            for absolute, short in replacements:
                new = new.replace(absolute + "/", short + "/").replace(absolute, short)
            if new != text:
                path.write_text(new, encoding="utf-8", errors="surrogateescape")
                changed += 1
    return changed


def provenance(device) -> dict:
    """What produced a run: the git commit (and whether the tree had uncommitted changes outside ``results/``,
    which a rebuild of committed runs changes), package versions and the device (GPU name on CUDA)."""
    import subprocess
    from importlib import metadata

    import torch

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    versions = {}
    for package in ("torch", "transformers", "peft", "diffusers", "geolora"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    name = torch.cuda.get_device_name(device) if getattr(device, "type", "") == "cuda" else str(device)
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "versions": versions,
        "device": name,
    }
