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

    def __init__(self, run_dir: str | Path, wandb_cfg=None, config: dict | None = None, name: str | None = None) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.dir / "metrics.jsonl", "w", encoding="utf-8")  # a rerun starts afresh
        self._ranks_file = open(self.dir / "ranks.csv", "w", newline="", encoding="utf-8")
        self._ranks = csv.writer(self._ranks_file)
        self._ranks.writerow(["step", "layer", "rank"])
        self.wandb = self._open_wandb(wandb_cfg, config, name) if wandb_cfg is not None else None

    def _open_wandb(self, cfg, config, name):
        os.environ["WANDB_MODE"] = cfg.mode  # env, not only init(mode=): offline then makes no DNS lookup
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        return wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(self.dir), name=name,
                          config=config, tags=list(cfg.tags), reinit="finish_previous")

    def log(self, step: int, record: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in record.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def log_ranks(self, step: int, ranks: dict[str, int]) -> None:
        self._ranks.writerows([step, name, rank] for name, rank in ranks.items())
        self._ranks_file.flush()

    def write_json(self, name: str, data: dict) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: _clean(v) for k, v in data.items()}, indent=2, sort_keys=True))
        tmp.replace(path)
        return path

    def log_image(self, key: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))})

    def close(self, summary: dict | None = None) -> None:
        self._metrics.close()
        self._ranks_file.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
            self.wandb = None
