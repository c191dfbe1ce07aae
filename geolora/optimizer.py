"""GeoLoRAOptimizer: one backward pass per step, then the rank-adaptive geometric update.

The step is ``geolora.reference.ReferenceStep`` (the specification, one layer at a time) computed for
all layers of one maximum rank at once. Per adapter (rank r, maximum rank R), from ``S.grad`` and the
exact K-/L-gradients in ``U.grad`` / ``V.grad`` (see ``layer.py``):

1. ``S' =`` base-optimizer step (AdamW or SGD) on S;
2. augment the bases with the strongest ``a = min(r, R - r)`` directions ``Ubar``, ``Vbar`` of
   ``(I - UU^T) G_K`` and ``(I - VV^T) G_L``;
3. SVD ``P Sigma Q^T`` of the augmented coefficients ``[[S', -h_L G_L^T Vbar], [-h_K Ubar^T G_K, 0]]``;
4. truncate (relative tau rule per layer, or a global ``rank_budget``) and rotate U, V, S.

With ``coefficient_steps = c > 0`` the step runs in cycles of ``c + 1`` steps (as the authors' code does): the
cycle's first step augments (steps 1-3) and installs the augmented layer at rank ``min(2r, R)`` without
truncating (its S is ``[[S', -h G_L^T Vbar], [-h Ubar^T G_K, 0]]``), the next c steps train the whole augmented S,
and after the cycle's last step S is decomposed and truncated (step 4). New directions are thus trained for c
steps before they are judged. ``truncate()`` truncates mid-cycle (e.g. after the last training step).

The step size of the new blocks is ``h = lr`` with SGD (exactly the integrator). With AdamW it is
``lr / (sqrt(max(v, q)) + eps)``, q the mean square of the layer's tangent gradient in the augmented
bases (the entries of ``G_S``, ``Ubar^T G_K`` and ``G_L^T Vbar``) and v its running average (first value as
is, then averaged with ``beta2``): the K- and L-steps keep the integrator's proportions to each other and
to G_S, at Adam's scale, with an RMS of at most ``sqrt(3) lr`` whatever the size of G_K against G_S (G_S = 0
included; a gradient surge cannot enlarge the step through a lagging v), and basis-independent (q is a
norm).

The step is atomic: every gradient is checked (its finiteness comes out of sums the step computes
anyway) and the result is only written once the ranks and the check are on the host, in the one
device sync an adapting step has (a coefficient-only step syncs once for the check). A non-finite
gradient raises ``FloatingPointError`` naming the layer, with parameters, moments and step counts
unchanged, so a training loop can skip the batch.

Adam moments of S follow the basis: the first moment is rotated into the new basis (so ``U m V^T`` is
kept wherever the new basis can hold it), the second moment is carried by the squared rotations (a
diagonal approximation that preserves its total). ``moment_transport="reset"`` restarts them instead.
Neither U nor V is ever weight-decayed: they are orthonormal bases, not weights.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .base_optimizers import MOMENTS, base_step
from .decisions import decide
from .layer import GeoLoRALinear
from .linalg import (
    Augmented,
    augment_bases,
    augmented_coefficients,
    columns_in_use,
    matched_identity,
    transport_first_moment,
    transport_second_moment,
)
from .model import adapters, config_of
from .stacking import Buffers, Plan, in_batch_order, make_plans

BASE_OPTIMIZERS = tuple(MOMENTS)
MOMENT_TRANSPORTS = ("rotate", "reset")
NEW_BLOCK_STEPS = ("tangent", "lr")  # h of the new blocks with AdamW: the tangent rule, or lr (the authors' code)
NEW_MOMENTS = ("zero", "tangent")  # second moment of the new entries of S under cycles: zero, or the tangent's


class _Batch(NamedTuple):
    """One plan's layers in one step, before anything is written."""

    plan: Plan
    ranks: list[int]  # before this step
    s: torch.Tensor  # B x R x R, the layers' S (stacked, their parameters are views)
    s_new: torch.Tensor  # after the base step
    grad_s: torch.Tensor  # B x R x R: U^T G_K, and transposed V^T G_L
    moments: dict[str, torch.Tensor]  # the base optimizer's S moments, stacked (the states hold views)
    moments_new: dict[str, torch.Tensor]  # after the base step
    steps: int | torch.Tensor  # the base step count after this step, per layer (B x 1 x 1) where they differ


