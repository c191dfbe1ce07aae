"""GeoLoRA inside transformers.Trainer: ranks in every log entry (ahead of the reporters), exact resume from
the Trainer's own checkpoint, bf16, and other optimizers refused."""

from __future__ import annotations

import pytest
import torch
from conftest import deberta_config, tiny_deberta
from transformers import Trainer, TrainerCallback, TrainingArguments

import geolora
from geolora.integrations.transformers import GeoLoRACallback

pytestmark = pytest.mark.slow  # transformers.Trainer runs: `make test-all`


class Examples(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids, self.labels = torch.randint(0, 64, (n, 12), generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Recorder(TrainerCallback):
    """Stands in for a reporting callback (W&B, TensorBoard): keeps what each log event showed it."""

    def __init__(self) -> None:
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def _trainer(tmp_path, callbacks, **args) -> Trainer:
    model = geolora.inject(tiny_deberta(), deberta_config(tau=0.1))
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=2,
        save_steps=6,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        save_strategy="steps",
    )
    optimizer = geolora.GeoLoRAOptimizer(model, lr=2e-2)
    return Trainer(
        model=model,
        args=TrainingArguments(**{**settings, **args}),
        train_dataset=Examples(),
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )


def test_ranks_reach_every_log_entry_and_the_reporters(tmp_path):
    recorder = Recorder()
    trainer = _trainer(tmp_path, [recorder, GeoLoRACallback()])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 6
    final = geolora.ranks(trainer.model)
    assert logged[-1]["geolora/total_rank"] == sum(final.values())
    assert {k.removeprefix("geolora/rank/") for k in logged[-1] if k.startswith("geolora/rank/")} == set(final)
    assert all("geolora/trainable_params" in entry for entry in recorder.seen)  # reporters see them too


def test_resume_from_a_trainer_checkpoint_is_exact(tmp_path):
    straight = _trainer(tmp_path / "a", [GeoLoRACallback()])
    straight.train()
    resumed = _trainer(tmp_path / "b", [GeoLoRACallback()])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert geolora.ranks(resumed.model) == geolora.ranks(straight.model)
    for (name, mine), theirs in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(mine, theirs), name
    ranks_changed = {e["geolora/total_rank"] for e in straight.state.log_history if "geolora/total_rank" in e}
    assert len(ranks_changed) > 1  # the ranks did move between the checkpoint and the end


def test_bf16_trainer_run(tmp_path):
    trainer = _trainer(tmp_path, [GeoLoRACallback()], bf16=True, max_steps=4, save_strategy="no")
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_other_optimizers_are_refused_before_they_step():
    model = geolora.inject(tiny_deberta(), deberta_config())
    batch = Examples()[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="GeoLoRAOptimizer"):
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, (p for p in model.parameters() if p.requires_grad)))
    torch.optim.AdamW([model.classifier.weight], lr=1e-3).step()  # parameters outside the bases: as usual
