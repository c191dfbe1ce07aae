"""Tiny local models and data for the harness tests, built on the spot (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.synthetic import deberta_dir, tiny_llama, tiny_tokenizer, write_text_task  # noqa: F401 (tests' imports)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)  # every tiny model
TINY_DEBERTA = dict(
    **TINY,
    max_position_embeddings=64,
    pooler_hidden_size=32,
    relative_attention=True,
    position_buckets=16,
    pos_att_type=["p2c", "c2p"],
)


def tiny_deberta_dir(path: Path) -> Path:
    """A 2-layer DeBERTa-v2 with its tokenizer, saved like a hub checkpoint."""
    return deberta_dir(path, **TINY_DEBERTA)


def tiny_bert_dir(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, **TINY)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama_dir(path: Path) -> Path:
    """A 2-layer Llama causal LM with its tokenizer, saved like a hub checkpoint."""
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_vit_dir(path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **TINY)).save_pretrained(path)
    return path


def write_image_task(path: Path, num_labels: int, splits: list[str], per_class: int = 3, size: int = 16) -> Path:
    """An image folder: ``<split>/<class>/<n>.png``."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split in splits:
        for cls in range(min(num_labels, 4)):
            folder = path / split / f"class{cls:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{n}.png")
    return path
