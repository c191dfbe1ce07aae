"""GeoLoRAOptimizer: one backward pass per step, then the rank-adaptive geometric update.

Per adapter (rank r, maximum rank R), from ``S.grad`` and the exact K-/L-gradients in ``U.grad`` /
``V.grad`` (see ``layer.py``):

1. ``S' =`` base-optimizer step (AdamW or SGD) on S;
2. augment the bases with ``a = min(r, R - r)`` new directions from ``(I - UU^T) G_K`` and
   ``(I - VV^T) G_L``;
3. SVD of the augmented coefficients ``[[S', -lr G_L^T Vbar], [-lr Ubar^T G_K, 0]]``;
4. truncate (relative tau rule per layer, or a global ``rank_budget``) and rotate U, V, S.

With ``coefficient_steps = c``, steps 2-4 run every ``c + 1`` steps and only S moves in between.
Rank decisions need the singular values on the host: one device sync per adapting step.

With AdamW, the augmented blocks use Adam's per-layer normalisation of the S-gradients as their step
size (``precondition_augmentation``): plain ``lr`` times a raw gradient is orders of magnitude below
an Adam step, so new directions would always be truncated and ranks could only shrink. With SGD the
step is exactly the integrator above.

Adam moments of S follow the basis: the first moment is rotated into the new basis (so ``U m V^T`` is
kept wherever the new basis can hold it), the second moment is carried by the squared rotations (a
diagonal approximation that preserves its total). ``moment_transport="reset"`` restarts them instead.
Neither U nor V is ever weight-decayed: they are orthonormal bases, not weights.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .layer import GeoLoRALinear
from .linalg import (augment_basis, augmented_coefficients, budget_ranks, transport_first_moment,
                     transport_second_moment, truncation_rank)
from .model import adapters, config_of

BASE_OPTIMIZERS = ("adamw", "sgd")
MOMENT_TRANSPORTS = ("rotate", "reset")


class GeoLoRAOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` over the adapters and every other trainable parameter of ``model``.

    Group 0 holds the adapter factors (U, S, V of each layer, in that order) and runs the geometric
    step; group 1, if any, holds the remaining trainable parameters (``modules_to_save``) and runs the
    plain base optimizer. LR schedulers, gradient clipping and ``GradScaler`` work as usual.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 base_optimizer: str = "adamw", betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 momentum: float = 0.0, moment_transport: str = "rotate",
                 precondition_augmentation: bool = True) -> None:
        if base_optimizer not in BASE_OPTIMIZERS:
            raise ValueError(f"base_optimizer must be one of {BASE_OPTIMIZERS}, got {base_optimizer!r}")
        if moment_transport not in MOMENT_TRANSPORTS:
            raise ValueError(f"moment_transport must be one of {MOMENT_TRANSPORTS}, got {moment_transport!r}")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        config = config_of(model)
        self.layers: list[GeoLoRALinear] = [layer for _, layer in adapters(model)]
        factors = [p for layer in self.layers for p in (layer.U, layer.S, layer.V)]
        factor_ids = {id(p) for p in factors}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
        groups = [{"params": factors, "role": "adapters", "step": 0}]
        if others:
            groups.append({"params": others, "role": "others"})
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum)
        super().__init__(groups, defaults)
        self.base_optimizer = base_optimizer
        self.moment_transport = moment_transport
        self.precondition_augmentation = precondition_augmentation
        self.coefficient_steps = config.coefficient_steps
        self.rank_budget = config.rank_budget

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["role"] == "adapters":
                self._adapter_step(group)
            else:
                for param in group["params"]:
                    if param.grad is not None:
                        self._base_step(param, param.grad, self.state[param], group)
        return loss

    def _base_step(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                   rank: int | None = None) -> None:
        """One AdamW / SGD step on ``param`` (on its leading ``rank x rank`` block when rank is given)."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            if self.base_optimizer == "adamw":
                state["exp_avg_sq"] = torch.zeros_like(param)
        block = (slice(None, rank), slice(None, rank)) if rank is not None else (...,)
        param, grad = param[block], grad[block]
        exp_avg = state["exp_avg"][block]
        lr, wd = group["lr"], group["weight_decay"]
        state["step"] += 1
        if self.base_optimizer == "adamw":
            beta1, beta2 = group["betas"]
            exp_avg_sq = state["exp_avg_sq"][block]
            param.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = state["step"]
            denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
            param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
        else:
            if wd:
                grad = grad + wd * param
            if group["momentum"]:
                exp_avg.mul_(group["momentum"]).add_(grad)
                grad = exp_avg
            param.add_(grad, alpha=-lr)

    def _adapter_step(self, group: dict) -> None:
        adapt = group["step"] % (self.coefficient_steps + 1) == 0
        group["step"] += 1
        proposals = []
        for layer in self.layers:
            if layer.S.grad is None or layer.merged:
                continue
            self._base_step(layer.S, layer.S.grad, self.state[layer.S], group, rank=layer.rank)
            if adapt:
                step_size = group["lr"] * self._augmentation_gain(layer, group)
                proposals.append((layer, *self._augmented_svd(layer, step_size)))
        if proposals:
            self._truncate(proposals)

    def _augmentation_gain(self, layer: GeoLoRALinear, group: dict) -> torch.Tensor | float:
        """Scale of the new directions relative to ``lr``: 1 for SGD; for AdamW, Adam's normalisation
        ``1 / (sqrt(mean v_hat) + eps)`` of this layer's S-gradients, so augmented directions enter
        on the same scale as the Adam step on S (a per-layer scalar: basis-independent)."""
        if self.base_optimizer != "adamw" or not self.precondition_augmentation:
            return 1.0
        state, rank = self.state[layer.S], layer.rank
        second = state["exp_avg_sq"][:rank, :rank].mean() / (1 - group["betas"][1] ** state["step"])
        return 1.0 / (second.sqrt() + group["eps"])

    @staticmethod
    def _augmented_svd(layer: GeoLoRALinear, lr: torch.Tensor | float):
        """Augmented bases and the SVD (P, sigma, Q) of the augmented coefficient matrix."""
        rank = layer.rank
        width = min(rank, layer.max_rank - rank)
        grad_k, grad_l = layer.U.grad[:, :rank], layer.V.grad[:, :rank]
        u, u_factor = augment_basis(layer.u, grad_k, width)
        v, v_factor = augment_basis(layer.v, grad_l, width)
        s = u_factor @ layer.s @ v_factor.T  # S in the re-orthonormalised bases
        if width > 0:
            s = augmented_coefficients(s, u[:, rank:].T @ grad_k, grad_l.T @ v[:, rank:], lr)
        left, sigma, right_t = torch.linalg.svd(s)
        return u, v, left, sigma, right_t.T

    def _truncate(self, proposals: list) -> None:
        sigmas = [p[4] for p in proposals]
        host = torch.cat(sigmas).double().cpu().split([s.numel() for s in sigmas])  # the one sync
        layers = [p[0] for p in proposals]
        if self.rank_budget is not None:
            new_ranks = budget_ranks(list(host), self.rank_budget, [l.min_rank for l in layers],
                                     [l.max_rank for l in layers])
        else:
            new_ranks = [truncation_rank(s, l.tau, l.min_rank, l.max_rank) for s, l in zip(host, layers)]
        for (layer, u, v, left, sigma, right), rank in zip(proposals, new_ranks):
            left, right = left[:, :rank], right[:, :rank]
            self._transport_moments(layer, left, right)
            layer.set_factors(u @ left, torch.diag(sigma[:rank]), v @ right)

    def _transport_moments(self, layer: GeoLoRALinear, left: torch.Tensor, right: torch.Tensor) -> None:
        state = self.state[layer.S]
        old, new = layer.rank, left.shape[1]
        if self.moment_transport == "reset":
            state.clear()
            return
        moves = {"exp_avg": transport_first_moment, "exp_avg_sq": transport_second_moment}
        for key, move in moves.items():
            if key in state:
                moved = move(state[key][:old, :old], left, right)
                state[key].zero_()
                state[key][:new, :new] = moved
