"""Rank evolution in W&B: an offline run read back (no network) holds every adapted layer's rank series, the
total rank and the parameters in use at every log step, and a rank heatmap at every evaluation."""

from __future__ import annotations

import pytest
from test_harness import compose_run, read_ranks
from wandb_records import history, run_file, run_info

from experiments.train import train

pytestmark = pytest.mark.slow  # W&B runs read back: `make test-all`


@pytest.mark.parametrize("method", ["geolora", "adalora", "lora"])
def test_an_offline_run_holds_a_rank_series_for_every_layer(tmp_path, monkeypatch, method):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_run(
        f"method={method}",
        "trainer.max_steps=20",
        "trainer.log_every=5",
        "trainer.eval_every=10",
        "trainer.batch_size=8",
        "task.max_train_samples=160",
        "task.max_eval_samples=16",
        "method.tinit=2",
        "method.tfinal=4",
        "method.delta_t=2",
        "logger=wandb",
        "progress=false",
    )
    train(cfg, tmp_path)
    rows = history(run_file(tmp_path))
    layers = read_ranks(tmp_path)[20]  # the last ranks in ranks.csv
    assert len(layers) == 36
    series = {
        name: {r["_step"]: r[f"geolora/rank/{name}"] for r in rows if f"geolora/rank/{name}" in r} for name in layers
    }
    expected_steps = [0] if method == "lora" else [0, 5, 10, 15, 20]  # LoRA's fixed ranks: once
    for name, values in series.items():
        assert sorted(values) == expected_steps, name
        assert values[max(values)] == layers[name]
    totals = {r["_step"]: r["geolora/total_rank"] for r in rows if "geolora/total_rank" in r}
    assert totals[max(totals)] == sum(layers.values())
    assert all("geolora/trainable_params" in r for r in rows if "geolora/total_rank" in r)
    assert any("train/step_time_s" in r for r in rows) and any("wall_time_s" in r for r in rows)
    heatmaps = sorted(r["_step"] for r in rows if r.get("ranks/_type") == "image-file")
    assert heatmaps == ([] if method == "lora" else [10, 20])  # one per evaluation: the media slider
    info = run_info(run_file(tmp_path))
    assert info.job_type == method and {"task:movie_reviews", "seed:0"} <= set(info.tags)


def test_the_environment_chooses_the_w_and_b_mode_unless_the_command_line_does(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_run().logger.mode == "disabled"
    assert compose_run("logger.mode=online").logger.mode == "online"
    monkeypatch.delenv("WANDB_MODE")
    assert compose_run().logger.mode == "offline"
