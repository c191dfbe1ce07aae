"""The experiment harness end to end on tiny local models and data (no network)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from harness_fixtures import write_text_task
from hydra import compose, initialize_config_dir
from torch import nn

from experiments.config import register
from experiments.errors import UserError
from experiments.methods import adalora_target_rank
from experiments.train import train

pytestmark = (
    pytest.mark.slow
)  # harness runs and Hydra subprocesses (one run per family in make test: test_presets): `make test-all`

ROOT = Path(__file__).resolve().parents[1]
RTE_LABELS = ["entailment", "not_entailment"]
register()


@pytest.fixture(scope="module")
def rte_dir(tmp_path_factory):
    return write_text_task(
        tmp_path_factory.mktemp("rte"), ["sentence1", "sentence2"], 2, RTE_LABELS, ["train", "validation"]
    )


@pytest.fixture(scope="module")
def stsb_dir(tmp_path_factory):
    return write_text_task(tmp_path_factory.mktemp("stsb"), ["sentence1", "sentence2"], 1, [], ["train", "validation"])


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def smoke(model_dir, data_dir, task="glue/rte", method="geolora", *extra):
    return compose_run(
        "model=deberta",
        f"model.name_or_path={model_dir}",
        f"task={task}",
        f"task.data_dir={data_dir}",
        f"method={method}",
        "trainer.max_steps=6",
        "trainer.batch_size=8",
        "trainer.eval_every=3",
        "trainer.log_every=2",
        "trainer.precision=fp32",
        "logger=none",
        "progress=false",
        *extra,
    )


def read_ranks(run_dir: Path) -> dict[int, dict[str, int]]:
    by_step: dict[int, dict[str, int]] = {}
    for row in csv.DictReader(open(run_dir / "ranks.csv")):
        by_step.setdefault(int(row["step"]), {})[row["layer"]] = int(row["rank"])
    return by_step


@pytest.mark.parametrize("method", ["geolora", "lora", "adalora"])
def test_each_method_trains_and_writes_the_run_files(method, deberta_dir, rte_dir, tmp_path):
    extra = ["method.tinit=1", "method.tfinal=1", "method.delta_t=1"] if method == "adalora" else []
    summary = train(smoke(deberta_dir, rte_dir, "glue/rte", method, *extra), tmp_path)
    for name in ("metrics.jsonl", "summary.json", "ranks.csv", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "ranks.png").is_file() == (method != "lora")
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert 0.0 <= summary["final"]["eval/accuracy"] <= 1.0
    assert summary["trainable_params_final"] > 0 and summary["step_time_median_s"] > 0
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any("train/loss" in r for r in records) and sum("eval/accuracy" in r for r in records) == 2
    ranks = read_ranks(tmp_path)
    assert len(ranks[6]) == 12  # 2 layers x (q, k, v, attention.output, intermediate, output)
    provenance = summary["provenance"]
    assert len(provenance["commit"]) == 40 and isinstance(provenance["dirty"], bool)
    assert provenance["versions"]["torch"] == torch.__version__ and provenance["device"] == "cpu"


def test_run_folders_are_cleaned_for_commit(tmp_path):
    from experiments.records import clean_for_commit

    run = tmp_path / "runs" / "r"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (run / ".hydra" / "hydra.yaml").write_text(f"cwd: {tmp_path}\n")
    (run / "run.log").write_text(f"run folder {run}\n")
    (run / "summary.json").write_text('{"status": "finished"}')
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.pt").write_bytes(b"x")
    assert clean_for_commit(tmp_path / "runs", tmp_path) == 3
    assert not (run / "checkpoint").exists()
    assert (run / "run.log").read_text() == "run folder ./runs/r\n"
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["overrides.yaml"]


def test_adalora_really_reallocates_ranks(deberta_dir, rte_dir, tmp_path):
    cfg = smoke(
        deberta_dir,
        rte_dir,
        "glue/rte",
        "adalora",
        "method.init_rank=6",
        "method.target_r=2",
        "method.tinit=1",
        "method.tfinal=2",
        "method.delta_t=1",
        "trainer.max_steps=10",
    )
    train(cfg, tmp_path)
    ranks = read_ranks(tmp_path)
    assert set(ranks[0].values()) == {6}
    assert sum(ranks[10].values()) < sum(ranks[0].values())  # update_and_allocate ran and masked ranks


def test_adalora_rank_budget_means_total_rank_over_layers():
    model = nn.ModuleDict(
        {
            "a": nn.ModuleDict({"query": nn.Linear(4, 4), "value": nn.Linear(4, 4)}),
            "b": nn.ModuleDict({"query": nn.Linear(4, 4), "other": nn.Linear(4, 4)}),
        }
    )
    model_cfg = SimpleNamespace(target_modules=["query", "value"])
    method = SimpleNamespace(rank_budget=12, target_r=8)
    assert adalora_target_rank(model, model_cfg, method) == 4  # 12 over the 3 matching layers
    assert adalora_target_rank(model, model_cfg, SimpleNamespace(rank_budget=None, target_r=8)) == 8


def test_lora_rejects_a_rank_budget(tmp_path):
    with pytest.raises(UserError, match="rank_budget is for geolora and adalora"):
        train(compose_run("method=lora", "method.rank_budget=10", "logger=none"), tmp_path)


def test_geolora_logs_changing_ranks(deberta_dir, rte_dir, tmp_path):
    train(smoke(deberta_dir, rte_dir, "glue/rte", "geolora", "method.init_rank=4", "method.tau=0.3"), tmp_path)
    ranks = read_ranks(tmp_path)
    assert ranks[0] != ranks[6]


def test_stsb_like_regression_reports_correlations(deberta_dir, stsb_dir, tmp_path):
    summary = train(smoke(deberta_dir, stsb_dir, "glue/stsb", "geolora"), tmp_path)
    assert {"eval/pearson", "eval/spearman"} <= set(summary["final"])
    assert summary["main_metric"] == "eval/pearson"


def test_paper_hparams_reach_the_run():
    cfg = compose_run("model=deberta", "task=glue/rte", "method=geolora")
    assert (cfg.trainer.lr, cfg.trainer.epochs, cfg.method.init_rank, cfg.method.max_rank) == (1.2e-3, 80, 10, 32)
    assert cfg.method.coefficient_steps == 10 and cfg.task.max_length == 320
    cfg = compose_run("model=deberta", "task=glue/mrpc", "method=adalora")
    assert (cfg.trainer.lr, cfg.method.tinit, cfg.method.tfinal, cfg.method.delta_t) == (1e-3, 600, 1800, 1)
    cfg = compose_run("model=deberta", "task=glue/cola", "method=lora", "trainer.lr=3e-4")
    assert cfg.trainer.lr == 3e-4 and cfg.method.r == 8 and cfg.task.metric == "matthews"


def test_missing_data_dir_is_a_user_error(deberta_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(smoke(deberta_dir, tmp_path / "nowhere"), tmp_path / "run")


def test_hub_name_offline_is_a_user_error(rte_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = smoke("microsoft/deberta-v3-base", rte_dir)
    with pytest.raises(UserError, match="model.name_or_path"):
        train(cfg, tmp_path)


def test_bad_range_fails_before_loading(tmp_path):
    cfg = compose_run("model=deberta", "task=glue/rte", "method.tau=1.5", "logger=none")
    with pytest.raises(UserError, match="tau must lie"):
        train(cfg, tmp_path)  # the hub model is never asked for
    assert not (tmp_path / "metrics.jsonl").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)  # the one-line reports are what is under test
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.foo=1", "Key 'foo' not in 'TrainerConfig'"),
        ("trainer.precision=fp8", "Invalid value 'fp8'"),
        ("method=nope", "Could not find 'method/nope'"),
        ("method.tau=2.0", "method settings: tau must lie in [0, 1)"),
        ("model=deberta", "set model.name_or_path=/path/to/local/copy"),
    ],
)
def test_bad_command_line_gives_one_line_error(override, message, tmp_path):
    result = _cli(override, "logger=none", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_multirun_sweep_lands_in_separate_run_folders(deberta_dir, rte_dir, tmp_path):
    sweep = [
        "-m",
        "model=deberta",
        f"model.name_or_path={deberta_dir}",
        "task=glue/rte",
        f"task.data_dir={rte_dir}",
        "method=geolora,lora",
        "trainer.max_steps=2",
        "trainer.batch_size=8",
        "logger=wandb",
        "progress=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    result = _cli(*sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"]
    assert {json.loads(p.read_text())["method"] for p in summaries} == {"geolora", "lora"}
    assert list((tmp_path / "sweep" / "0" / "wandb").glob("offline-run-*"))  # W&B offline run written

    written = [p for s in summaries for p in (s, s.parent / "run.log", s.parent / "metrics.jsonl")]
    logs = [(p.parent / "run.log").read_text() for p in summaries]
    stamps = [p.stat().st_mtime_ns for p in written]
    again = _cli(*sweep, cwd=tmp_path)  # the same sweep into the same folder
    assert again.returncode == 0 and (again.stdout + again.stderr).count("(done;") == 2
    assert [p.stat().st_mtime_ns for p in written] == stamps  # finished runs are skipped, not redone or logged to
    assert [(p.parent / "run.log").read_text() for p in summaries] == logs


def test_timm_backbone_without_timm_is_one_line(monkeypatch, tmp_path):
    from experiments.models import load_model

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError, as where it is absent
    cfg = _compose_timm(tmp_path)
    with pytest.raises(UserError, match=r"pip install -e \.\[timm\]"):
        load_model(cfg.model, cfg.task)


def test_timm_backbone_trains_where_timm_imports(tmp_path):
    pytest.importorskip("timm")
    cfg = _compose_timm(tmp_path, "model.pretrained=false", "model.model_type=vit_tiny_patch16_224")
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and summary["ranks_final"]
    assert all(".attn.qkv" in n or ".attn.proj" in n or ".mlp.fc" in n for n in summary["ranks_final"])


def _compose_timm(tmp_path, *extra):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "model=vit_timm",
                "task=digits",
                "task.image_size=224",
                "trainer.max_steps=2",
                "trainer.batch_size=4",
                "logger=none",
                "progress=false",
                "task.max_train_samples=8",
                "task.max_eval_samples=8",
                *extra,
            ],
        )


def test_console_is_quiet_unless_verbose(deberta_dir, rte_dir, tmp_path, capfd):
    """The libraries' progress bars and warnings (here: loading the weights, mapping the data) show only verbose."""
    train(smoke(deberta_dir, rte_dir, "glue/rte", "lora"), tmp_path / "quiet")
    quiet = capfd.readouterr()
    assert "Loading weights" not in quiet.err and "Map:" not in quiet.err and "Warning" not in quiet.err
    train(smoke(deberta_dir, rte_dir, "glue/rte", "lora", "verbose=true"), tmp_path / "verbose")
    assert "Loading weights" in capfd.readouterr().err
    train(smoke(deberta_dir, rte_dir, "glue/rte", "lora"), tmp_path / "quiet-again")
    assert "Loading weights" not in capfd.readouterr().err
