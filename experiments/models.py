"""Models of the experiments: pretrained from the hub or a local folder, or built from a config."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import UserError, one_line, unreachable

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists()


def _from_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained`` with a one-line error when a hub name cannot be fetched."""
    local = _is_local(name_or_path)
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(unreachable("model", name_or_path, "model.name_or_path"))
    try:
        return loader.from_pretrained(str(Path(name_or_path).expanduser()) if local else name_or_path, **kwargs)
    except (OSError, ValueError) as err:  # ValueError: a config.json that does not parse or names no model
        if local:
            raise UserError(
                f"model.name_or_path={name_or_path} is not a loadable model folder ({one_line(err)}); point it "
                "at a save_pretrained folder"
            ) from err
        raise UserError(unreachable("model", name_or_path, "model.name_or_path")) from err


class TimmClassifier(nn.Module):
    """A timm image model behind the transformers interface the loop uses: ``model(pixel_values, labels)``
    returns ``.loss`` (cross-entropy, or MSE for one output) and ``.logits``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.backbone(pixel_values)
        loss = None
        if labels is not None:
            loss = (
                nn.functional.mse_loss(logits.squeeze(-1), labels.float())
                if logits.shape[-1] == 1
                else nn.functional.cross_entropy(logits, labels)
            )
        return ImageClassifierOutput(loss=loss, logits=logits)


def load_timm(model_cfg, task_cfg) -> nn.Module:
    """``timm.create_model(model.model_type)`` with a new head of ``task.num_labels`` outputs: pretrained from
    the hub (``model.name_or_path`` = the timm name) or from a local weights file, random when not pretrained."""
    try:
        import timm
    except (ImportError, OSError, RuntimeError) as err:  # absent, or a torchvision that does not load
        raise UserError(
            "model.library=timm needs timm (it imports torchvision, a CUDA build on PyPI): "
            "pip install -e .[timm] in a GPU install, or use model=vit"
        ) from err
    kwargs = {"num_classes": task_cfg.num_labels}
    if model_cfg.pretrained:
        local = Path(model_cfg.name_or_path).expanduser()
        if local.is_file():
            kwargs["pretrained_cfg_overlay"] = {"file": str(local)}
        elif os.environ.get("HF_HUB_OFFLINE") == "1":
            raise UserError(
                unreachable("model", model_cfg.name_or_path, "model.name_or_path", "/path/to/weights.safetensors")
            )
    try:
        backbone = timm.create_model(model_cfg.model_type, pretrained=model_cfg.pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"timm could not load {model_cfg.model_type!r} from {model_cfg.name_or_path!r}: {one_line(err)}"
        ) from err
    return TimmClassifier(backbone)


def load_model(model_cfg, task_cfg) -> nn.Module:
    """A sequence or image classifier with ``task.num_labels`` outputs (1 = regression)."""
    if model_cfg.library == "timm":
        return load_timm(model_cfg, task_cfg)
    from transformers import (
        CONFIG_MAPPING,
        AutoConfig,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    image = model_cfg.modality.value == "image"
    auto = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    problem = "regression" if task_cfg.num_labels == 1 else "single_label_classification"
    if not model_cfg.pretrained:
        config = CONFIG_MAPPING[model_cfg.model_type](
            **dict(model_cfg.architecture), num_labels=task_cfg.num_labels, problem_type=problem
        )
        log.warning("model %s is built from a config with RANDOM weights (not pretrained)", model_cfg.name)
        return auto.from_config(config)
    config = _from_pretrained(AutoConfig, model_cfg.name_or_path, num_labels=task_cfg.num_labels, problem_type=problem)
    return _from_pretrained(auto, model_cfg.name_or_path, config=config, ignore_mismatched_sizes=True)


def load_causal_lm(model_cfg, vocab_size: int) -> nn.Module:
    """An ``AutoModelForCausalLM``: pretrained (hub name or folder) in ``model.dtype``, or built from
    ``model.architecture`` with random weights and the tokenizer's vocabulary."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    dtype = getattr(torch, model_cfg.dtype) if model_cfg.dtype else None
    if not model_cfg.pretrained:
        config = CONFIG_MAPPING[model_cfg.model_type](**{"vocab_size": vocab_size, **model_cfg.architecture})
        log.warning("model %s is built from a config with RANDOM weights (not pretrained)", model_cfg.name)
        model = AutoModelForCausalLM.from_config(config)
        return model.to(dtype) if dtype else model
    return _from_pretrained(AutoModelForCausalLM, model_cfg.name_or_path, **({"dtype": dtype} if dtype else {}))


def load_tokenizer(model_cfg):
    """The model's tokenizer, or the one ``model.tokenizer`` names (a model built from a config has none)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, model_cfg.tokenizer or model_cfg.name_or_path)


def image_statistics(model_cfg) -> tuple[list[float], list[float]]:
    """Normalisation mean/std of the model's image processor (0.5/0.5, ViT's, when it has none)."""
    path = Path(model_cfg.name_or_path).expanduser() / "preprocessor_config.json"
    if model_cfg.pretrained and path.is_file():
        stats = json.loads(path.read_text())
        return stats.get("image_mean", IMAGENET_MEAN), stats.get("image_std", IMAGENET_STD)
    return IMAGENET_MEAN, IMAGENET_STD


def autocast(precision: str, device: torch.device):
    """The autocast context of a run's precision (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is visible; use trainer.device=auto or cpu")
    return torch.device(name)