class _Decomposed(NamedTuple):
    """One batch before its new factors are written: after the augmented SVD (to be truncated), after the
    augmentation alone (a cycle's first step: P, Q pick the augmented columns, S is the augmented S), or after
    the SVD of S alone (a cycle's truncation: ``augmented`` is None, P and Q rotate the bases)."""

    batch: _Batch
    stacked: list[torch.Tensor]  # the U/V factor groups stacked: the factors are views of these
    augmented: Augmented | None
    u_factor: torch.Tensor | None  # old basis = augmented[:, :r] @ factor, B x R x R (None: the identity)
    v_factor: torch.Tensor | None
    P: torch.Tensor  # new basis = augmented (or old) basis @ P, B x R x R
    sigma: torch.Tensor  # B x R, zero beyond what the augmented bases can hold (truncating) or None
    Q: torch.Tensor
    coefficients: torch.Tensor  # the new S before the cut to the new ranks: diag(sigma), or the augmented S
    capacity: torch.Tensor  # B: the most columns both (augmented) bases can give
    tangent_sq: tuple[torch.Tensor, torch.Tensor] | None  # (AdamW) the stacked running mean squares of the
    # tangent gradients (B, the states hold views) and their new values
    finite: torch.Tensor  # B bool


class GeoLoRAOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` over the adapters and every other trainable parameter of ``model``.

    Group 0 holds the adapter factors (U, S, V of each layer, in that order) and runs the geometric
    step; group 1, if any, holds the remaining trainable parameters (``modules_to_save``) and runs the
    plain base optimizer. LR schedulers, gradient clipping and ``GradScaler`` work as usual.

    Layers of one maximum rank are stepped as one batch whatever their shapes and ranks (batched
    linear algebra), so the cost per step hardly grows with the number of layers. From the first step
    on, the factors of each shape are views of one stacked tensor (as are the S moments in the state),
    so batched results land in the parameters without copies; moving or casting the model breaks the
    views and the next step restacks (and casts the state to match). The gradients are read, never
    changed; their stacked copies, projections and new columns live in buffers kept between steps.
    """

    steps_geolora_factors = True  # U.grad / V.grad are K-/L-gradients: this optimizer knows (layer.py refuses others)

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        base_optimizer: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.0,
        moment_transport: str = "rotate",
        new_block_step: str = "tangent",
        new_moments: str = "zero",
    ) -> None:
        if base_optimizer not in BASE_OPTIMIZERS:
            raise ValueError(f"base_optimizer must be one of {BASE_OPTIMIZERS}, got {base_optimizer!r}")
        if moment_transport not in MOMENT_TRANSPORTS:
            raise ValueError(f"moment_transport must be one of {MOMENT_TRANSPORTS}, got {moment_transport!r}")
        if new_block_step not in NEW_BLOCK_STEPS:
            raise ValueError(f"new_block_step must be one of {NEW_BLOCK_STEPS}, got {new_block_step!r}")
        if new_moments not in NEW_MOMENTS:
            raise ValueError(f"new_moments must be one of {NEW_MOMENTS}, got {new_moments!r}")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        config = config_of(model)
        named = list(adapters(model))
        self.layers: list[GeoLoRALinear] = [layer for _, layer in named]
        self.layer_names = [name for name, _ in named]
        factors = [p for layer in self.layers for p in (layer.U, layer.S, layer.V)]
        factor_ids = {id(p) for p in factors}
        others = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in factor_ids]
        self.other_names = [name for name, _ in others]
        # pending: the layers were augmented by a cycle's first step and are not truncated yet
        groups = [{"params": factors, "role": "adapters", "step": 0, "pending": False}]
        if others:
            groups.append({"params": [p for _, p in others], "role": "others"})
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum)
        super().__init__(groups, defaults)
        self.base_optimizer = base_optimizer
        self.moment_transport = moment_transport
        self.new_block_step = new_block_step
        self.new_moments = new_moments
        self.coefficient_steps = config.coefficient_steps
        self.rank_budget = config.rank_budget
        self._buffers = Buffers()
        self._plans: tuple[tuple, list[Plan]] = ((), [])  # for the last set of stepped layers

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        others = [
            (name, p)
            for g in self.param_groups[1:]
            for name, p in zip(self.other_names, g["params"])
            if p.grad is not None
        ]
        # A sum is non-finite when any entry is (or the gradient overflows): one reduction per tensor.
        others_finite = torch.isfinite(torch.stack([p.grad.sum() for _, p in others])) if others else None
        cycle, phase = self.coefficient_steps, group["step"] % (self.coefficient_steps + 1)
        batches = [self._coefficient_step(plan, group) for plan in self._plans_for(group)]
        truncating = phase == cycle  # c = 0: augment and truncate in one step
        if phase == 0:
            decomposed = [self._augmented_svd(batch, group, decompose=truncating) for batch in batches]
        elif truncating:
            decomposed = [self._truncation_svd(batch) for batch in batches]
        else:
            decomposed = []
        new_ranks = decide(
            batches, decomposed, others, others_finite, self.rank_budget, truncating
        )  # raises before any write
        group["step"] += 1
        if decomposed:
            self._commit_adapting(decomposed, new_ranks)
            group["pending"] = not truncating
        else:
            for batch in batches:
                self._commit_coefficients(batch, batch.s_new, batch.moments_new)
        for g in self.param_groups[1:]:
            for param in g["params"]:
                if param.grad is not None:
                    state = self.state[param]
                    moments = self._moments(state, param)
                    state["step"] += 1
                    base_step(self.base_optimizer, param, param.grad, moments, state["step"], g)
        return loss

    @torch.no_grad()
    def truncate(self) -> None:
        """Truncate every layer now (tau rule or rank budget, moments rotated, atomic like ``step``), where a
        cycle's first step augmented them and its last has not truncated them yet: after the last training
        step, the adapter that is evaluated, saved and exported is a truncated one. Elsewhere (c = 0, or at a
        cycle's end) there is nothing to truncate and nothing changes. The schedule of cycles goes on as before."""
        group = self.param_groups[0]
        if not group.get("pending", False):  # (a state_dict from before cycles has no flag)
            return
        indices = [i for i, layer in enumerate(self.layers) if not layer.merged]
        plans = make_plans(
            [self.layers[i] for i in indices],
            [self.layer_names[i] for i in indices],
            [group["params"][3 * i : 3 * i + 3] for i in indices],
        )
        batches = [self._current(plan) for plan in plans]
        decomposed = [self._truncation_svd(batch) for batch in batches]
        new_ranks = decide(batches, decomposed, [], None, self.rank_budget, True)
        self._commit_adapting(decomposed, new_ranks, count=False)
        group["pending"] = False

    def _moments(self, state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base optimizer's moment tensors in ``state`` (see ``_state_tensor``)."""
        if not state:
            state["step"] = 0
        return {key: self._state_tensor(state, key, like, like.shape) for key in MOMENTS[self.base_optimizer]}

    @staticmethod
    def _state_tensor(state: dict, key: str, like: torch.Tensor, shape: tuple) -> torch.Tensor:
        """``state[key]``, created (zero, of ``shape``) on first use and cast to ``like``'s dtype and device
        when the model was moved or cast since."""
        value = state.get(key)
        if value is None:
            value = state[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        elif value.dtype != like.dtype or value.device != like.device:
            value = state[key] = value.to(like)
        return value

    def _plans_for(self, group: dict) -> list[Plan]:
        """The stacking plans of this step's layers, rebuilt when the set of stepped layers, or their
        dtype or device, changes (then buffers of dtypes or devices no longer used are dropped)."""
        coefficients = group["params"][1::3]
        stepped = tuple(
            (i, s.dtype, s.device)
            for i, (layer, s) in enumerate(zip(self.layers, coefficients))
            if s.grad is not None and not layer.merged
        )
        if self._plans[0] != stepped:
            kinds = {(dtype, device) for _, dtype, device in stepped}
            self._buffers.keep_only(kinds)
            indices = [i for i, _, _ in stepped]
            self._plans = (
                stepped,
                make_plans(
                    [self.layers[i] for i in indices],
                    [self.layer_names[i] for i in indices],
                    [group["params"][3 * i : 3 * i + 3] for i in indices],
                ),
            )
        return self._plans[1]

    def _stacked_state(self, plan: Plan) -> tuple[torch.Tensor, list[dict], dict[str, torch.Tensor]]:
        """A plan's S and their moments, stacked (the parameters and the states hold views), and the states."""
        s = self._buffers.stacked_factors("coefficients", plan.coefficients)
        states = [self.state[p] for p in plan.coefficients]
        like = s[0]  # indexing is an operator call: once, not once per layer
        moments = [self._moments(state, like) for state in states]
        stacked = {
            key: self._buffers.stacked(
                key, [m[key] for m in moments], lambda i, view, key=key: states[i].__setitem__(key, view)
            )
            for key in moments[0]
        }
        return s, states, stacked

    def _coefficient_step(self, plan: Plan, group: dict) -> _Batch:
        """The base step on a plan's stacked S, into new tensors (nothing is written yet)."""
        s, states, stacked = self._stacked_state(plan)
        steps = [state["step"] + 1 for state in states]
        steps = (
            steps[0] if len(set(steps)) == 1 else torch.tensor(steps, dtype=s.dtype, device=s.device).view(-1, 1, 1)
        )
        grad_s = torch.stack([p.grad for p in plan.coefficients])
        s_new, moments_new = s.clone(), {key: value.clone() for key, value in stacked.items()}
        base_step(self.base_optimizer, s_new, grad_s, moments_new, steps, group)
        return _Batch(plan, [layer.rank for layer in plan.layers], s, s_new, grad_s, stacked, moments_new, steps)

    def _current(self, plan: Plan) -> _Batch:
        """A plan's layers as they are, for a truncation outside a step (no gradient, no base step)."""
        s, states, stacked = self._stacked_state(plan)
        return _Batch(plan, [layer.rank for layer in plan.layers], s, s, None, stacked, stacked, 0)

    def _augment(self, batch: _Batch, widths: list[int]) -> tuple[list[torch.Tensor], Augmented]:
        """Augment a batch's bases (U and V factors alike) by their gradients (the K- and L-gradients),
        stacked per factor shape, in one call. The S-gradient is ``U^T G_K`` (transposed ``V^T G_L``):
        the augmentation's first product."""
        plan, device = batch.plan, batch.plan.order.device
        ranks = torch.tensor(batch.ranks * 2, device=device)[plan.order]
        widths = torch.tensor(widths * 2, device=device)[plan.order]
        overlaps = torch.cat([batch.grad_s, batch.grad_s.mT])[plan.order]
        stacked = [self._buffers.stacked_factors("bases", g) for g in plan.groups]
        directions = [
            torch.stack([f.grad for f in g], out=self._buffers.scratch("directions", (len(g), *g[0].shape), g[0]))
            for g in plan.groups
        ]  # the projection is written over them
        augmented = augment_bases(
            stacked,
            directions,
            ranks,
            widths,
            out=[self._buffers.scratch("columns", d.shape, d) for d in directions],
            projections_out=directions,
            overlap=overlaps,
            rank_bound=max(batch.ranks),
        )
        return stacked, augmented

    def _step_size(
        self,
        batch: _Batch,
        projections: tuple[torch.Tensor, torch.Tensor],
        valid: tuple[torch.Tensor, torch.Tensor],
        ranks: torch.Tensor,
        group: dict,
    ) -> tuple[torch.Tensor | float, tuple | None]:
        """The step size of the new blocks (B x 1 x 1) and (stacked, new) running mean squares of the
        layers' tangent gradients ``[G_S, Ubar^T G_K, G_L^T Vbar]``."""
        if self.base_optimizer != "adamw":
            return group["lr"], None
        # The running mean square is kept with either rule: new_moments="tangent" starts new entries from it.
        old = columns_in_use(ranks, batch.s.shape[-1])
        squares, counts = [batch.grad_s.pow(2).sum((-2, -1))], [ranks**2]
        for projection, columns in zip(projections, valid):
            new = (columns & ~old).to(projection.dtype)
            block = projection * new.unsqueeze(-1) * old.unsqueeze(-2).to(projection.dtype)
            squares.append(block.pow(2).sum((-2, -1)))
            counts.append(new.sum(-1) * ranks)
        mean_square = sum(squares) / sum(counts)
        coefficients = batch.plan.coefficients
        states = [self.state[p] for p in coefficients]
        previous = self._buffers.stacked(
            "tangent_sq",
            [self._state_tensor(st, "tangent_sq", batch.s, ()) for st in states],
            lambda i, view: states[i].__setitem__("tangent_sq", view),
        )
        beta2 = group["betas"][1]
        running = torch.where(previous > 0, beta2 * previous + (1 - beta2) * mean_square, mean_square)
        if self.new_block_step == "lr":
            return group["lr"], (previous, running)
        # The larger of the running and the current mean square: a gradient surge cannot enlarge the step.
        step = group["lr"] / (torch.maximum(running, mean_square).sqrt() + group["eps"])
        return step.view(-1, 1, 1), (previous, running)

    def _augmented_svd(self, batch: _Batch, group: dict, decompose: bool = True) -> _Decomposed:
        """For a batch of layers: augmented bases and the SVD (P, sigma, Q) of the augmented
        coefficient matrices, all at the fixed size R (the layers' maximum rank). ``decompose=False`` (a
        cycle's first step) keeps the augmented S as it is: P and Q then only pick the columns both augmented
        bases can give (the old ones first, in place)."""
        device, max_rank = batch.s.device, batch.plan.layers[0].max_rank
        host_widths = [min(r, max_rank - r) for r in batch.ranks]
        stacked, augmented = self._augment(batch, host_widths)
        order = batch.plan.order
        ranks, widths = torch.tensor(batch.ranks, device=device), torch.tensor(host_widths, device=device)
        u_factor, v_factor = in_batch_order(augmented.r_factor, order)
        u_valid, v_valid = in_batch_order(augmented.valid, order)
        u_projections, v_projections = in_batch_order(augmented.projections, order)
        u_finite, v_finite = in_batch_order(augmented.finite, order)
        finite = torch.isfinite(batch.s_new).all((-2, -1)) & u_finite & v_finite
        step, tangent_sq = self._step_size(batch, (u_projections, v_projections), (u_valid, v_valid), ranks, group)
        s = u_factor @ batch.s_new @ v_factor.mT  # S in the augmented bases
        s = augmented_coefficients(s, u_projections, v_projections.mT, ranks, widths, step)
        finite = finite & torch.isfinite(s).all((-2, -1))  # also a step too large for the dtype
        s = torch.where(finite.view(-1, 1, 1), s, 0.0)  # a non-finite layer is refused after the sync
        capacity = torch.minimum(u_valid.sum(-1), v_valid.sum(-1))
        if not decompose:
            P, Q = (_first_columns(valid, capacity).to(s.dtype) for valid in (u_valid, v_valid))
            return _Decomposed(
                batch, stacked, augmented, u_factor, v_factor, P, None, Q, P.mT @ s @ Q, capacity, tangent_sq, finite
            )
        nudge = _nudge(s)  # columns an augmented basis leaves out are zero: see _nudge
        P, sigma, Q_t = torch.linalg.svd(s + nudge * matched_identity(u_valid, v_valid).to(s.dtype))
        sigma = torch.where(sigma > 2 * nudge.view(-1, 1), sigma, 0.0)
        return _Decomposed(
            batch,
            stacked,
            augmented,
            u_factor,
            v_factor,
            P,
            sigma,
            Q_t.mT,
            torch.diag_embed(sigma),
            capacity,
            tangent_sq,
            finite,
        )

    def _truncation_svd(self, batch: _Batch) -> _Decomposed:
        """The SVD of a batch's S (after the base step, if any) at its current ranks, as a cycle's truncation
        needs it: the bases are rotated by P and Q."""
        s, plan = batch.s_new, batch.plan
        ranks = torch.tensor(batch.ranks, device=s.device)
        finite = torch.isfinite(s).all((-2, -1))
        if batch.grad_s is not None:
            finite = finite & torch.isfinite(batch.grad_s).all((-2, -1))
        s = torch.where(finite.view(-1, 1, 1), s, 0.0)
        in_use = columns_in_use(ranks, s.shape[-1])
        P, sigma, Q_t = torch.linalg.svd(s + _nudge(s) * matched_identity(in_use, in_use).to(s.dtype))
        sigma = torch.where(sigma > 2 * _nudge(s).view(-1, 1), sigma, 0.0)
        stacked = [self._buffers.stacked_factors("bases", g) for g in plan.groups]
        return _Decomposed(
            batch, stacked, None, None, None, P, sigma, Q_t.mT, torch.diag_embed(sigma), ranks, None, finite
        )

    def _commit_coefficients(
        self, batch: _Batch, s: torch.Tensor, moments: dict[str, torch.Tensor], count: bool = True
    ) -> None:
        """Write a batch's new S and moments and (``count``) count the step."""
        batch.s.copy_(s)
        for key, value in moments.items():
            batch.moments[key].copy_(value)
        if count:
            for p in batch.plan.coefficients:
                self.state[p]["step"] += 1

    def _commit_adapting(self, decomposed: list[_Decomposed], new_ranks: list[int], count: bool = True) -> None:
        """Rotate and cut the factors and moments of every batch to the new ranks."""
        start = 0
        for d in decomposed:
            members, width = d.batch.plan.layers, d.P.shape[-1]
            host_ranks = new_ranks[start : start + len(members)]
            start += len(members)
            keep = columns_in_use(torch.tensor(host_ranks, device=d.P.device), width).to(d.P.dtype)
            # Rotations zero beyond the new rank (as the layers keep them).
            rotations = (torch.cat([d.P, d.Q]) * keep.repeat(2, 1).unsqueeze(-2))[d.batch.plan.order]
            if d.augmented is not None:
                d.augmented.product(rotations, out=d.stacked)  # into the layers' U and V
            else:
                for stacked, rotation in zip(d.stacked, rotations.split([len(s) for s in d.stacked])):
                    stacked.copy_(torch.bmm(stacked, rotation))
            block = keep.unsqueeze(-1) * keep.unsqueeze(-2)
            self._commit_coefficients(d.batch, d.coefficients * block, self._transported_moments(d, block), count)
            if d.tangent_sq is not None:
                stacked_sq, value = d.tangent_sq
                stacked_sq.copy_(value)
            if self.moment_transport == "reset":
                for coefficients in d.batch.plan.coefficients:
                    self.state[coefficients].clear()
            for layer, rank in zip(members, host_ranks):
                if layer.rank != rank:  # nn.Module's __setattr__ is slow enough to show here
                    layer.rank = rank

    def _transported_moments(self, d: _Decomposed, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adam moments of S carried into the new bases and cut to the new ranks (``block``): first into
        the augmented bases as S is (through the r_factors), then along the kept singular vectors."""
        moments, factored = dict(d.batch.moments_new), d.u_factor is not None
        if "exp_avg" in moments:
            first = d.u_factor @ moments["exp_avg"] @ d.v_factor.mT if factored else moments["exp_avg"]
            moments["exp_avg"] = transport_first_moment(first, d.P, d.Q) * block
        if "exp_avg_sq" in moments:
            second = d.u_factor**2 @ moments["exp_avg_sq"] @ (d.v_factor**2).mT if factored else moments["exp_avg_sq"]
            moments["exp_avg_sq"] = transport_second_moment(second, d.P, d.Q) * block
            if d.sigma is None and self.new_moments == "tangent":  # a cycle's new entries
                # v = (1 - beta2^t) q: Adam's bias-corrected second moment starts at the tangent's mean square q.
                old = columns_in_use(torch.tensor(d.batch.ranks, device=block.device), block.shape[-1]).to(block.dtype)
                start = (1 - self.param_groups[0]["betas"][1] ** d.batch.steps) * d.tangent_sq[1].view(-1, 1, 1)
                moments["exp_avg_sq"] = moments["exp_avg_sq"] + start * (block - old.unsqueeze(-1) * old.unsqueeze(-2))
        return moments


def _first_columns(valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """B x R x R selection: the first ``count`` valid columns of each basis, moved to the front in order."""
    chosen = valid & (valid.cumsum(-1) <= count.unsqueeze(-1))
    return matched_identity(chosen, columns_in_use(count, valid.shape[-1]))


def _nudge(s: torch.Tensor) -> torch.Tensor:
    """B x 1 x 1: a partial identity of this size between the columns in use, added before an SVD, makes it put
    the singular vectors of zero singular values there (they are kept when min_rank asks for more than the
    nonzero ones), never on a zero column; it is rounding-sized (10 eps of the norm of S)."""
    norm = torch.linalg.matrix_norm(s)
    norm = torch.where(torch.isfinite(norm), norm, torch.linalg.matrix_norm(s.double()).to(s.dtype))  # overflow
    return 10 * torch.finfo(s.dtype).eps * (norm + 1e-20).view(-1, 1, 1)
