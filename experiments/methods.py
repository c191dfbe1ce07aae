"""The compared methods behind one interface: GeoLoRA (this library), LoRA and AdaLoRA (peft)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import geolora

from .config import geolora_config

log = logging.getLogger(__name__)


@dataclass
class Adapted:
    """A model with adapters and what the training loop needs to drive, observe and save it: the loop
    never asks which method it runs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ranks: Callable[[], dict[str, int]]
    trainable: Callable[[], int]
    save: Callable[[Path], None]  # writes the adapter (and the trained modules) into a folder
    # LoRA factors (A, B) at scale 1 of the adapters inside a submodule, by name relative to it (diffusers export)
    lora_factors: Callable[[nn.Module], dict[str, tuple[torch.Tensor, torch.Tensor]]]
    after_step: Callable[[int], None] = lambda step: None
    after_training: Callable[[], None] = lambda: None  # after the last step, before the final evaluation
    state: Callable[[], dict] = dict  # what a checkpoint must keep beyond weights and optimizer (AdaLoRA's scores)
    load_state: Callable[[dict], None] = lambda state: None
    adapts_ranks: bool = False  # ranks change during training (a rank plot is worth drawing)
    settings: dict = field(default_factory=dict)  # effective method settings, for the summary


def _save_peft(model: nn.Module) -> Callable[[Path], None]:
    return lambda path: model.save_pretrained(str(path))


def _trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(model: nn.Module, trainer) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_trainable_params(model), lr=trainer.lr, weight_decay=trainer.weight_decay)


def use_geolora(model: nn.Module, model_cfg, method, trainer, total_steps: int) -> Adapted:
    config = geolora_config(model_cfg, method)
    geolora.inject(model, config)
    optimizer = geolora.GeoLoRAOptimizer(
        model,
        lr=trainer.lr,
        weight_decay=trainer.weight_decay,
        moment_transport=method.moment_transport,
        new_block_step=method.new_block_step,
        new_moments=method.new_moments,
    )
    return Adapted(
        model,
        optimizer,
        ranks=lambda: geolora.ranks(model),
        trainable=lambda: geolora.count_trainable(model),
        save=lambda path: geolora.save_adapter(model, path),
        lora_factors=geolora.io.lora_factors,
        after_training=optimizer.truncate,  # a run ending mid-cycle is evaluated, saved and exported truncated
        adapts_ranks=True,
        settings=config.to_dict(),
    )


