"""DreamBooth's subject metrics (Ruiz et al., CVPR 2023): DINO and CLIP-I, the mean cosine similarity of
generated to real subject images in DINO ViT-S/16 and CLIP image space, and CLIP-T, that of each generated
image to its prompt (identifier removed) in CLIP space. They need pretrained checkpoints (the hub or local
copies: ``task.dino_model``, ``task.clip_model``); the code runs on any ViT / CLIP model alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SubjectSimilarity:
    """Embeds images with a DINO ViT (its CLS token) and images and prompts with CLIP."""

    def __init__(self, dino, dino_processor, clip, clip_processor, clip_tokenizer, device: torch.device) -> None:
        self.dino, self.dino_processor = dino.to(device).eval(), dino_processor
        self.clip, self.clip_processor, self.clip_tokenizer = clip.to(device).eval(), clip_processor, clip_tokenizer
        self.device = device

    @classmethod
    def load(cls, dino_name: str, clip_name: str, device: torch.device) -> SubjectSimilarity:
        """From hub names or local folders (one-line error when neither is reachable)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

        from .models import _from_pretrained

        return cls(
            _from_pretrained(ViTModel, dino_name, add_pooling_layer=False),
            _from_pretrained(AutoImageProcessor, dino_name),
            _from_pretrained(CLIPModel, clip_name),
            _from_pretrained(AutoImageProcessor, clip_name),
            _from_pretrained(AutoTokenizer, clip_name),
            device,
        )

    @torch.no_grad()
    def _dino(self, images: list) -> torch.Tensor:
        pixels = self.dino_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(self.dino(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)

    @torch.no_grad()
    def _clip_images(self, images: list) -> torch.Tensor:
        pixels = self.clip_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(self.clip.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def _clip_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.clip_tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return F.normalize(self.clip.get_text_features(**tokens).pooler_output.float(), dim=-1)

    def __call__(self, generated: list, prompts: list[str], real: list, identifier: str) -> dict[str, float]:
        """``generated[i]`` was sampled from ``prompts[i]``; ``real`` are the subject's photos."""
        texts = [" ".join(word for word in p.split() if word != identifier) for p in prompts]
        clip_generated = self._clip_images(generated)
        return {
            "dino": (self._dino(generated) @ self._dino(real).T).mean().item(),
            "clip_i": (clip_generated @ self._clip_images(real).T).mean().item(),
            "clip_t": (clip_generated * self._clip_texts(texts)).sum(-1).mean().item(),
        }
