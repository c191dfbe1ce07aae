"""One run: load data and model, adapt with the chosen method, train, evaluate, record."""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import data as data_lib
from .config import validate
from .errors import UserError
from .methods import adapt
from .metrics import compute_metrics
from .models import image_statistics, load_model, load_tokenizer, pick_device
from .plots import rank_heatmap
from .records import RunRecords

log = logging.getLogger(__name__)


def _loaders(cfg, data, tokenizer, model_cfg):
    task, trainer = cfg.task, cfg.trainer
    generator = torch.Generator().manual_seed(cfg.seed)
    if task.modality.value == "text":
        from transformers import DataCollatorWithPadding

        data = data_lib.tokenize(data, tokenizer, task)
        train_collate = eval_collate = DataCollatorWithPadding(tokenizer)
    else:
        mean, std = image_statistics(model_cfg)
        train_collate = data_lib.ImageBatches(task, mean, std, train=True)
        eval_collate = data_lib.ImageBatches(task, mean, std, train=False)
    train = DataLoader(data[task.train_split], batch_size=trainer.batch_size, shuffle=True, drop_last=False,
                       collate_fn=train_collate, generator=generator, num_workers=trainer.num_workers)
    evals = {split: DataLoader(data[split], batch_size=trainer.eval_batch_size, collate_fn=eval_collate,
                               num_workers=trainer.num_workers) for split in task.eval_splits}
    return train, evals


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, loaders, task, device, precision: str, progress: bool) -> dict[str, float]:
    """Task metrics on every evaluation split; keys prefixed with the split when there are several."""
    model.eval()
    results = {}
    for split, loader in loaders.items():
        preds, labels = [], []
        for batch in tqdm(loader, desc=f"eval {split}", leave=False, disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(precision, device):
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            preds.append(logits.float().cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
        metrics = compute_metrics(task.metric, np.concatenate(preds), np.concatenate(labels))
        prefix = f"{split}/" if len(loaders) > 1 else ""
        results.update({prefix + k: v for k, v in metrics.items()})
    model.train()
    return results


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def train(cfg, run_dir: str | Path) -> dict:
    """Run one configured experiment into ``run_dir``; returns the summary it also writes."""
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = pick_device(cfg.trainer.device)
    task, trainer = cfg.task, cfg.trainer

    data = data_lib.load_task_data(task)
    tokenizer = load_tokenizer(cfg.model) if task.modality.value == "text" else None
    train_loader, eval_loaders = _loaders(cfg, data, tokenizer, cfg.model)
    steps_per_epoch = len(train_loader)
    total_steps = math.ceil(trainer.epochs * steps_per_epoch)
    if trainer.max_steps:
        total_steps = min(total_steps, trainer.max_steps) if trainer.epochs > 0 else trainer.max_steps
    model = load_model(cfg.model, task)
    try:
        adapted = adapt(model, cfg.model, cfg.method, trainer, total_steps)
    except ValueError as err:  # the library's and peft's checks of the adapter settings
        raise UserError(f"method {cfg.method.name.value}: {err}") from err
    model = adapted.model.to(device)
    optimizer = adapted.optimizer
    warmup = trainer.warmup_steps or int(trainer.warmup_ratio * total_steps)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision.value == "fp16")

    name = cfg.run_name or f"{cfg.method.name.value}-{task.name}-s{cfg.seed}"
    records = RunRecords(run_dir, cfg.logger if cfg.logger.name == "wandb" else None,
                         OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), name)
    log.info("run %s: %d steps (%d per epoch), %d trainable parameters in use", name, total_steps,
             steps_per_epoch, adapted.trainable())
    initial_ranks = adapted.ranks()
    records.log_ranks(0, initial_ranks)
    records.log(0, {"trainable_params": adapted.trainable(), "total_rank": sum(initial_ranks.values())})
    step_times, epoch_times, history = [], [], []
    best: dict[str, float] = {}
    eval_every = trainer.eval_every or steps_per_epoch
    step, start = 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc=name, disable=not cfg.progress)
    model.train()
    try:
        while step < total_steps:
            epoch_start = time.perf_counter()
            for batch in train_loader:
                tick = time.perf_counter()
                batch = {k: v.to(device) for k, v in batch.items()}
                with _autocast(trainer.precision.value, device):
                    loss = model(**batch).loss
                scaler.scale(loss).backward()
                if trainer.max_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                adapted.after_step(step)
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_times.append(time.perf_counter() - tick)
                step += 1
                bar.update(1)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step}")
                if step % trainer.log_every == 0 or step == total_steps:
                    records.log(step, {"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                                       "train/step_time_s": step_times[-1]})
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if step % trainer.log_every == 0 or step % eval_every == 0 or step == total_steps:
                    records.log_ranks(step, adapted.ranks())
                if step % eval_every == 0 or step == total_steps:
                    metrics = evaluate(model, eval_loaders, task, device, trainer.precision.value, cfg.progress)
                    ranks = adapted.ranks()
                    record = {**{f"eval/{k}": v for k, v in metrics.items()},
                              "trainable_params": adapted.trainable(), "total_rank": sum(ranks.values()),
                              "epoch": step / steps_per_epoch, "wall_time_s": time.perf_counter() - start}
                    records.log(step, record)
                    history.append(record)
                    for key, value in metrics.items():
                        if not math.isnan(value) and value > best.get(key, -math.inf):
                            best[key] = value
                    log.info("step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
                if step >= total_steps:
                    break
            epoch_times.append(time.perf_counter() - epoch_start)
        status = "finished"
    except FloatingPointError as err:
        log.error("%s", err)
        status = "diverged"
    except BaseException as err:  # keep what was measured, then let the error surface
        status = f"failed: {type(err).__name__}: {err}"
        records.write_json("summary.json", _summary(cfg, name, adapted, status, step, total_steps, history, best,
                                                    step_times, epoch_times, start, device))
        records.close()
        raise
    finally:
        bar.close()
    summary = _summary(cfg, name, adapted, status, step, total_steps, history, best, step_times, epoch_times,
                       start, device)
    if cfg.method.name.value in ("geolora", "adalora"):
        png = rank_heatmap(run_dir / "ranks.csv", run_dir / "ranks.png", f"{name}: rank per layer")
        records.log_image("ranks", png)
    if cfg.save_adapter and cfg.method.name.value == "geolora":
        import geolora

        geolora.save_adapter(model, run_dir / "adapter")
    elif cfg.save_adapter:
        model.save_pretrained(str(run_dir / "adapter"))
    records.write_json("summary.json", summary)
    records.close(_flat_summary(summary))
    return summary


def _summary(cfg, name, adapted, status, step, total_steps, history, best, step_times, epoch_times, start,
             device) -> dict:
    """What summary.json holds: final and best metrics, ranks, parameters in use, times, memory."""
    return {
        "name": name, "status": status,
        "diverged": status == "diverged", "method": cfg.method.name.value, "task": cfg.task.name,
        "model": cfg.model.name, "pretrained": cfg.model.pretrained, "seed": cfg.seed, "steps": step,
        "total_steps": total_steps, "main_metric": f"eval/{cfg.task.main_metric}",
        "final": history[-1] if history else {}, "best": {f"eval/{k}": v for k, v in best.items()},
        "trainable_params_final": adapted.trainable(), "ranks_final": adapted.ranks(),
        "step_time_median_s": statistics.median(step_times) if step_times else None,
        "epoch_time_s": epoch_times, "total_time_s": time.perf_counter() - start,
        "peak_memory_mb": _peak_memory_mb(device), "device": str(device), "method_settings": adapted.settings,
    }


def _flat_summary(summary: dict) -> dict:
    flat = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    flat.update({f"final/{k}": v for k, v in summary["final"].items()})
    flat.update({f"best/{k}": v for k, v in summary["best"].items()})
    return flat
