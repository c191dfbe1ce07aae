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

from . import checkpoint, distributed, tasks
from .checkpoint import restore_rng
from .config import validate
from .console import quiet_libraries
from .errors import UserError
from .methods import Adapted, adapt
from .models import autocast, pick_device
from .plots import rank_heatmap
from .records import NoRecords, RunRecords, provenance

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
    bad_steps: int = 0  # steps not applied because the loss or a gradient was not finite
    replicas_identical: bool = True  # multi-process: every evaluation found the same weights and ranks
    consecutive_bad: int = 0
    start: float = field(default_factory=time.perf_counter)

    RESUMED = ("step", "history", "best", "step_times", "epoch_times", "bad_steps", "consecutive_bad")

    def resumable(self) -> dict:
        """What a checkpoint keeps of the loop (the wall clock as time elapsed so far)."""
        return {**{key: getattr(self, key) for key in self.RESUMED}, "elapsed": time.perf_counter() - self.start}

    def restore(self, saved: dict) -> None:
        for key in self.RESUMED:
            setattr(self, key, saved[key])
        self.start = time.perf_counter() - saved["elapsed"]


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
    position: dict | None = None  # where a resumed run's data order stands (experiments.checkpoint)
    context: distributed.Context = field(default_factory=distributed.Context)  # this process in a launch
    train_model: Any = None  # the model the loop's forward/backward runs (DDP-wrapped in a multi-process launch)
    provenance: dict = field(default_factory=dict)  # the code and versions this process loaded (read at setup)


def setup(cfg, run_dir: str | Path) -> Run:
    validate(cfg)
    quiet_libraries(cfg.verbose)
    context = distributed.init(cfg.trainer.device)
    distributed.check_batch_size(cfg.trainer.batch_size, context)
    if not context.is_main:  # one console: rank 0's
        for name in ("experiments", "run"):
            logging.getLogger(name).setLevel(logging.WARNING)
    run_dir = Path(run_dir)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = pick_device(cfg.trainer.device)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    trainer = cfg.trainer
    model, family = tasks.build(cfg)
    if context.enabled and not family.shardable:
        raise UserError(f"task family {cfg.task.family!r} trains in one process; launch it without torchrun")
    family.context = context
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
    found = checkpoint.find(run_dir) if cfg.resume else None
    resumed = checkpoint.info(found) if found else None
    records = NoRecords()
    if context.is_main:
        records = RunRecords(
            run_dir,
            cfg.logger if cfg.logger.name == "wandb" else None,
            OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            name,
            resume_step=resumed["step"] if resumed else None,
            wandb_id=resumed.get("wandb_id") if resumed else None,
        )
    log.info(
        "run %s: %d steps (%d per epoch), %d trainable parameters in use",
        name,
        total_steps,
        steps_per_epoch,
        adapted.trainable(),
    )
    run = Run(
        cfg, run_dir, device, family, adapted, scheduler, scaler, records, RunState(name, total_steps, steps_per_epoch)
    )
    run.context, run.train_model, run.provenance = context, adapted.model, provenance(device)
    if found:
        run.position = checkpoint.load(run, found)
        log.info("resuming from %s at step %d of %d (resume=false starts over)", found, run.state.step, total_steps)
    if context.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [context.local_rank] if device.type == "cuda" else None
        run.train_model = DistributedDataParallel(adapted.model, device_ids=ids)
        log.info("training on %d processes, %s each", context.world_size, device)
    return run


