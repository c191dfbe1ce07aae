"""Tiny models and problems shared by the tests. Nothing here touches a network."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import geolora


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory):
    """A tiny DeBERTa-v2 checkpoint folder with its tokenizer (tests/harness_fixtures.py)."""
    from harness_fixtures import tiny_deberta_dir

    return tiny_deberta_dir(tmp_path_factory.mktemp("deberta"))


@pytest.fixture(autouse=True, scope="session")
def _model_cache(tmp_path_factory):
    """Models built from configs (the tiny Stable Diffusion) and generated class images go to a folder of
    this session, never to the user's cache."""
    os.environ["GEOLORA_CACHE"] = str(tmp_path_factory.mktemp("geolora-cache"))


def least_squares(n: int = 32, rank: int = 4, samples: int = 512, seed: int = 1):
    """Inputs x and targets x W*^T of a rank-``rank`` W* with singular values rank, ..., 1."""
    g = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    right = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    target = left @ torch.diag(torch.arange(rank, 0, -1, dtype=torch.float32)) @ right.T
    x = torch.randn(samples, n, generator=g)
    return x, x @ target.T


def adapted_linear(n: int = 32, seed: int = 0, dtype=torch.float32, **config) -> nn.Sequential:
    """One zero-initialised Linear (named "0") with a GeoLoRA adapter."""
    torch.manual_seed(seed)
    layer = nn.Linear(n, n, bias=False).to(dtype)
    nn.init.zeros_(layer.weight)
    model = nn.Sequential(layer)
    defaults = dict(target_modules=["0"], init_rank=4, max_rank=16, min_rank=1, tau=0.05)
    return geolora.inject(model, geolora.GeoLoRAConfig(**{**defaults, **config}))


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def tiny_deberta(seed: int = 0, num_labels: int = 3):
    """A 2-layer DeBERTa-v2 classifier built from a config (no download)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    from harness_fixtures import TINY_DEBERTA

    config = DebertaV2Config(
        vocab_size=64, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TINY_DEBERTA
    )
    return DebertaV2ForSequenceClassification(config).eval()


DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"]


def deberta_config(**overrides) -> geolora.GeoLoRAConfig:
    values = dict(
        target_modules=DEBERTA_TARGETS,
        init_rank=4,
        max_rank=8,
        min_rank=1,
        tau=0.2,
        alpha=1.0,
        modules_to_save=["classifier"],
    )
    return geolora.GeoLoRAConfig(**{**values, **overrides})


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.randint(0, 64, (4, 12), generator=g),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "labels": torch.randint(0, 3, (4,), generator=g),
    }


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, steps: int) -> None:
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
