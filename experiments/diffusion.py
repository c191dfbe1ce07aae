"""Stable Diffusion for the DreamBooth family: loading a pipeline folder (hub name or local copy), the tiny
offline stand-in built from configs, and the denoising model the methods adapt.

Every model, real or tiny, is read by the same ``from_pretrained(folder, subfolder=...)`` calls. The tiny
one (RANDOM weights, not Stable Diffusion) is built once from ``model.architecture`` with a fixed seed and
saved as a pipeline folder in the cache, with the real CLIP BPE vocabulary (PyPI ``open_clip_torch``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from .errors import UserError
from .models import _from_pretrained

log = logging.getLogger(__name__)

SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")


def cache_dir() -> Path:
    """Where built models and generated class images live (``GEOLORA_CACHE``, default ~/.cache/geolora)."""
    return Path(os.environ.get("GEOLORA_CACHE", Path.home() / ".cache" / "geolora")).expanduser()


def clip_tokenizer(max_length: int = 77):
    """OpenAI CLIP's tokenizer (49,408 tokens) from the BPE merges file that ships in ``open_clip_torch``
    (read as a file; the package is not imported)."""
    from transformers import CLIPTokenizer

    from .data import package_dir

    path = Path(package_dir("open_clip")) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise UserError(f"CLIP vocabulary {path} not found; `make install` brings it (PyPI open_clip_torch)")
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        model_max_length=max_length,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-to-character table, in CLIP's order."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(extra))]


def _architecture_key(architecture: dict) -> str:
    return hashlib.sha256(json.dumps(architecture, sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_pipeline(architecture: dict, folder: Path, calibration: torch.Tensor) -> Path:
    """Build a random Stable Diffusion from ``architecture`` (unet / vae / text_encoder kwargs), set the VAE's
    ``scaling_factor`` to 1 / std of the latents of ``calibration`` images (N x 3 x H x W in [-1, 1]; a
    random VAE's latents are far from SD's unit scale) and save it as a pipeline folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(architecture.get("seed", 0))
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **architecture["text_encoder"],
        )
    )
    unet = UNet2DConditionModel(**architecture["unet"])
    vae = AutoencoderKL(**architecture["vae"])
    with torch.no_grad():
        std = vae.encode(calibration).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    pipeline = assemble(Components(unet, text_encoder, vae, tokenizer, DDPMScheduler(**architecture["scheduler"])))
    partial = folder.with_name(folder.name + ".partial")
    pipeline.save_pretrained(str(partial))
    partial.rename(folder)  # a pipeline folder appears whole or not at all
    log.warning("built a tiny Stable Diffusion with RANDOM weights (not pretrained) in %s", folder)
    return folder


def pipeline_folder(model_cfg, calibration) -> str:
    """The folder (or hub name) the components load from; the tiny model is built into the cache first."""
    if model_cfg.pretrained:
        return model_cfg.name_or_path
    architecture = OmegaConf.to_container(OmegaConf.create(model_cfg.architecture), resolve=True)
    folder = cache_dir() / f"{model_cfg.name}-{_architecture_key(architecture)}"
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_pipeline(architecture, folder, calibration())
    return str(folder)


@dataclass
class Components:
    unet: nn.Module
    text_encoder: nn.Module
    vae: nn.Module
    tokenizer: object
    scheduler: object


def load_components(name_or_path: str) -> Components:
    """The five parts of a Stable Diffusion pipeline folder (hub name or local copy)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(name_or_path).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise UserError(
            f"model.name_or_path={name_or_path} has no model_index.json: point it at a Stable "
            "Diffusion pipeline folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/)"
        )
    parts = {
        key: _from_pretrained(loader, name_or_path, subfolder=key)
        for key, loader in (
            ("unet", UNet2DConditionModel),
            ("text_encoder", CLIPTextModel),
            ("tokenizer", CLIPTokenizer),
            ("vae", AutoencoderKL),
            ("scheduler", DDPMScheduler),
        )
    }
    return Components(**parts)


def assemble(parts: Components):
    """A ``StableDiffusionPipeline`` of ``parts``, without a safety checker (generated images are measured here,
    not served)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass
class DenoisingOutput:
    """What ``DenoisingModel`` returns: the weighted batch loss (peft's AdaLoRA adds its regulariser to
    ``loss``) and each example's mean squared error."""

    loss: torch.Tensor
    per_example: torch.Tensor


class DenoisingModel(nn.Module):
    """The trained part of Stable Diffusion (UNet and text encoder) as one module: ``forward`` noises
    latents at the given timesteps, predicts the noise (or velocity) from the prompt and returns the
    weighted MSE. Methods inject their adapters into it like into any model."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, scheduler) -> None:
        super().__init__()
        self.unet, self.text_encoder, self.scheduler = unet, text_encoder, scheduler

    def predict(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's prediction from the noised latents and the prompt, and its target (the noise, or the
        velocity for a v-prediction schedule)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        states = self.text_encoder(input_ids)[0]
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=states).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            return prediction, self.scheduler.get_velocity(latents, noise, timesteps)
        return prediction, noise

    def forward(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        input_ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> DenoisingOutput:
        prediction, target = self.predict(latents, noise, timesteps, input_ids)
        per_example = (prediction.float() - target.float()).pow(2).mean((1, 2, 3))
        return DenoisingOutput((per_example * weights).sum(), per_example)


def denoising_model(model: nn.Module) -> DenoisingModel:
    """The ``DenoisingModel`` inside a model a method may have wrapped (peft wraps, GeoLoRA does not)."""
    return next(m for m in model.modules() if isinstance(m, DenoisingModel))
