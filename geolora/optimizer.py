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

from typing import Callable, NamedTuple

import torch
from torch import nn

from .layer import GeoLoRALinear
from .linalg import (augment_bases, augmented_coefficients, budget_ranks, columns_in_use, transport_first_moment,
                     transport_second_moment, truncation_ranks)
from .model import adapters, config_of

BASE_OPTIMIZERS = ("adamw", "sgd")
MOMENT_TRANSPORTS = ("rotate", "reset")


class _Decomposed(NamedTuple):
    """One batch of same-shaped layers after the augmented SVD, before truncation."""

    layers: list[GeoLoRALinear]
    ranks: list[int]  # before this step
    u: torch.Tensor  # augmented bases, B x n x R, each column to be read times its sign
    v: torch.Tensor
    u_signs: torch.Tensor  # B x R
    v_signs: torch.Tensor
    u_factor: torch.Tensor  # old basis = (augmented * signs)[:, :r] @ factor (B x R x R)
    v_factor: torch.Tensor
    left: torch.Tensor  # singular vectors of the augmented coefficients, B x R x R
    sigma: torch.Tensor  # B x R, zero beyond each layer's augmented rank
    right: torch.Tensor


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

    def _base_steps(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
                    group: dict) -> None:
        """AdamW / SGD on a list of tensors at once (foreach kernels, no per-tensor Python loop).

        Coefficient matrices are stepped at their full fixed size: outside the rank x rank block their
        gradient, moments and values are zero, so the step leaves them zero.
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
        exp_avgs = [s["exp_avg"] for s in states]
        lr, wd = group["lr"], group["weight_decay"]
        if adam:
            beta1, beta2 = group["betas"]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
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
                         group)
        if not adapt or not layers:
            return
        # Layers of one shape are augmented and decomposed together, whatever their ranks: one batched
        # QR per factor and one batched SVD per shape, in the fixed-size (padded) layout.
        batches: dict[tuple, list[GeoLoRALinear]] = {}
        for layer in layers:
            key = (layer.U.shape, layer.V.shape, layer.U.dtype, layer.U.device)
            batches.setdefault(key, []).append(layer)
        self._truncate([self._augmented_svd(batch, group) for batch in batches.values()])

    def _augmentation_gains(self, layers: list[GeoLoRALinear], ranks: torch.Tensor,
                            group: dict) -> torch.Tensor | float:
        """Scale of the new directions relative to ``lr``: 1 for SGD; for AdamW, Adam's normalisation
        ``1 / (sqrt(mean v_hat) + eps)`` of each layer's S-gradients (mean over the rank x rank block),
        so augmented directions enter on the same scale as the Adam step on S (a per-layer scalar:
        basis-independent)."""
        if self.base_optimizer != "adamw" or not self.precondition_augmentation:
            return 1.0
        beta2 = group["betas"][1]
        states = [self.state[l.S] for l in layers]
        second = torch.stack([s["exp_avg_sq"] for s in states]).sum(dim=(-2, -1)) / ranks ** 2
        bias = [1 - beta2 ** s["step"] for s in states]
        bias = torch.tensor(bias, dtype=second.dtype, device=second.device)
        return 1.0 / ((second / bias).sqrt() + group["eps"]).view(-1, 1, 1)

    def _augmented_svd(self, layers: list[GeoLoRALinear], group: dict) -> _Decomposed:
        """For a batch of same-shaped layers: augmented bases and the SVD (P, sigma, Q) of the
        augmented coefficient matrices, all at the fixed size R (the layers' maximum rank)."""
        device, max_rank = layers[0].U.device, layers[0].max_rank
        host_ranks = [l.rank for l in layers]
        host_widths = [min(r, max_rank - r) for r in host_ranks]
        narrow = any(w < r for w, r in zip(host_widths, host_ranks))
        ranks, widths = torch.tensor(host_ranks, device=device), torch.tensor(host_widths, device=device)
        grad_k = torch.stack([l.U.grad for l in layers])
        grad_l = torch.stack([l.V.grad for l in layers])
        u, u_signs, u_factor = augment_bases(torch.stack([l.U for l in layers]), grad_k, ranks, widths, narrow)
        v, v_signs, v_factor = augment_bases(torch.stack([l.V for l in layers]), grad_l, ranks, widths, narrow)
        s = u_factor @ torch.stack([l.S for l in layers]) @ v_factor.mT  # S in the augmented bases
        step = group["lr"] * self._augmentation_gains(layers, ranks.to(s.dtype), group)
        new_u_t_grad_k = u_signs.unsqueeze(-1) * (u.mT @ grad_k)
        grad_l_t_new_v = (grad_l.mT @ v) * v_signs.unsqueeze(-2)
        s = augmented_coefficients(s, new_u_t_grad_k, grad_l_t_new_v, ranks, widths, step)
        left, sigma, right_t = torch.linalg.svd(s)
        sigma = sigma * columns_in_use(ranks + widths, max_rank)  # padding: exact zeros, never kept
        return _Decomposed(layers, host_ranks, u, v, u_signs, v_signs, u_factor, v_factor, left, sigma,
                           right_t.mT)

    def _truncate(self, batches: list[_Decomposed]) -> None:
        """New ranks for every layer (one host sync), then rotate and cut the factors and moments."""
        if self.rank_budget is not None:
            flat = torch.cat([b.sigma.flatten() for b in batches]).double().cpu()  # the one host sync
            sigmas = [row for chunk, b in zip(flat.split([b.sigma.numel() for b in batches]), batches)
                      for row in chunk.view(b.sigma.shape)]
            lengths = [min(2 * r, l.max_rank) for b in batches for l, r in zip(b.layers, b.ranks)]
            layers = [layer for b in batches for layer in b.layers]
            new_ranks = budget_ranks([s[:n] for s, n in zip(sigmas, lengths)], self.rank_budget,
                                     [l.min_rank for l in layers], [l.max_rank for l in layers])
        else:  # one config per model: tau and the rank limits are those of the batch's first layer
            new_ranks = torch.cat([truncation_ranks(b.sigma, b.layers[0].tau, b.layers[0].min_rank,
                                                    b.layers[0].max_rank) for b in batches]).tolist()  # the sync
        start = 0
        for batch in batches:
            layers, sigma = batch.layers, batch.sigma
            host_ranks = new_ranks[start:start + len(layers)]
            start += len(layers)
            keep = columns_in_use(torch.tensor(host_ranks, device=sigma.device), sigma.shape[-1]).to(sigma.dtype)
            block = keep.unsqueeze(-1) * keep.unsqueeze(-2)
            # Rotations with the basis signs folded in, zero beyond the new rank (as the layers keep them).
            left = batch.u_signs.unsqueeze(-1) * batch.left * keep.unsqueeze(-2)
            right = batch.v_signs.unsqueeze(-1) * batch.right * keep.unsqueeze(-2)
            torch._foreach_copy_([l.U for l in layers], list((batch.u @ left).unbind()))
            torch._foreach_copy_([l.V for l in layers], list((batch.v @ right).unbind()))
            torch._foreach_copy_([l.S for l in layers], list(torch.diag_embed(sigma * keep).unbind()))
            for key, moved in self._transported_moments(batch).items():
                torch._foreach_copy_([self.state[l.S][key] for l in layers], list((moved * block).unbind()))
            for layer, rank in zip(layers, host_ranks):
                layer.rank = rank

    def _transported_moments(self, batch: _Decomposed) -> dict[str, torch.Tensor]:
        """Adam moments of S carried into the new bases (all columns; callers mask): first into the
        augmented bases as S is (through the QR factors), then along the kept singular vectors."""
        if self.moment_transport == "reset":
            for layer in batch.layers:
                self.state[layer.S].clear()
            return {}
        states = [self.state[l.S] for l in batch.layers]
        moved = {}
        if "exp_avg" in states[0]:
            first = batch.u_factor @ torch.stack([s["exp_avg"] for s in states]) @ batch.v_factor.mT
            moved["exp_avg"] = transport_first_moment(first, batch.left, batch.right)
        if "exp_avg_sq" in states[0]:
            second = batch.u_factor ** 2 @ torch.stack([s["exp_avg_sq"] for s in states]) @ (batch.v_factor ** 2).mT
            moved["exp_avg_sq"] = transport_second_moment(second, batch.left, batch.right)
        return moved
