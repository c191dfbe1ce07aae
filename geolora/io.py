"""Saving, loading and exporting adapters.

An adapter folder holds ``adapter_config.json`` (the GeoLoRAConfig and every layer's rank) and
``adapter_model.safetensors`` (each layer's factors at its current rank, plus the trainable
parameters of ``modules_to_save``), so a model of the same architecture gets its ranks back.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import GeoLoRAConfig
from .model import _set_submodule, adapters, config_of, inject

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1


def _saved_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters outside the adapters, by name (the modules_to_save)."""
    factor_ids = {id(p) for _, layer in adapters(model) for p in (layer.U, layer.S, layer.V)}
    return {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in factor_ids}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters (at their current ranks) and modules_to_save of ``model`` to folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, layer_ranks = {}, {}
    for name, layer in adapters(model):
        if layer.merged:
            raise ValueError(f"adapter {name!r} is merged; call geolora.unmerge(model) before saving")
        layer_ranks[name] = layer.rank
        for key, value in (("U", layer.u), ("S", layer.s), ("V", layer.v)):
            tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
    for name, param in _saved_parameters(model).items():
        tensors[name] = param.detach().contiguous().cpu()
    save_file(tensors, str(path / WEIGHTS_FILE))
    meta = {"format_version": FORMAT_VERSION, "config": config_of(model).to_dict(), "ranks": layer_ranks}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a folder written by ``save_adapter`` into ``model``, restoring every layer's rank.

    A model without adapters is injected first with the saved config.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path} is not a GeoLoRA adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if getattr(model, "geolora_config", None) is None:
        inject(model, GeoLoRAConfig.from_dict(meta["config"]))
    tensors = load_file(str(path / WEIGHTS_FILE))
    layers = dict(adapters(model))
    missing = sorted(set(meta["ranks"]) ^ set(layers))
    if missing:
        raise ValueError(f"adapter folder and model disagree on adapted layers: {missing[:5]}")
    for name, layer in layers.items():
        device = layer.U.device
        layer.set_factors(*(tensors[f"{name}.{key}"].to(device) for key in ("U", "S", "V")))
    params = _saved_parameters(model)
    with torch.no_grad():
        for name, param in params.items():
            if name not in tensors:
                raise ValueError(f"adapter folder lacks trained parameter {name!r}")
            param.copy_(tensors[name])
    return model


def export_peft(model: nn.Module, path: str | Path) -> Path:
    """Write a peft LoRA folder equal to the adapted model: ``B = alpha U S``, ``A = V^T``.

    Per-layer ranks go to ``rank_pattern`` and ``lora_alpha = r`` per layer (``alpha_pattern``), so
    peft's scaling ``lora_alpha / r`` is 1 and the exported update is exactly ``alpha U S V^T``.
    Load it with ``peft.PeftModel.from_pretrained(base_model, path)``.
    """
    from peft import LoraConfig, get_peft_model  # optional dependency, only needed for export

    config = config_of(model)
    layers = dict(adapters(model))
    if any(layer.merged for layer in layers.values()):
        raise ValueError("adapters are merged; call geolora.unmerge(model) before export_peft")
    base = copy.deepcopy(model)
    for name, layer in adapters(base):
        _set_submodule(base, name, layer.base)
    del base.geolora_config
    patterns = {re.escape(name): layer.rank for name, layer in layers.items()}
    lora_config = LoraConfig(
        r=max(patterns.values()), lora_alpha=max(patterns.values()), target_modules=list(layers),
        rank_pattern=patterns, alpha_pattern=dict(patterns), lora_dropout=config.dropout,
        modules_to_save=list(config.modules_to_save) or None, bias="none",
    )
    peft_model = get_peft_model(base, lora_config)
    with torch.no_grad():
        for name, layer in layers.items():
            lora = peft_model.base_model.model.get_submodule(name)
            lora.lora_A["default"].weight.copy_(layer.v.T)
            lora.lora_B["default"].weight.copy_(layer.alpha * (layer.u @ layer.s))
    peft_model.save_pretrained(str(path))
    return Path(path)
