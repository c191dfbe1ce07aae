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
                params = [p for p in group["params"] if p.grad is not None]
                self._base_steps(params, [p.grad for p in params], [self.state[p] for p in params], group)
        return loss

    def _base_steps(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict,
                    ranks: list[int] | None = None) -> None:
        """AdamW / SGD on a list of tensors at once (foreach kernels, no per-tensor Python loop).

        With ``ranks``, each tensor is an R x R coefficient matrix and only its leading rank x rank
        block (and the same block of its moments) is stepped.
        """
        if not params:
            return
        adam = self.base_optimizer == "adamw"
        for param, state in zip(params, states):
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param)
                if adam:
                    state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] += 1
        blocks = [(slice(None, r), slice(None, r)) for r in ranks] if ranks else [(...,)] * len(params)
        params = [p[b] for p, b in zip(params, blocks)]
        grads = [g[b] for g, b in zip(grads, blocks)]
        exp_avgs = [s["exp_avg"][b] for s, b in zip(states, blocks)]
        lr, wd = group["lr"], group["weight_decay"]
        if adam:
            beta1, beta2 = group["betas"]
            exp_avg_sqs = [s["exp_avg_sq"][b] for s, b in zip(states, blocks)]
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            steps = [s["step"] for s in states]
            denoms = torch._foreach_div(exp_avg_sqs, [1 - beta2 ** t for t in steps])
            torch._foreach_sqrt_(denoms)
            torch._foreach_add_(denoms, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1 - beta1 ** t) for t in steps])
        else:
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if group["momentum"]:
                torch._foreach_mul_(exp_avgs, group["momentum"])
                torch._foreach_add_(exp_avgs, grads)
                grads = exp_avgs
            torch._foreach_add_(params, grads, alpha=-lr)

    def _adapter_step(self, group: dict) -> None:
        adapt = group["step"] % (self.coefficient_steps + 1) == 0
        group["step"] += 1
        layers = [layer for layer in self.layers if layer.S.grad is not None and not layer.merged]
        self._base_steps([l.S for l in layers], [l.S.grad for l in layers], [self.state[l.S] for l in layers],
                         group, ranks=[l.rank for l in layers])
        if not adapt or not layers:
            return
        # Layers of one shape and rank are augmented and decomposed together, as one batched call.
        batches: dict[tuple, list[GeoLoRALinear]] = {}
        for layer in layers:
            key = (layer.U.shape, layer.V.shape, layer.rank, layer.U.dtype, layer.U.device)
            batches.setdefault(key, []).append(layer)
        self._truncate([self._augmented_svd(batch, group) for batch in batches.values()])

    def _augmentation_gains(self, layers: list[GeoLoRALinear], group: dict) -> torch.Tensor | float:
        """Scale of the new directions relative to ``lr``: 1 for SGD; for AdamW, Adam's normalisation
        ``1 / (sqrt(mean v_hat) + eps)`` of each layer's S-gradients, so augmented directions enter on
        the same scale as the Adam step on S (a per-layer scalar: basis-independent)."""
        if self.base_optimizer != "adamw" or not self.precondition_augmentation:
            return 1.0
        rank, beta2 = layers[0].rank, group["betas"][1]
        states = [self.state[l.S] for l in layers]
        second = torch.stack([s["exp_avg_sq"][:rank, :rank] for s in states]).mean(dim=(-2, -1))
        bias = torch.tensor([1 - beta2 ** s["step"] for s in states], dtype=second.dtype, device=second.device)
        return 1.0 / ((second / bias).sqrt() + group["eps"]).view(-1, 1, 1)

    def _augmented_svd(self, layers: list[GeoLoRALinear], group: dict) -> tuple:
        """For a batch of same-shaped layers: augmented bases and the SVD (P, sigma, Q) of the
        augmented coefficient matrices."""
        rank = layers[0].rank
        width = min(rank, layers[0].max_rank - rank)
        grad_k = torch.stack([l.U.grad[:, :rank] for l in layers])
        grad_l = torch.stack([l.V.grad[:, :rank] for l in layers])
        u, u_factor = augment_basis(torch.stack([l.u for l in layers]), grad_k, width)
        v, v_factor = augment_basis(torch.stack([l.v for l in layers]), grad_l, width)
        s = u_factor @ torch.stack([l.s for l in layers]) @ v_factor.mT  # S in the re-orthonormalised bases
        if width > 0:
            step = group["lr"] * self._augmentation_gains(layers, group)
            s = augmented_coefficients(s, u[..., rank:].mT @ grad_k, grad_l.mT @ v[..., rank:], step)
        left, sigma, right_t = torch.linalg.svd(s)
        return layers, u, v, left, sigma, right_t.mT

    def _truncate(self, batches: list[tuple]) -> None:
        sigmas = torch.cat([b[4].reshape(-1) for b in batches]).double().cpu()  # the one host sync
        per_layer = iter(sigmas.split([s.shape[-1] for b in batches for s in b[4]]))
        layers = [layer for b in batches for layer in b[0]]
        host = [next(per_layer) for _ in layers]
        if self.rank_budget is not None:
            new_ranks = budget_ranks(host, self.rank_budget, [l.min_rank for l in layers],
                                     [l.max_rank for l in layers])
        else:
            new_ranks = [truncation_rank(s, l.tau, l.min_rank, l.max_rank) for s, l in zip(host, layers)]
        ranks = iter(new_ranks)
        for batch_layers, u, v, left, sigma, right in batches:
            u_rotated, v_rotated = u @ left, v @ right
            moments = self._transported_moments(batch_layers, left, right)
            for i, layer in enumerate(batch_layers):
                rank = next(ranks)
                for key, moved in moments.items():
                    state = self.state[layer.S][key]
                    state.zero_()
                    state[:rank, :rank] = moved[i, :rank, :rank]
                layer.set_factors(u_rotated[i, :, :rank], torch.diag(sigma[i, :rank]), v_rotated[i, :, :rank])

    def _transported_moments(self, layers: list[GeoLoRALinear], left: torch.Tensor,
                             right: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adam moments of S carried into the new bases (all augmented columns; callers slice)."""
        if self.moment_transport == "reset":
            for layer in layers:
                self.state[layer.S].clear()
            return {}
        rank = layers[0].rank
        moves = {"exp_avg": transport_first_moment, "exp_avg_sq": transport_second_moment}
        states = [self.state[l.S] for l in layers]
        return {key: move(torch.stack([s[key][:rank, :rank] for s in states]), left, right)
                for key, move in moves.items() if key in states[0]}
