"""Runs that survive: a kill -9 and a rerun end exactly where the uninterrupted run ends; checkpoints that do
not fit give one line; bad steps (non-finite loss or gradients) are skipped, counted, and end a run as
diverged when they keep coming."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness_fixtures import write_text_task
from test_harness import RTE_LABELS, compose_run, smoke

from experiments import tasks
from experiments.errors import UserError
from experiments.train import train

pytestmark = pytest.mark.slow  # kill -9 and rerun of real runs: `make test-all`

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rte_dir(tmp_path_factory):
    return write_text_task(
        tmp_path_factory.mktemp("rte"), ["sentence1", "sentence2"], 2, RTE_LABELS, ["train", "validation"], rows=96
    )


def _command(model_dir, data_dir, run_dir, method, checkpoint_every=8, extra=()):
    return [
        sys.executable,
        str(ROOT / "run.py"),
        "model=deberta",
        f"model.name_or_path={model_dir}",
        "task=glue/rte",
        f"task.data_dir={data_dir}",
        f"method={method}",
        "trainer.epochs=10",
        "trainer.batch_size=4",
        "trainer.eval_every=24",
        f"trainer.checkpoint_every={checkpoint_every}",
        "trainer.log_every=4",
        "logger=none",
        "progress=false",
        "method.tinit=4",
        "method.tfinal=40",
        "method.delta_t=4",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _last_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(zip(steps, [tuple(sorted(r)) for r in records])))  # no duplicate rows
    return [r["train/loss"] for r in records if "train/loss" in r][-1]


@pytest.mark.parametrize(
    "method,checkpoint_every,extra",
    [
        ("geolora", 8, ()),
        ("adalora", 8, ()),
        # cycles of 4 steps, checkpoints every 6: the run is killed after step 18, mid-cycle at the augmented rank
        ("geolora", 6, ("method.coefficient_steps=3",)),
    ],
    ids=["geolora", "adalora", "geolora-c3"],
)
def test_kill_and_rerun_ends_like_the_uninterrupted_run(
    deberta_dir, rte_dir, tmp_path, method, checkpoint_every, extra
):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = lambda run_dir: _command(deberta_dir, rte_dir, run_dir, method, checkpoint_every, extra)  # noqa: E731
    straight = tmp_path / "straight"
    subprocess.run(command(straight), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "state.json"
    while process.poll() is None:  # kill -9 once the second checkpoint is on disk
        if state.is_file() and json.loads(state.read_text())["step"] >= 16:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "summary.json").is_file()
    if extra and json.loads(state.read_text())["step"] % 4:  # the checkpoint it resumes from is mid-cycle
        saved = torch.load(killed / "checkpoint" / "state.pt", weights_only=False)
        assert saved["optimizer"]["param_groups"][0]["pending"]
    rerun = subprocess.run(command(killed), check=True, env=env, capture_output=True, text=True)
    assert "resuming from" in rerun.stdout + rerun.stderr

    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, killed))
    assert b["status"] == "finished" and b["steps"] == a["steps"] == 240
    assert b["ranks_final"] == a["ranks_final"]
    for key, value in a["final"].items():
        if key.startswith("eval/"):
            assert math.isclose(b["final"][key], value, abs_tol=1e-6), key
    assert math.isclose(_last_loss(killed), _last_loss(straight), abs_tol=1e-6)


def test_a_checkpoint_that_does_not_fit_is_one_line(deberta_dir, rte_dir, tmp_path):
    cfg = smoke(deberta_dir, rte_dir, "glue/rte", "geolora", "trainer.checkpoint_every=3")
    train(cfg, tmp_path)
    (tmp_path / "summary.json").unlink()
    other = smoke(deberta_dir, rte_dir, "glue/rte", "geolora", "method.init_rank=2", "method.max_rank=4")  # shapes
    with pytest.raises(UserError, match="does not fit this run.*resume=false"):
        train(other, tmp_path)
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="checkpoint .* resume=false"):
        train(cfg, tmp_path)
    summary = train(smoke(deberta_dir, rte_dir, "glue/rte", "geolora", "resume=false"), tmp_path)
    assert summary["status"] == "finished" and summary["steps"] == 6


def _nan_at(monkeypatch, steps: set[int]):
    """Test hook: the loss of the given (1-based) steps is NaN."""
    calls = {"n": 0}
    original = tasks.Classification.loss

    def loss(self, model, batch):
        calls["n"] += 1
        value = original(self, model, batch)
        return value * float("nan") if calls["n"] in steps else value

    monkeypatch.setattr(tasks.Classification, "loss", loss)


@pytest.mark.parametrize("method", ["geolora", "lora"])
def test_bad_steps_are_skipped_and_counted(deberta_dir, rte_dir, tmp_path, monkeypatch, method):
    _nan_at(monkeypatch, {3, 4})
    summary = train(smoke(deberta_dir, rte_dir, "glue/rte", method, "trainer.log_every=1"), tmp_path)
    assert summary["status"] == "finished" and summary["bad_steps"] == 2
    assert all(math.isfinite(v) for v in summary["final"].values() if isinstance(v, float))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["train/bad_steps"] for r in records if "train/bad_steps" in r] == [0, 0, 1, 2, 2, 2]


def test_bad_steps_in_a_row_end_the_run_as_diverged(deberta_dir, rte_dir, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2, 3, 4})
    summary = train(smoke(deberta_dir, rte_dir, "glue/rte", "geolora"), tmp_path)
    assert summary["status"] == "diverged" and summary["steps"] == 4 and summary["bad_steps"] == 3


def test_a_huge_learning_rate_on_the_default_job_ends_diverged(tmp_path):
    cfg = compose_run(
        "trainer.lr=1e30", "task.max_train_samples=256", "task.max_eval_samples=32", "logger=none", "progress=false"
    )
    summary = train(cfg, tmp_path)
    assert summary["status"] == "diverged" and summary["steps"] < 8
    assert torch.isfinite(torch.tensor(summary["trainable_params_final"], dtype=torch.float64))
