"""One run, method- and task-agnostic: setup (data, model, adapters, optimizer, records), fit (the
loop: the task family's objective and evaluator, the method behind ``Adapted``), finish (summary, plots,
adapter). The loop never asks which method or task it runs."""

from __future__ import annotations

import logging
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from . import tasks
from .config import validate
from .console import quiet_libraries
from .errors import UserError
from .methods import Adapted, adapt
from .models import pick_device
from .plots import rank_heatmap
from .records import RunRecords, provenance

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the loop accumulates and the summary reports."""

    name: str
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    status: str = "running"
    history: list[dict] = field(default_factory=list)  # one record per evaluation
    best: dict[str, float] = field(default_factory=dict)
    step_times: list[float] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)


@dataclass
class Run:
    """Everything one run holds between setup and finish."""

    cfg: Any
    run_dir: Path
    device: torch.device
    family: Any  # experiments.tasks: train_loader, loss(model, batch), evaluate(model, ...)
    adapted: Adapted
    scheduler: Any
    scaler: torch.amp.GradScaler
    records: RunRecords
    state: RunState


def setup(cfg, run_dir: str | Path) -> Run:
    validate(cfg)
    quiet_libraries(cfg.verbose)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = pick_device(cfg.trainer.device)
    trainer = cfg.trainer
    model, family = tasks.build(cfg)
    steps_per_epoch = len(family.train_loader)
    total_steps = math.ceil(trainer.epochs * steps_per_epoch)
    if trainer.max_steps:
        total_steps = min(total_steps, trainer.max_steps) if trainer.epochs > 0 else trainer.max_steps
    try:
        adapted = adapt(model, cfg.model, cfg.method, trainer, total_steps)
    except ValueError as err:  # the library's and peft's checks of the adapter settings
        raise UserError(f"method {cfg.method.name.value}: {err}") from err
    adapted.model = adapted.model.to(device)
    family.start(adapted.model, device, trainer.precision.value)
    warmup = trainer.warmup_steps or int(trainer.warmup_ratio * total_steps)
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    if trainer.schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(adapted.optimizer, warmup)
    else:
        scheduler = get_linear_schedule_with_warmup(adapted.optimizer, warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision.value == "fp16")
    name = cfg.run_name or f"{cfg.method.name.value}-{cfg.task.name}-s{cfg.seed}"
    records = RunRecords(
        run_dir,
        cfg.logger if cfg.logger.name == "wandb" else None,
        OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        name,
    )
    log.info(
        "run %s: %d steps (%d per epoch), %d trainable parameters in use",
        name,
        total_steps,
        steps_per_epoch,
        adapted.trainable(),
    )
    return Run(
        cfg, run_dir, device, family, adapted, scheduler, scaler, records, RunState(name, total_steps, steps_per_epoch)
    )


def _optimizer_step(run: Run, batch: dict) -> torch.Tensor:
    """One forward/backward and update; returns the loss."""
    model, optimizer, trainer = run.adapted.model, run.adapted.optimizer, run.cfg.trainer
    with tasks.autocast(trainer.precision.value, run.device):
        loss = run.family.loss(model, batch)
    run.scaler.scale(loss).backward()
    if trainer.max_grad_norm:
        run.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.max_grad_norm)
    run.scaler.step(optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.adapted.after_step(run.state.step)
    optimizer.zero_grad(set_to_none=True)
    return loss


def evaluate(run: Run) -> None:
    """Metrics, parameters in use and ranks now: logged, kept in the history, best values updated."""
    state, adapted = run.state, run.adapted
    metrics = run.family.evaluate(adapted.model, run.device, run.cfg.trainer.precision.value, run.cfg.progress)
    ranks = adapted.ranks()
    record = {
        **{f"eval/{k}": v for k, v in metrics.items()},
        "trainable_params": adapted.trainable(),
        "total_rank": sum(ranks.values()),
        "epoch": state.step / state.steps_per_epoch,
        "wall_time_s": time.perf_counter() - state.start,
    }
    run.records.log(state.step, record)
    state.history.append(record)
    for key, value in metrics.items():
        sign = -1 if key in run.cfg.task.minimize else 1  # compare sign * value: larger is better
        if not math.isnan(value) and sign * value > sign * state.best.get(key, -sign * math.inf):
            state.best[key] = value
    log.info("step %d: %s", state.step, {k: round(v, 4) for k, v in metrics.items()})


def fit(run: Run) -> None:
    """The training loop: every ``log_every`` steps a loss record, every ``eval_every`` an evaluation."""
    state, trainer, adapted = run.state, run.cfg.trainer, run.adapted
    initial_ranks = adapted.ranks()
    run.records.log_ranks(0, initial_ranks)
    run.records.log(0, {"trainable_params": adapted.trainable(), "total_rank": sum(initial_ranks.values())})
    eval_every = trainer.eval_every or state.steps_per_epoch
    bar = tqdm(total=state.total_steps, desc=state.name, disable=not run.cfg.progress)
    adapted.model.train()
    try:
        while state.step < state.total_steps:
            epoch_start = time.perf_counter()
            for batch in run.family.train_loader:
                tick = time.perf_counter()
                loss = _optimizer_step(run, {k: v.to(run.device) for k, v in batch.items()})
                if run.device.type == "cuda":
                    torch.cuda.synchronize(run.device)
                state.step_times.append(time.perf_counter() - tick)
                state.step += 1
                bar.update(1)
                step, last = state.step, state.step == state.total_steps
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step}")
                if step % trainer.log_every == 0 or last:
                    run.records.log(
                        step,
                        {
                            "train/loss": loss.item(),
                            "train/lr": run.scheduler.get_last_lr()[0],
                            "train/step_time_s": state.step_times[-1],
                        },
                    )
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if step % trainer.log_every == 0 or step % eval_every == 0 or last:
                    run.records.log_ranks(step, adapted.ranks())
                if step % eval_every == 0 or last:
                    evaluate(run)
                if step >= state.total_steps:
                    break
            state.epoch_times.append(time.perf_counter() - epoch_start)
    finally:
        bar.close()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def summary(run: Run) -> dict:
    """What summary.json holds: final and best metrics, ranks, parameters in use, times, memory."""
    cfg, state, adapted = run.cfg, run.state, run.adapted
    return {
        "name": state.name,
        "status": state.status,
        "diverged": state.status == "diverged",
        "method": cfg.method.name.value,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "pretrained": cfg.model.pretrained,
        "seed": cfg.seed,
        "steps": state.step,
        "total_steps": state.total_steps,
        "main_metric": f"eval/{cfg.task.main_metric}",
        "final": state.history[-1] if state.history else {},
        "best": {f"eval/{k}": v for k, v in state.best.items()},
        "trainable_params_final": adapted.trainable(),
        "ranks_final": adapted.ranks(),
        "step_time_median_s": statistics.median(state.step_times) if state.step_times else None,
        "epoch_time_s": state.epoch_times,
        "total_time_s": time.perf_counter() - state.start,
        "peak_memory_mb": _peak_memory_mb(run.device),
        "device": str(run.device),
        "method_settings": adapted.settings,
        "provenance": provenance(run.device),
    }


def finish(run: Run) -> dict:
    """Summary, the family's outputs, rank plot and (``save_adapter``) the adapter; closes the records."""
    result = summary(run)
    result.update(run.family.finish(run.adapted, run.run_dir, run.records))
    if run.adapted.adapts_ranks:
        png = rank_heatmap(run.run_dir / "ranks.csv", run.run_dir / "ranks.png", f"{run.state.name}: rank per layer")
        run.records.log_image("ranks", png)
    if run.cfg.save_adapter:
        run.adapted.save(run.run_dir / "adapter")
    run.records.write_json("summary.json", result)
    run.records.close(_flat_summary(result))
    return result


def train(cfg, run_dir: str | Path) -> dict:
    """Run one configured experiment into ``run_dir``; returns the summary it also writes. A run whose
    loss turns non-finite (or whose optimizer refuses a non-finite gradient) ends as ``diverged``."""
    run = setup(cfg, run_dir)
    try:
        fit(run)
        run.state.status = "finished"
    except FloatingPointError as err:
        log.error("%s", err)
        run.state.status = "diverged"
    except BaseException as err:  # keep what was measured, then let the error surface
        run.state.status = f"failed: {type(err).__name__}: {err}"
        run.records.write_json("summary.json", summary(run))
        run.records.close()
        raise
    return finish(run)


def _flat_summary(summary: dict) -> dict:
    """The summary for W&B: scalars as they are, dicts of scalars (final, best, subject, ...) as ``key/name``."""
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float, str))})
        elif not isinstance(value, list):
            flat[key] = value
    return flat