def _optimizer_step(run: Run, batch: dict) -> tuple[float, bool]:
    """One forward/backward and, when the loss and the gradients are finite, the update (otherwise nothing
    changes: a bad step). Returns (loss, applied); reading the loss and the finiteness is one host sync."""
    model, optimizer, trainer = run.adapted.model, run.adapted.optimizer, run.cfg.trainer
    with autocast(trainer.precision.value, run.device):
        loss = run.family.loss(run.train_model, batch)
    run.scaler.scale(loss).backward()
    checks = [loss.detach().float()]
    if trainer.max_grad_norm:
        run.scaler.unscale_(optimizer)
        checks.append(torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.max_grad_norm).float())
    elif not run.scaler.is_enabled():  # fp16: the GradScaler skips steps with non-finite gradients itself
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        checks.append(torch.nn.utils.get_total_norm(grads).float())
    values = torch.stack(checks).tolist()
    applied = math.isfinite(values[0]) and (run.scaler.is_enabled() or all(map(math.isfinite, values)))
    if applied:
        try:
            run.scaler.step(optimizer)
        except FloatingPointError as err:  # GeoLoRAOptimizer refused the step before changing anything
            log.debug("%s", err)
            applied = False
    if applied or trainer.max_grad_norm:  # the scaler's per-step state is reset either way
        run.scaler.update()
    if applied:
        run.scheduler.step()
        run.adapted.after_step(run.state.step)
    optimizer.zero_grad(set_to_none=True)
    return values[0], applied


def evaluate(run: Run) -> None:
    """Metrics, parameters in use and ranks now: logged, kept in the history, best values updated."""
    state, adapted = run.state, run.adapted
    metrics = run.family.evaluate(
        adapted.model, run.device, run.cfg.trainer.precision.value, run.cfg.progress and run.context.is_main
    )
    ranks = adapted.ranks()
    if run.context.enabled and not distributed.replicas_identical(adapted.model, ranks, run.context):
        state.replicas_identical = False
        raise UserError(
            f"the {run.context.world_size} replicas hold different weights or ranks at step {state.step}: "
            "their steps diverged (a bug worth reporting); the last checkpoint is kept"
        )
    record = {
        **{f"eval/{k}": v for k, v in metrics.items()},
        "trainable_params": adapted.trainable(),
        "total_rank": sum(ranks.values()),
        "epoch": state.step / state.steps_per_epoch,
        "wall_time_s": time.perf_counter() - state.start,
    }
    run.records.log(state.step, record)
    if adapted.adapts_ranks and run.records.wandb_id:  # the heatmap so far: W&B's media slider shows the evolution
        run.records.log_image("ranks", _rank_plot(run), state.step)
    state.history.append(record)
    for key, value in metrics.items():
        sign = -1 if key in run.cfg.task.minimize else 1  # compare sign * value: larger is better
        if not math.isnan(value) and sign * value > sign * state.best.get(key, -sign * math.inf):
            state.best[key] = value
    log.info("step %d: %s", state.step, {k: round(v, 4) for k, v in metrics.items()})


def _rank_plot(run: Run) -> Path:
    """ranks.png: every layer's rank over the steps so far (from ranks.csv)."""
    return rank_heatmap(run.run_dir / "ranks.csv", run.run_dir / "ranks.png", f"{run.state.name}: rank per layer")


def _count(run: Run, applied: bool, loss: float) -> None:
    """Bad steps (not applied): counted; ``trainer.max_bad_steps`` in a row end the run as diverged."""
    state = run.state
    if applied:
        state.consecutive_bad = 0
        return
    state.bad_steps += 1
    state.consecutive_bad += 1
    if state.consecutive_bad >= run.cfg.trainer.max_bad_steps:
        raise FloatingPointError(
            f"{state.consecutive_bad} steps in a row with a non-finite loss or gradient "
            f"(last loss {loss}) by step {state.step}: diverged"
        )


