"""Multi-process training: `torchrun --standalone --nproc_per_node=2 run.py ...` on CPU (gloo) trains with one
run folder, rank 0 writing, and replicas that stay identical; batches split into contiguous shares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness_fixtures import tiny_deberta_dir, write_text_task

from experiments import distributed
from experiments.errors import UserError

pytestmark = pytest.mark.slow  # 2-process torchrun launches: `make test-all`

ROOT = Path(__file__).resolve().parents[1]


def test_batches_split_into_contiguous_shares():
    batch = {"x": torch.arange(10), "y": torch.arange(10) * 2}
    shares = [distributed.shard(batch, distributed.Context(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([s["x"] for s in shares]), batch["x"]) and len(shares[0]["y"]) == 5
    odd = [distributed.shard({"x": torch.arange(5)}, distributed.Context(r, 2))["x"].tolist() for r in range(2)]
    assert odd == [[0, 1, 2], [3, 4]]  # a short last batch: as even as it goes
    assert distributed.shard({"x": torch.arange(1)}, distributed.Context(1, 2)) is None  # fewer than processes
    with pytest.raises(UserError, match="trainer.batch_size=6"):
        distributed.check_batch_size(6, distributed.Context(0, 4))


@pytest.mark.parametrize(
    "method,extra,evaluations",
    [
        ("geolora", [], 4),
        ("adalora", [], 4),
        # cycles of 4 steps, evaluated mid-cycle (at the augmented rank) and after truncations
        ("geolora", ["method.coefficient_steps=3", "trainer.eval_every=3"], 6),
    ],
    ids=["geolora", "adalora", "geolora-c3"],
)
def test_torchrun_two_processes_on_cpu(tmp_path, method, extra, evaluations):
    model, data = tiny_deberta_dir(tmp_path / "model"), tmp_path / "rte"
    write_text_task(
        data, ["sentence1", "sentence2"], 2, ["entailment", "not_entailment"], ["train", "validation"], rows=64
    )
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "run.py"),
        "model=deberta",
        f"model.name_or_path={model}",
        "task=glue/rte",
        f"task.data_dir={data}",
        f"method={method}",
        "trainer.epochs=2",
        "trainer.batch_size=8",
        *(extra if any(e.startswith("trainer.eval_every") for e in extra) else ["trainer.eval_every=4", *extra]),
        "logger=none",
        "progress=false",
        "trainer.threads=1",
        "method.tinit=2",
        "method.tfinal=6",
        "method.delta_t=2",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["replicas_identical"]
    assert summary["steps"] == 16  # the global batch of 8 over 64 examples, 2 epochs
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert sum("eval/accuracy" in r for r in records) == evaluations  # one writer: each evaluation once
    assert (run_dir / "checkpoint" / "state.json").is_file()
    assert out.stdout.count("finished: eval/accuracy") == 1  # one console: rank 0's
    assert not any(p.name != "run" for p in tmp_path.iterdir() if p.is_dir() and p.name not in ("model", "rte"))
