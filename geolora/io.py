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


def lora_factors(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every adapter of ``module`` as LoRA factors at scale 1: ``A = V^T`` (r x in), ``B = alpha U S`` (out x r),
    so ``B A`` is the adapter's update exactly. Names are relative to ``module``; rank-0 layers are left out."""
    layers = dict(adapters(module))
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no GeoLoRA adapter; inject one with geolora.inject")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("adapters are merged; call geolora.unmerge(model) before exporting")
    return {
        name: (layer.v.T.detach().contiguous(), (layer.alpha * (layer.u @ layer.s)).detach().contiguous())
        for name, layer in layers.items()
        if layer.rank > 0
    }


def lora_config_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """peft ``LoraConfig`` fields of ``factors`` (``lora_factors``): one rank per layer in ``rank_pattern``
    and ``lora_alpha = r`` per layer in ``alpha_pattern``, so peft's scaling ``lora_alpha / r`` is 1."""
    patterns = {re.escape(name): a.shape[0] for name, (a, _) in factors.items()}
    top = max(patterns.values())
    return {
        "r": top,
        "lora_alpha": top,
        "target_modules": list(factors),
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "lora_dropout": 0.0,
        "bias": "none",
    }


def export_peft(model: nn.Module, path: str | Path) -> Path:
    """Write a peft LoRA folder equal to the adapted model (``lora_factors``, ``lora_config_dict``).
    Load it with ``peft.PeftModel.from_pretrained(base_model, path)``."""
    from peft import LoraConfig, get_peft_model  # optional dependency, only needed for export

    config = config_of(model)
    factors = lora_factors(model)
    base = copy.deepcopy(model)
    for name, layer in adapters(base):
        _set_submodule(base, name, layer.base)
    del base.geolora_config
    fields = {**lora_config_dict(factors), "lora_dropout": config.dropout}
    peft_model = get_peft_model(base, LoraConfig(**fields, modules_to_save=list(config.modules_to_save) or None))
    with torch.no_grad():
        for name, (a, b) in factors.items():
            lora = peft_model.base_model.model.get_submodule(name)
            lora.lora_A["default"].weight.copy_(a)
            lora.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(str(path))
    return Path(path)


def write_diffusers_lora(
    path: str | Path, components: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
) -> Path:
    """Write LoRA factors per pipeline component (``{"unet": {module: (A, B)}, "text_encoder": ...}``,
    scale 1) as ``path/pytorch_lora_weights.safetensors`` in diffusers' peft format, with each layer's
    rank in the adapter metadata, so ``pipeline.load_lora_weights(path)`` restores ranks that differ per layer."""
    from diffusers import StableDiffusionPipeline  # optional dependency, only needed for this export

    def tensors(factors):
        out = {}
        for name, (a, b) in factors.items():
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a.detach().cpu(), b.detach().cpu()
        return out

    unet, text = components.get("unet"), components.get("text_encoder")
    StableDiffusionPipeline.save_lora_weights(
        str(path),
        unet_lora_layers=tensors(unet) if unet else None,
        text_encoder_lora_layers=tensors(text) if text else None,
        unet_lora_adapter_metadata=lora_config_dict(unet) if unet else None,
        text_encoder_lora_adapter_metadata=lora_config_dict(text) if text else None,
    )
    return Path(path)


def export_diffusers(path: str | Path, unet: nn.Module | None = None, text_encoder: nn.Module | None = None) -> Path:
    """Write the GeoLoRA adapters of a Stable Diffusion ``unet`` and/or ``text_encoder`` as a diffusers LoRA
    (``path/pytorch_lora_weights.safetensors``): ``StableDiffusionPipeline.load_lora_weights(path)`` then
    computes what the adapted modules compute, each layer at its own rank."""
    components = {
        key: lora_factors(module)
        for key, module in (("unet", unet), ("text_encoder", text_encoder))
        if module is not None
    }
    if not components:
        raise ValueError("export_diffusers needs unet= and/or text_encoder=")
    return write_diffusers_lora(path, components)


def _peft_scale(name: str, rank: int, peft_config: dict) -> float:
    """peft's LoRA scale of module ``name``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), with ``alpha_pattern``
    keys matched as peft matches them (a regex that must end the module name)."""
    alpha = peft_config.get("lora_alpha", 8)
    for key, value in (peft_config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            alpha = value
            break
    return alpha / (rank**0.5 if peft_config.get("use_rslora") else rank)


def from_peft(model: nn.Module, path: str | Path, **config_overrides) -> nn.Module:
    """Inject GeoLoRA into ``model`` (the base model, without adapters) from the peft LoRA folder ``path``:
    each adapted layer starts at the SVD of ``scale · B A`` at its LoRA rank, so the model computes what the
    peft model computes; ``modules_to_save`` are loaded too. ``config_overrides`` go to ``GeoLoRAConfig``
    (defaults: ``init_rank`` the largest LoRA rank, ``max_rank`` twice that, ``alpha`` 1)."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(
            f"{path} is not a peft adapter folder (needs adapter_config.json and adapter_model.safetensors)"
        )
    peft_config = json.loads(config_file.read_text())
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} holds a {peft_config['peft_type']} adapter; from_peft reads LoRA adapters")
    tensors = {key.removeprefix("base_model.model."): value for key, value in load_file(str(weights_file)).items()}
    factors = {
        key.removesuffix(".lora_A.weight"): (value, tensors[key.replace("lora_A", "lora_B")])
        for key, value in tensors.items()
        if key.endswith(".lora_A.weight")
    }
    if not factors:
        raise ValueError(f"{path} holds no LoRA factors")
    top = max(a.shape[0] for a, _ in factors.values())
    settings = dict(
        target_modules=sorted(factors),
        init_rank=top,
        max_rank=2 * top,
        alpha=1.0,
        modules_to_save=list(peft_config.get("modules_to_save") or []),
    )
    inject(model, GeoLoRAConfig(**{**settings, **config_overrides}))
    layers = dict(adapters(model))
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = layers[name]
            dtype, device = layer.U.dtype, layer.U.device
            a, b = a.to(device, torch.float64), b.to(device, torch.float64)
            q_b, r_b = torch.linalg.qr(b)  # scale B A = Q_b (scale R_b R_a^T) Q_a^T
            q_a, r_a = torch.linalg.qr(a.T)
            p, sigma, q_t = torch.linalg.svd(_peft_scale(name, a.shape[0], peft_config) * r_b @ r_a.T)
            rank = min(a.shape[0], layer.max_rank)
            layer.set_factors(
                (q_b @ p)[:, :rank].to(dtype),
                (torch.diag(sigma[:rank]) / layer.alpha).to(dtype),
                (q_a @ q_t.T)[:, :rank].to(dtype),
            )
        saved = _saved_parameters(model)
        for key, value in tensors.items():
            name = key.replace(".modules_to_save.default", "")
            if ".lora_" not in key and name in saved:
                saved[name].copy_(value)
    return model