@torch.no_grad()
def peft_lora_factors(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft LoRA and AdaLoRA layers inside ``module`` as (A, B) with their scaling folded into B. AdaLoRA's
    ``B diag(E) A`` keeps the rows of A whose E is nonzero (its pruned ones are zero)."""
    factors = {}
    for name, layer in module.named_modules():
        if not getattr(layer, "lora_A", None) or "default" not in layer.lora_A:
            continue
        if hasattr(layer, "lora_E"):  # AdaLoRA: Parameters, scale lora_alpha / ranknum
            keep = layer.lora_E["default"][:, 0] != 0
            a = (layer.lora_A["default"] * layer.lora_E["default"])[keep]
            b = layer.lora_B["default"][:, keep] * layer.scaling["default"] / (layer.ranknum["default"] + 1e-5)
        else:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight * layer.scaling["default"]
        if len(a):
            factors[name] = (a.detach().contiguous(), b.detach().contiguous())
    return factors


def use_lora(model: nn.Module, model_cfg, method, trainer, total_steps: int) -> Adapted:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=list(model_cfg.target_modules),
        modules_to_save=list(model_cfg.modules_to_save) or None,
    )
    model = get_peft_model(model, config)
    names = [n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    return Adapted(
        model,
        _adamw(model, trainer),
        ranks=lambda: {n: method.r for n in names},
        trainable=lambda: sum(p.numel() for p in _trainable_params(model)),
        save=_save_peft(model),
        lora_factors=peft_lora_factors,
        settings={"r": method.r, "lora_alpha": method.alpha, "lora_dropout": method.dropout},
    )


def adalora_schedule(tinit: int, tfinal: int, total_steps: int) -> tuple[int, int]:
    """tinit/tfinal that leave a budgeting phase; the paper's step counts are shrunk in proportion
    for runs shorter than ``tinit + tfinal`` (peft refuses those)."""
    if tinit + tfinal < total_steps:
        return tinit, tfinal
    scale = 0.8 * total_steps / (tinit + tfinal)
    new_tinit, new_tfinal = int(tinit * scale), int(tfinal * scale)
    if new_tinit + new_tfinal >= total_steps or total_steps < 3:
        raise ValueError(f"AdaLoRA needs more than {tinit + tfinal} steps; this run has {total_steps}")
    log.warning(
        "AdaLoRA tinit/tfinal %d/%d exceed the run's %d steps: using %d/%d",
        tinit,
        tfinal,
        total_steps,
        new_tinit,
        new_tfinal,
    )
    return new_tinit, new_tfinal


def adalora_target_rank(model: nn.Module, model_cfg, method) -> int:
    """AdaLoRA's average final rank per layer: ``method.target_r``, or the total ``method.rank_budget``
    spread over the adapted layers (the budget then means the same as GeoLoRA's)."""
    if method.rank_budget is None:
        return method.target_r
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    matcher = LoraConfig(target_modules=list(model_cfg.target_modules))
    layers = sum(
        isinstance(m, nn.Linear) and bool(check_target_module_exists(matcher, n)) for n, m in model.named_modules()
    )
    if not layers:
        raise ValueError(f"no Linear layer matches model.target_modules {list(model_cfg.target_modules)}")
    return max(1, round(method.rank_budget / layers))


def use_adalora(model: nn.Module, model_cfg, method, trainer, total_steps: int) -> Adapted:
    from peft import AdaLoraConfig, get_peft_model

    target_r = adalora_target_rank(model, model_cfg, method)
    if target_r >= method.init_rank:
        raise ValueError(
            f"AdaLoRA prunes from init_rank to target_r: need target_r ({target_r}) "
            f"< method.init_rank ({method.init_rank})"
        )
    tinit, tfinal = adalora_schedule(method.tinit, method.tfinal, total_steps)
    config = AdaLoraConfig(
        init_r=method.init_rank,
        target_r=target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=method.delta_t,
        beta1=method.beta1,
        beta2=method.beta2,
        orth_reg_weight=method.orth_reg_weight,
        total_step=total_steps,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=list(model_cfg.target_modules),
        modules_to_save=list(model_cfg.modules_to_save) or None,
    )
    model = get_peft_model(model, config)
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_E") and m.lora_E}

    def ranks() -> dict[str, int]:
        """Singular values AdaLoRA keeps: its latest mask (rank_pattern), init_r before the first one."""
        pattern = model.peft_config["default"].rank_pattern or {}
        return {n: sum(pattern.get(f"{n}.lora_E.default", [True] * m.r["default"])) for n, m in layers.items()}

    def trainable() -> int:
        in_layers = {id(p) for m in layers.values() for p in m.parameters() if p.requires_grad}
        rest = sum(p.numel() for p in _trainable_params(model) if id(p) not in in_layers)
        return rest + sum(r * (m.in_features + m.out_features + 1) for r, m in zip(ranks().values(), layers.values()))

    def after_step(step: int) -> None:
        model.base_model.update_and_allocate(step)

    scores = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def state() -> dict:
        """AdaLoRA's importance scores and its latest mask, which the next reallocation builds on."""
        allocator = model.base_model.rankallocator
        return {
            "rank_pattern": model.peft_config["default"].rank_pattern,
            **{key: {n: t.detach().cpu() for n, t in getattr(allocator, key).items()} for key in scores},
        }

    def load_state(saved: dict) -> None:
        allocator, device = model.base_model.rankallocator, next(model.parameters()).device
        model.peft_config["default"].rank_pattern = saved["rank_pattern"]
        for key in scores:
            setattr(allocator, key, {n: t.to(device) for n, t in saved[key].items()})

    settings = {
        "init_r": method.init_rank,
        "target_r": target_r,
        "tinit": tinit,
        "tfinal": tfinal,
        "deltaT": method.delta_t,
        "total_step": total_steps,
        "orth_reg_weight": method.orth_reg_weight,
    }
    return Adapted(
        model,
        _adamw(model, trainer),
        ranks=ranks,
        trainable=trainable,
        save=_save_peft(model),
        lora_factors=peft_lora_factors,
        after_step=after_step,
        state=state,
        load_state=load_state,
        adapts_ranks=True,
        settings=settings,
    )


METHODS = {"geolora": use_geolora, "lora": use_lora, "adalora": use_adalora}


def adapt(model: nn.Module, model_cfg, method, trainer, total_steps: int) -> Adapted:
    return METHODS[method.name.value](model, model_cfg, method, trainer, total_steps)
