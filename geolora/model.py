"""Injecting GeoLoRA adapters into a model and inspecting the adapted model."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .config import GeoLoRAConfig
from .layer import GeoLoRALinear


def _matches(name: str, patterns: list[str] | str) -> bool:
    """peft's rule: a regex string must match the full name; a list entry must equal a name suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == key or name.endswith("." + key) for key in patterns)


def adapters(model: nn.Module) -> Iterator[tuple[str, GeoLoRALinear]]:
    """(name, adapter) for every GeoLoRA layer, named as the Linear it wraps."""
    for name, module in model.named_modules():
        if isinstance(module, GeoLoRALinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, config: GeoLoRAConfig) -> nn.Module:
    """Wrap every matching ``nn.Linear`` of ``model`` in a GeoLoRA adapter, in place.

    Freezes every parameter except the adapters' factors and the parameters of ``modules_to_save``.
    The adapted model computes exactly what the base model computed (S starts at zero).
    """
    if any(True for _ in adapters(model)):
        raise ValueError("model already holds GeoLoRA adapters; inject into a fresh model")
    targets = [
        (name, module) for name, module in model.named_modules() if name and _matches(name, config.target_modules)
    ]
    if not targets:
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r}; Linear layers of this model include {linear}"
        )
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, GeoLoRA adapts nn.Linear only; narrow target_modules"
            )
    saved = [
        (name, module)
        for name, module in model.named_modules()
        if name and config.modules_to_save and _matches(name, config.modules_to_save)
    ]
    if config.modules_to_save and not saved:
        raise ValueError(f"no module matched modules_to_save={config.modules_to_save!r}")

    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in targets:
        _set_submodule(model, name, GeoLoRALinear(module, config))
    for _, module in saved:
        for param in module.parameters():
            param.requires_grad_(True)
    model.geolora_config = config
    return model


def config_of(model: nn.Module) -> GeoLoRAConfig:
    """The config the model was injected with."""
    config = getattr(model, "geolora_config", None)
    if config is None:
        raise ValueError("model holds no GeoLoRA adapters; call geolora.inject(model, config) first")
    return config


def ranks(model: nn.Module) -> dict[str, int]:
    """Current rank of every adapter, by module name."""
    return {name: layer.rank for name, layer in adapters(model)}


def rank_entries(layer_ranks: dict[str, int], trainable: int) -> dict[str, int]:
    """The log entries of an adapted model's ranks (W&B, TensorBoard): ``geolora/total_rank``,
    ``geolora/trainable_params`` and ``geolora/rank/<layer>``, one key scheme for every method."""
    return {
        "geolora/total_rank": sum(layer_ranks.values()),
        "geolora/trainable_params": trainable,
        **{f"geolora/rank/{name}": rank for name, rank in layer_ranks.items()},
    }


def count_trainable(model: nn.Module) -> int:
    """Parameters in use now: sum of r(m + n) + r^2 over adapters, plus every other trainable parameter."""
    in_adapters = 0
    adapter_params = set()
    for _, layer in adapters(model):
        out_features, in_features = layer.base.out_features, layer.base.in_features
        in_adapters += layer.rank * (out_features + in_features) + layer.rank**2
        adapter_params.update(id(p) for p in (layer.U, layer.S, layer.V))
    others = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in adapter_params)
    return in_adapters + others


def merge(model: nn.Module) -> nn.Module:
    """Add every adapter into its base weight; the adapters then stay idle until ``unmerge``."""
    for _, layer in adapters(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract merged adapters from their base weights again."""
    for _, layer in adapters(model):
        layer.unmerge()
    return model
