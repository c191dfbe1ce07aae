"""The DreamBooth family offline: the real CLIP vocabulary, the tiny Stable Diffusion, runs of every method,
and GeoLoRA adapters (ranks differing per layer) exported to and loaded by a diffusers pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness_fixtures import tiny_vit_dir
from test_harness import compose_run

import geolora
from experiments.config import register
from experiments.diffusion import DenoisingModel, clip_tokenizer, load_components, pipeline_folder
from experiments.dreambooth_images import flower_views, to_pixels
from experiments.errors import UserError
from experiments.train import train

pytestmark = pytest.mark.slow  # diffusion pipelines (the offline preset runs in make test): `make test-all`

TINY = [
    "task.num_class_images=2",
    "task.eval_class_images=1",
    "task.eval_noise_draws=1",
    "task.eval_timesteps=[500]",
    "task.sample_steps=2",
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "logger=none",
    "progress=false",
]
register()


def _compose(overrides: list[str]):
    return compose_run("experiment=dreambooth_offline", *overrides)


@pytest.fixture(scope="module")
def tiny_sd() -> str:
    """The offline preset's tiny Stable Diffusion folder (built once into the session's cache)."""
    cfg = _compose([])
    return pipeline_folder(cfg.model, lambda: to_pixels(flower_views(), cfg.task.resolution))


def test_clip_tokenizer_is_the_real_vocabulary():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    # the ids Stable Diffusion's tokenizer gives "a photo of a dog"
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_tiny_model_loads_like_a_pipeline_folder_with_calibrated_vae(tiny_sd):
    assert {p.name for p in Path(tiny_sd).iterdir()} >= {
        "unet",
        "text_encoder",
        "tokenizer",
        "vae",
        "scheduler",
        "model_index.json",
    }
    parts = load_components(tiny_sd)
    assert len(parts.tokenizer) == 49408
    with torch.no_grad():
        latents = parts.vae.encode(to_pixels(flower_views(), 64)).latent_dist.mean * parts.vae.config.scaling_factor
    assert 0.5 < latents.std().item() < 2.0  # unit scale, as SD's latents are


def test_a_folder_without_a_pipeline_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        load_components(str(tmp_path))


def _mixed_rank_adapters(parts, targets: list[str]) -> DenoisingModel:
    model = DenoisingModel(parts.unet, parts.text_encoder, parts.scheduler)
    geolora.inject(model, geolora.GeoLoRAConfig(target_modules=targets, init_rank=4, max_rank=8, min_rank=1))
    g = torch.Generator().manual_seed(0)
    for i, (_, layer) in enumerate(geolora.adapters(model)):
        rank = 1 + i % layer.max_rank  # every layer its own rank
        u = torch.linalg.qr(torch.randn(layer.U.shape[0], rank, generator=g))[0]
        v = torch.linalg.qr(torch.randn(layer.V.shape[0], rank, generator=g))[0]
        layer.set_factors(u, torch.randn(rank, rank, generator=g) * 0.1, v)
    return model


def _outputs(unet, text_encoder, ids):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        states = text_encoder(ids)[0]
        return states, unet(latents, torch.tensor([10, 700]), encoder_hidden_states=states).sample


@pytest.mark.parametrize("targets", ["default", "paper"])
def test_export_diffusers_loads_in_a_pipeline_with_the_same_outputs(tiny_sd, tmp_path, targets):
    from diffusers import StableDiffusionPipeline

    cfg = _compose(
        []
        if targets == "default"
        else ["model=sd_paper_targets", "model.name_or_path=" + tiny_sd, "model.pretrained=true"]
    )
    adapted = _mixed_rank_adapters(load_components(tiny_sd), list(cfg.model.target_modules))
    ranks = geolora.ranks(adapted)
    assert len(set(ranks.values())) > 1 and any(n.startswith("text_encoder.") for n in ranks)
    geolora.export_diffusers(tmp_path / "lora", unet=adapted.unet, text_encoder=adapted.text_encoder)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    ids = pipe.tokenizer(
        ["a photo of sks flower", "a photo of flower"], padding="max_length", return_tensors="pt", max_length=77
    ).input_ids
    base = _outputs(pipe.unet, pipe.text_encoder, ids)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded, expected = _outputs(pipe.unet, pipe.text_encoder, ids), _outputs(adapted.unet, adapted.text_encoder, ids)
    for got, want, before in zip(loaded, expected, base):
        assert (want - before).abs().max() > 1e-3  # the adapters change the outputs ...
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)  # ... and the pipeline reproduces them


@pytest.mark.parametrize("method", ["geolora", "lora", "adalora"])
def test_offline_dreambooth_run(method, tmp_path):
    summary = train(_compose([f"method={method}", *TINY]), tmp_path / "run")
    assert summary["status"] == "finished" and summary["main_metric"] == "eval/heldout_mse"
    final = summary["final"]
    for key in ("heldout_mse", "instance_mse", "prior_mse", "prior_drift"):
        assert final[f"eval/{key}"] >= 0
    assert final["eval/prior_drift"] > 0  # four steps move the adapted model off the base
    assert summary["rank_unet"] > 0 and summary["rank_text_encoder"] > 0 and summary["adapter_bytes"] > 0
    assert (tmp_path / "run" / "samples.png").stat().st_size > 1000
    assert (tmp_path / "run" / "diffusers_lora" / "pytorch_lora_weights.safetensors").is_file()
    losses = [r["train/loss"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "train/loss" in r]
    assert losses and all(loss > 0 for loss in losses)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_peft_baselines_export_to_diffusers_with_the_same_outputs(tiny_sd, tmp_path, method):
    """LoRA's and AdaLoRA's adapters (scale folded in; AdaLoRA's pruned rows left out) load in a pipeline too."""
    from diffusers import StableDiffusionPipeline

    from experiments.methods import adapt
    from geolora.io import write_diffusers_lora

    cfg = _compose([f"method={method}"])
    parts = load_components(tiny_sd)
    adapted = adapt(
        DenoisingModel(parts.unet, parts.text_encoder, parts.scheduler),
        cfg.model,
        cfg.method,
        cfg.trainer,
        total_steps=1000,
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.model.named_parameters():
            if "lora_B" in name or "lora_E" in name:  # zero at injection: give the adapters an update
                param.copy_(torch.randn(param.shape, generator=g) * 0.1 * (torch.rand(param.shape, generator=g) > 0.3))
    core = adapted.model.base_model.model
    write_diffusers_lora(
        tmp_path / "lora",
        {"unet": adapted.lora_factors(core.unet), "text_encoder": adapted.lora_factors(core.text_encoder)},
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    ids = pipe.tokenizer(
        ["a photo of sks flower", "a photo of flower"], padding="max_length", return_tensors="pt", max_length=77
    ).input_ids
    pipe.load_lora_weights(str(tmp_path / "lora"))
    for got, want in zip(_outputs(pipe.unet, pipe.text_encoder, ids), _outputs(core.unet, core.text_encoder, ids)):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def _tiny_dino_and_clip(folder: Path) -> tuple[str, str]:
    """A random DINO-style ViT and a random CLIP (with the real CLIP tokenizer), saved like hub checkpoints."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTImageProcessor

    tiny_vit_dir(folder / "dino")  # a DINO-style ViT: its CLS token is the embedding
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "dino")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(
        CLIPConfig(
            text_config=dict(vocab_size=49408, **small),
            projection_dim=16,
            vision_config=dict(image_size=32, patch_size=8, **small),
        )
    ).save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "clip"
    )
    clip_tokenizer().save_pretrained(folder / "clip")
    return str(folder / "dino"), str(folder / "clip")


def test_subject_metrics_on_tiny_dino_and_clip(tmp_path):
    from experiments.subject_metrics import SubjectSimilarity

    similarity = SubjectSimilarity.load(*_tiny_dino_and_clip(tmp_path), torch.device("cpu"))
    photos = flower_views()
    same = similarity(photos[:1], ["a photo of sks flower"], photos[:1], identifier="sks")
    assert same["dino"] == pytest.approx(1.0, abs=1e-5) and same["clip_i"] == pytest.approx(1.0, abs=1e-5)
    other = similarity(photos[1:3], ["a sks flower", "a flower"], photos[:1], identifier="sks")
    assert all(-1.0 <= v <= 1.0 for v in other.values())
    assert other["dino"] < 1.0 - 1e-4
    # the identifier is left out of the CLIP-T prompt: both prompts read "a flower"
    plain = similarity(photos[1:3], ["a flower", "a flower"], photos[:1], identifier="sks")
    assert other["clip_t"] == pytest.approx(plain["clip_t"], abs=1e-6)


def test_run_with_subject_metrics(tmp_path):
    dino, clip = _tiny_dino_and_clip(tmp_path)
    summary = train(
        _compose(
            [
                "method=geolora",
                *TINY,
                "task.subject_metrics=true",
                f"task.dino_model={dino}",
                f"task.clip_model={clip}",
                "task.metric_images_per_prompt=2",
                "task.metric_prompts=[a sks flower in the snow]",
            ]
        ),
        tmp_path / "run",
    )
    assert set(summary["subject"]) == {"dino", "clip_i", "clip_t"}
