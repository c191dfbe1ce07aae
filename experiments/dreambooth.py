"""The DreamBooth family: teach Stable Diffusion a subject from a few images, with prior preservation.

Training batches hold instance latents with the instance prompt and class latents with the class prompt
(the prior, weighted ``task.prior_loss_weight``); the loss is the noise-prediction MSE at random timesteps.
Evaluation is seeded and offline: denoising MSE on a held-out view of the subject, on the training views
and on class images, and the prior drift ``mean (eps_adapted - eps_base)^2`` on the class images, each over
a fixed grid of noise draws x timesteps. At the end: a sample grid (base vs adapted) and the adapter in
diffusers' LoRA format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geolora.io import write_diffusers_lora

from .diffusion import (
    Components,
    DenoisingModel,
    assemble,
    cache_dir,
    denoising_model,
    load_components,
    pipeline_folder,
)
from .dreambooth_images import instance_images, to_pixels
from .errors import UserError
from .models import autocast, pick_device

log = logging.getLogger(__name__)


@torch.no_grad()
def encode(
    vae: nn.Module, pixels: torch.Tensor, device: torch.device, batch: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution per image (cached once: the VAE is frozen)."""
    means, stds = [], []
    for chunk in pixels.split(batch):
        dist = vae.encode(chunk.to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def pipeline(parts: Components, unet: nn.Module, text_encoder: nn.Module):
    """A DDIM sampling pipeline around (possibly adapted) ``unet`` and ``text_encoder``."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(parts.scheduler.config)
    pipe = assemble(replace(parts, unet=unet, text_encoder=text_encoder, scheduler=scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_image(array: np.ndarray):
    """A sampled H x W x 3 array in [0, 1] as an 8-bit PIL image."""
    from PIL import Image

    return Image.fromarray((array * 255).round().astype(np.uint8))


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], task, device: torch.device) -> np.ndarray:
    """len(seeds) x len(prompts) images (H x W x 3 in [0, 1]), one fixed generator per image."""
    rows = []
    for seed in seeds:
        generators = [torch.Generator(device).manual_seed(seed) for _ in prompts]
        rows.append(
            pipe(
                prompts,
                height=task.resolution,
                width=task.resolution,
                generator=generators,
                num_inference_steps=task.sample_steps,
                guidance_scale=task.guidance_scale,
                output_type="np",
            ).images
        )
    return np.stack(rows)


def class_images(task, model_path: str, parts: Components, device: torch.device) -> list:
    """``task.num_class_images`` images of the class prompt from the base pipeline, generated once and cached
    (``task.class_data_dir``, default a folder in the cache named by model, prompt, resolution and count)."""
    from PIL import Image

    key = json.dumps([model_path, task.class_prompt, task.resolution, task.sample_steps, task.guidance_scale])
    folder = (
        Path(task.class_data_dir).expanduser()
        if task.class_data_dir
        else cache_dir() / "class_images" / hashlib.sha256(key.encode()).hexdigest()[:12]
    )
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("*.png"))
    if len(have) < task.num_class_images:
        log.info(
            "generating %d class images for %r into %s", task.num_class_images - len(have), task.class_prompt, folder
        )
        pipe = pipeline(parts, parts.unet, parts.text_encoder).to(device)
        for index in range(len(have), task.num_class_images):
            image = sample(pipe, [task.class_prompt], [index], task, device)[0, 0]
            partial = folder / f"{index:04d}.png.partial"
            to_image(image).save(partial, format="PNG")
            partial.rename(folder / f"{index:04d}.png")
        have = sorted(folder.glob("*.png"))
    return [Image.open(p).convert("RGB") for p in have[: task.num_class_images]]


class DenoisingBatches:
    """Training batches: instance latents drawn from their VAE distributions, noise and timesteps, prompt ids and
    loss weights, then (prior preservation) as many class examples. Seeded; a new draw every epoch."""

    def __init__(
        self,
        instances: tuple,
        classes: tuple | None,
        ids: dict,
        task,
        batch_size: int,
        scaling: float,
        timesteps: int,
        seed: int,
    ) -> None:
        self.instances, self.classes, self.ids, self.task = instances, classes, ids, task
        self.batch_size, self.scaling, self.timesteps = batch_size, scaling, timesteps
        self.generator = torch.Generator().manual_seed(seed)
        count = len(instances[0]) if classes is None else max(len(instances[0]), len(classes[0]))
        self.length = math.ceil(count / batch_size)

    def __len__(self) -> int:
        return self.length

    def _draw(self, dist: tuple, index: torch.Tensor, prompt: str, weight: float) -> dict[str, torch.Tensor]:
        mean, std = dist[0][index], dist[1][index]
        latents = (mean + std * torch.randn(mean.shape, generator=self.generator)) * self.scaling
        n = len(index)
        return {
            "latents": latents,
            "noise": torch.randn(latents.shape, generator=self.generator),
            "timesteps": torch.randint(0, self.timesteps, (n,), generator=self.generator),
            "input_ids": self.ids[prompt].expand(n, -1),
            "weights": torch.full((n,), weight / n),
        }

    def __iter__(self):
        n_inst = len(self.instances[0])
        order = torch.randperm(self.length * self.batch_size, generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            parts = [self._draw(self.instances, index % n_inst, "instance", 1.0)]
            if self.classes is not None:
                parts.append(
                    self._draw(self.classes, index % len(self.classes[0]), "class", self.task.prior_loss_weight)
                )
            yield {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


@dataclass
class DreamBooth:
    """The family object the loop drives: ``train_loader``, ``loss``, ``start``, ``evaluate``, ``finish``."""

    task: object
    parts: Components
    train_loader: DenoisingBatches
    grids: dict[str, dict[str, torch.Tensor]]  # evaluation set -> fixed batch of the noise x timestep grid
    prompts: list[str]
    seeds: list[int]
    photos: list  # the subject's photos (training and held out), for the subject metrics
    base: dict = field(default_factory=dict)  # predictions and samples of the unadapted model
    shardable: bool = False  # instance and class halves of a batch with their loss weights: one process

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def _errors(self, model: nn.Module, grid: dict[str, torch.Tensor], device, precision: str):
        """The model's predictions on a grid (float32) and their targets."""

        with autocast(precision, device):
            prediction, target = denoising_model(model).predict(**{k: v.to(device) for k, v in grid.items()})
        return prediction.float(), target

    def start(self, model: nn.Module, device: torch.device, precision: str) -> None:
        """The base model's class predictions and samples (adapters start at zero: the model is the base)."""
        model.eval()
        if "prior" in self.grids:
            self.base["prior"] = self._errors(model, self.grids["prior"], device, precision)[0].cpu()
        core = denoising_model(model)
        self.base["samples"] = sample(
            pipeline(self.parts, core.unet, core.text_encoder), self.prompts, self.seeds, self.task, device
        )
        model.train()

    def evaluate(self, model: nn.Module, device: torch.device, precision: str, progress: bool) -> dict[str, float]:
        model.eval()
        metrics = {}
        for name, grid in self.grids.items():
            prediction, target = self._errors(model, grid, device, precision)
            metrics[f"{name}_mse"] = (prediction - target).pow(2).mean().item()
            if name == "prior":
                metrics["prior_drift"] = (prediction.cpu() - self.base["prior"]).pow(2).mean().item()
        model.train()
        return metrics

    def finish(self, adapted, run_dir: Path, records) -> dict:
        """The sample grid (base vs adapted) and the adapter as a diffusers LoRA; returns summary entries."""
        from .plots import sample_grid

        model = adapted.model
        model.eval()
        core = denoising_model(model)
        device = next(core.unet.parameters()).device
        pipe = pipeline(self.parts, core.unet, core.text_encoder)
        samples = sample(pipe, self.prompts, self.seeds, self.task, device)
        png = sample_grid({"base": self.base["samples"], "adapted": samples}, self.prompts, run_dir / "samples.png")
        records.log_image("samples", png)
        folder = run_dir / "diffusers_lora"
        write_diffusers_lora(
            folder, {"unet": adapted.lora_factors(core.unet), "text_encoder": adapted.lora_factors(core.text_encoder)}
        )
        size = (folder / "pytorch_lora_weights.safetensors").stat().st_size
        ranks = adapted.ranks()
        out = {
            "adapter_bytes": size,
            "rank_unet": sum(r for n, r in ranks.items() if ".unet." in f".{n}"),
            "rank_text_encoder": sum(r for n, r in ranks.items() if ".text_encoder." in f".{n}"),
        }
        if self.task.subject_metrics:
            out["subject"] = self.subject_metrics(pipe, device)
        return out

    def subject_metrics(self, pipe, device: torch.device) -> dict[str, float]:
        """DINO, CLIP-I and CLIP-T of ``metric_images_per_prompt`` samples of every metric prompt."""
        from .subject_metrics import SubjectSimilarity

        similarity = SubjectSimilarity.load(self.task.dino_model, self.task.clip_model, device)
        prompts = list(self.task.metric_prompts) or self.prompts
        seeds = list(range(self.task.metric_images_per_prompt))
        images = sample(pipe, prompts, seeds, self.task, device)  # seeds x prompts
        generated = [to_image(image) for row in images for image in row]
        return similarity(generated, prompts * len(seeds), self.photos, self.task.identifier)


def _grid(dist: tuple, ids: torch.Tensor, task, scaling: float, seed: int) -> dict[str, torch.Tensor]:
    """Every image x noise draw x timestep of an evaluation set as one batch (latents at their means)."""
    generator = torch.Generator().manual_seed(seed)
    mean = dist[0] * scaling
    steps = torch.tensor(list(task.eval_timesteps))
    n, draws = len(mean), task.eval_noise_draws
    noise = torch.randn((n, draws, *mean.shape[1:]), generator=generator)
    rows = [(i, d, t) for i in range(n) for d in range(draws) for t in range(len(steps))]
    index = torch.tensor(rows)
    return {
        "latents": mean[index[:, 0]],
        "noise": noise[index[:, 0], index[:, 1]],
        "timesteps": steps[index[:, 2]],
        "input_ids": ids.expand(len(rows), -1),
    }


def dreambooth(cfg) -> tuple[nn.Module, DreamBooth]:
    """The denoising model (UNet + text encoder, the VAE stays outside and frozen) and the family of a run."""
    task, trainer = cfg.task, cfg.trainer
    device = pick_device(trainer.device)
    views = instance_images(task)
    if len(views) <= task.heldout_images:
        raise UserError(f"task.heldout_images={task.heldout_images} leaves no training image of {len(views)}")
    train_views, heldout = views[: len(views) - task.heldout_images], views[len(views) - task.heldout_images :]
    folder = pipeline_folder(cfg.model, lambda: to_pixels(views, task.resolution))
    parts = load_components(folder)
    for module in (parts.unet, parts.text_encoder, parts.vae):
        module.to(device).requires_grad_(False)
    scaling = parts.vae.config.scaling_factor

    def tokenize(prompt: str) -> torch.Tensor:
        return parts.tokenizer(
            prompt,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            max_length=parts.tokenizer.model_max_length,
        ).input_ids

    ids = {"instance": tokenize(task.instance_prompt), "class": tokenize(task.class_prompt)}
    instances = encode(parts.vae, to_pixels(train_views, task.resolution), device)
    classes = None
    if task.prior_loss_weight > 0:
        classes = encode(parts.vae, to_pixels(class_images(task, folder, parts, device), task.resolution), device)
    grids = {"instance": _grid(instances, ids["instance"], task, scaling, seed=1)}
    if heldout:
        grids["heldout"] = _grid(
            encode(parts.vae, to_pixels(heldout, task.resolution), device), ids["instance"], task, scaling, seed=2
        )
    if classes is not None:
        count = min(task.eval_class_images, len(classes[0]))
        grids["prior"] = _grid((classes[0][:count], classes[1][:count]), ids["class"], task, scaling, seed=3)
    batches = DenoisingBatches(
        instances,
        classes,
        ids,
        task,
        trainer.batch_size,
        scaling,
        parts.scheduler.config.num_train_timesteps,
        cfg.seed,
    )
    model = DenoisingModel(parts.unet, parts.text_encoder, parts.scheduler)
    family = DreamBooth(task, parts, batches, grids, list(task.sample_prompts), list(task.sample_seeds), views)
    return model, family
