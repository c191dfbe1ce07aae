"""Causal language modelling as a task family: the next-token loss on text (the prompt's tokens masked where the
task has a prompt template), held-out perplexity over every evaluation split (token-weighted), and a few greedy
generations written to the run folder (``generations.jsonl``)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import data as data_lib
from . import distributed
from .errors import UserError
from .models import autocast, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)
IGNORE = -100  # label of a token the loss skips (prompt, padding)


def _special(tokenizer, *names: str) -> int | None:
    """The first of the tokenizer's special tokens that it has (a Llama tokenizer has bos/eos, BERT's cls/sep)."""
    return next(
        (getattr(tokenizer, f"{n}_token_id") for n in names if getattr(tokenizer, f"{n}_token_id") is not None), None
    )


class Examples:
    """Token ids of a prompt and its text: ``[bos] prompt text [eos]``, the loss on the text and eos only."""

    def __init__(self, tokenizer, task) -> None:
        self.tokenizer, self.task = tokenizer, task
        self.bos, self.eos = _special(tokenizer, "bos", "cls"), _special(tokenizer, "eos", "sep")
        self.pad = _special(tokenizer, "pad", "eos", "sep")

    def prompt(self, row: dict) -> str:
        template = self.task.prompt_template
        try:
            return template.format(**row) if template else ""
        except KeyError as err:
            raise UserError(
                f"task.prompt_template names a column {err} the data lacks; it has {sorted(row)}"
            ) from None

    def encode(self, row: dict) -> dict[str, list[int]]:
        ids = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
        prompt, text = ids(self.prompt(row)), ids(row[self.task.text_keys[0]])
        head = ([self.bos] if self.bos is not None else []) + prompt
        tail = text + ([self.eos] if self.eos is not None else [])
        input_ids = (head + tail)[: self.task.max_length]
        labels = ([IGNORE] * len(head) + tail)[: self.task.max_length]
        return {"input_ids": input_ids, "labels": labels}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded to the longest row; padding is masked out of attention and loss."""
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            gap = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad] * gap)
            batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * gap)
            batch["labels"].append(r["labels"] + [IGNORE] * gap)
        return {k: torch.tensor(v) for k, v in batch.items()}


@dataclass
class CausalLM:
    """Next-token prediction: the model's own (shifted) loss, perplexity on held-out text, greedy samples."""

    task: Any
    examples: Examples
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    prompts: list[str]  # what the generations at the end continue
    shardable: bool = True
    context: distributed.Context = field(default_factory=distributed.Context)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def start(self, model: nn.Module, device: torch.device, precision: str) -> None:
        self.device, self.precision = device, precision

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, precision: str, progress: bool) -> dict[str, float]:
        """Per split: the mean next-token loss over every text token, and its exponential, the perplexity."""
        model.eval()
        results = {}
        for split, loader in self.eval_loaders.items():
            sums = []  # (batch index, summed loss, tokens); each process takes every world_size-th batch
            for index, batch in enumerate(tqdm(loader, desc=f"eval {split}", leave=False, disable=not progress)):
                if index % self.context.world_size != self.context.rank:
                    continue
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(precision, device):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                sums.append((index, float(loss), int((labels != IGNORE).sum())))
            sums = distributed.gather_sorted(sums, self.context)
            mean = sum(s[1] for s in sums) / max(sum(s[2] for s in sums), 1)
            prefix = f"{split}/" if len(self.eval_loaders) > 1 else ""
            results[prefix + "loss"] = mean
            results[prefix + "perplexity"] = math.exp(min(mean, 700.0))
        model.train()
        return results

    @torch.no_grad()
    def finish(self, adapted, run_dir: Path, records) -> dict:
        """Greedy continuations of the prompts into ``generations.jsonl`` (and the summary)."""
        model, tokenizer, examples = adapted.model, self.examples.tokenizer, self.examples
        model.eval()
        generations = []
        for prompt in self.prompts:
            ids = ([examples.bos] if examples.bos is not None else []) + tokenizer(prompt, add_special_tokens=False)[
                "input_ids"
            ]
            inputs = torch.tensor([ids], device=self.device)
            with autocast(self.precision, self.device):
                out = model.generate(
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    max_new_tokens=self.task.generation_tokens,
                    do_sample=False,
                    pad_token_id=examples.pad,
                    eos_token_id=examples.eos,
                )
            text = tokenizer.decode(out[0, inputs.shape[1] :], skip_special_tokens=True)
            generations.append({"prompt": prompt, "generation": text})
        with open(run_dir / "generations.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(g) + "\n" for g in generations)
        model.train()
        return {"generations": generations}


def causal_lm(cfg) -> tuple[nn.Module, CausalLM]:
    """The model (``AutoModelForCausalLM``) and the family of a causal-LM run."""
    task, trainer = cfg.task, cfg.trainer
    tokenizer = load_tokenizer(cfg.model)
    data = data_lib.load_task_data(task, labels=False)
    examples = Examples(tokenizer, task)
    for key in (*task.text_keys[:1], *task.prompt_keys):
        if key not in data[task.train_split].column_names:
            raise UserError(f"task {task.name!r}: no text column {key!r}; set task.text_keys / task.prompt_keys")
    first = data[task.eval_splits[0]]
    prompts = [
        examples.prompt(row) or " ".join(row[task.text_keys[0]].split()[: task.generation_prompt_words])
        for row in first.select(range(min(task.generations, len(first))))
    ]
    encoded = {name: split.map(examples.encode, remove_columns=split.column_names) for name, split in data.items()}
    generator = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(
        encoded[task.train_split],
        batch_size=trainer.batch_size,
        shuffle=True,
        collate_fn=examples.collate,
        generator=generator,
        num_workers=trainer.num_workers,
    )
    evals = {
        split: DataLoader(encoded[split], batch_size=trainer.eval_batch_size, collate_fn=examples.collate)
        for split in task.eval_splits
    }
    return load_causal_lm(cfg.model, len(tokenizer)), CausalLM(task, examples, train, evals, prompts)