def fit(run: Run, position: dict | None = None) -> None:
    """The training loop: every ``log_every`` steps a loss record, every ``eval_every`` an evaluation, every
    ``checkpoint_every`` (default: every epoch) and at the end a checkpoint. ``position`` (from a checkpoint)
    puts the data order where it was: the loader's generator at the start of that epoch, minus the batches
    taken, and the RNGs as they were."""
    state, trainer, adapted = run.state, run.cfg.trainer, run.adapted
    loader = run.family.train_loader
    if position is None:
        initial_ranks = adapted.ranks()
        run.records.log_ranks(0, initial_ranks, adapted.trainable())  # a fixed-rank method's ranks: once, here
        run.records.log(0, {"trainable_params": adapted.trainable(), "total_rank": sum(initial_ranks.values())})
    eval_every = trainer.eval_every or state.steps_per_epoch
    every = state.steps_per_epoch if trainer.checkpoint_every is None else trainer.checkpoint_every
    epoch, skip = (position["epoch"], position["batch"]) if position else (0, 0)
    bar = tqdm(
        total=state.total_steps,
        initial=state.step,
        desc=state.name,
        disable=not run.cfg.progress or not run.context.is_main,
    )
    adapted.model.train()
    try:
        while state.step < state.total_steps:
            epoch_start = time.perf_counter()
            if position:
                loader.generator.set_state(position["generator"])
            start_state = loader.generator.get_state()
            batches = iter(loader)
            for _ in range(skip):
                next(batches)
            if position:  # after skipping: their draws are made again, then the RNGs are put back
                restore_rng(position["rng"])
                position = None
            taken = skip
            for batch in batches:
                taken += 1
                batch = distributed.shard(batch, run.context)
                if batch is None:  # a last batch smaller than the process count
                    continue
                tick = time.perf_counter()
                loss, applied = _optimizer_step(run, {k: v.to(run.device) for k, v in batch.items()})
                if run.device.type == "cuda":
                    torch.cuda.synchronize(run.device)
                state.step_times.append(time.perf_counter() - tick)
                state.step += 1
                bar.update(1)
                step, last = state.step, state.step == state.total_steps
                _count(run, applied, loss)
                if last:
                    adapted.after_training()
                if step % trainer.log_every == 0 or last:
                    loss = distributed.mean(loss, run.context)  # the global batch's loss
                    record = {
                        "train/loss": loss,
                        "train/lr": run.scheduler.get_last_lr()[0],
                        "train/step_time_s": state.step_times[-1],
                        "train/bad_steps": state.bad_steps,
                    }
                    run.records.log(step, record)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if step % trainer.log_every == 0 or step % eval_every == 0 or last:
                    run.records.log_ranks(step, adapted.ranks(), adapted.trainable(), adapted.adapts_ranks)
                if step % eval_every == 0 or last:
                    evaluate(run)
                if every and (step % every == 0 or last) and run.context.is_main:
                    at_end = taken == len(loader)  # the next epoch's generator state is the current one
                    checkpoint.save(
                        run,
                        {
                            "epoch": epoch + at_end,
                            "batch": 0 if at_end else taken,
                            "generator": loader.generator.get_state() if at_end else start_state,
                        },
                    )
                if step >= state.total_steps:
                    break
            state.epoch_times.append(time.perf_counter() - epoch_start)
            epoch, skip = epoch + 1, 0
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
        "bad_steps": state.bad_steps,
        "world_size": run.context.world_size,
        "replicas_identical": state.replicas_identical,
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
        "provenance": run.provenance,
    }


def finish(run: Run) -> dict:
    """Summary, the family's outputs, rank plot and (``save_adapter``) the adapter; closes the records. Only
    rank 0 of a multi-process launch writes."""
    result = summary(run)
    if not run.context.is_main:
        return result
    result.update(run.family.finish(run.adapted, run.run_dir, run.records))
    if run.adapted.adapts_ranks:  # (W&B has it from the final evaluation)
        _rank_plot(run)
    if run.cfg.save_adapter:
        run.adapted.save(run.run_dir / "adapter")
    run.records.write_json("summary.json", result)
    run.records.close(_flat_summary(result))
    return result


def train(cfg, run_dir: str | Path) -> dict:
    """Run one configured experiment into ``run_dir`` (resuming from its checkpoint, if any); returns the
    summary it also writes. ``trainer.max_bad_steps`` steps in a row with a non-finite loss or gradient end
    the run as ``diverged``."""
    run = setup(cfg, run_dir)
    try:
        fit(run, run.position)
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
