"""The base optimizers of the step: AdamW or SGD on S (and on every other trainable parameter), as torch.optim
computes them, on one tensor or on a stack of same-shaped ones (``steps`` then per item, shaped to broadcast).

Coefficient matrices are stepped at their full fixed size: outside the rank x rank block their gradient, moments
and values are zero, so the step leaves them zero.
"""

from __future__ import annotations

import torch

MOMENTS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("exp_avg",)}  # the state each keeps per tensor


def base_step(
    kind: str,
    param: torch.Tensor,
    grad: torch.Tensor,
    moments: dict[str, torch.Tensor],
    steps: int | torch.Tensor,
    group: dict,
) -> None:
    """One AdamW (``kind="adamw"``) or SGD step in place on ``param`` and its ``moments``."""
    lr, wd = group["lr"], group["weight_decay"]
    exp_avg = moments["exp_avg"]
    if kind == "adamw":
        beta1, beta2 = group["betas"]
        exp_avg_sq = moments["exp_avg_sq"]
        if wd:
            param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**steps)).sqrt_().add_(group["eps"])
        param.sub_(exp_avg / denom * (lr / (1 - beta1**steps)))
    else:
        if wd:
            grad = grad + wd * param
        if group["momentum"]:
            grad = exp_avg.mul_(group["momentum"]).add_(grad)
        param.add_(grad, alpha=-lr)
