"""Task families: what a run trains (the model and its data), the loss of a batch (the objective) and
the metrics (the evaluator). The training loop knows only this interface (``train_loader``, ``loss``,
``start``, ``evaluate``, ``finish``); classification of text and of images is one family, DreamBooth
(experiments/dreambooth.py) another, and a new family is one more builder in ``FAMILIES``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import data as data_lib
from . import distributed
from .errors import UserError
from .metrics import compute_metrics
from .models import autocast, image_statistics, load_model, load_tokenizer


@dataclass
class Classification:
    """Sequence or image classification (and regression, ``num_labels`` 1): the model's own loss on
    labelled batches, metrics over every evaluation split."""

    task: Any
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    shardable: bool = True  # batches split over processes (experiments.distributed): a mean loss per example
    context: distributed.Context = field(default_factory=distributed.Context)  # set by the loop under torchrun

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def start(self, model: nn.Module, device: torch.device, precision: str) -> None:
        """Before training (the adapted model still computes the base model): nothing to record."""

    def finish(self, adapted, run_dir, records) -> dict:
        """After training: no outputs beyond the loop's; no summary entries."""
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, precision: str, progress: bool) -> dict[str, float]:
        """Task metrics on every evaluation split; keys prefixed with the split when there are several."""
        model.eval()
        results = {}
        for split, loader in self.eval_loaders.items():
            outputs = []  # (batch index, predictions, labels); each process takes every world_size-th batch
            for index, batch in enumerate(tqdm(loader, desc=f"eval {split}", leave=False, disable=not progress)):
                if index % self.context.world_size != self.context.rank:
                    continue
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(precision, device):
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                outputs.append((index, logits.float().cpu().numpy(), batch["labels"].cpu().numpy()))
            outputs = distributed.gather_sorted(outputs, self.context)
            preds, labels = np.concatenate([o[1] for o in outputs]), np.concatenate([o[2] for o in outputs])
            metrics = compute_metrics(self.task.metric, preds, labels)
            prefix = f"{split}/" if len(self.eval_loaders) > 1 else ""
            results.update({prefix + k: v for k, v in metrics.items()})
        model.train()
        return results


def classification(cfg) -> tuple[nn.Module, Classification]:
    """The model (a sequence or image classifier) and the family of a classification run."""
    task, trainer = cfg.task, cfg.trainer
    data = data_lib.load_task_data(task)
    if task.modality.value == "text":
        from transformers import DataCollatorWithPadding

        tokenizer = load_tokenizer(cfg.model)
        data = data_lib.tokenize(data, tokenizer, task)
        train_collate = eval_collate = DataCollatorWithPadding(tokenizer)
    else:
        mean, std = image_statistics(cfg.model)
        train_collate = data_lib.ImageBatches(task, mean, std, train=True)
        eval_collate = data_lib.ImageBatches(task, mean, std, train=False)
    generator = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(
        data[task.train_split],
        batch_size=trainer.batch_size,
        shuffle=True,
        drop_last=False,
        collate_fn=train_collate,
        generator=generator,
        num_workers=trainer.num_workers,
    )
    evals = {
        split: DataLoader(
            data[split], batch_size=trainer.eval_batch_size, collate_fn=eval_collate, num_workers=trainer.num_workers
        )
        for split in task.eval_splits
    }
    return load_model(cfg.model, task), Classification(task, train, evals)


def dreambooth(cfg) -> tuple[nn.Module, Any]:
    from .dreambooth import dreambooth as build_dreambooth  # diffusers loads only for this family

    return build_dreambooth(cfg)


def causal_lm(cfg) -> tuple[nn.Module, Any]:
    from .causal_lm import causal_lm as build_causal_lm

    return build_causal_lm(cfg)


FAMILIES: dict[str, Callable[[Any], tuple[nn.Module, Any]]] = {
    "classification": classification,
    "dreambooth": dreambooth,
    "causal_lm": causal_lm,
}


def build(cfg) -> tuple[nn.Module, Any]:
    """The model and the task family of a run (``task.family``)."""
    if cfg.task.family not in FAMILIES:
        raise UserError(f"task.family={cfg.task.family!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.task.family](cfg)
