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

from .layer import GeoLoRALinear, GradientSlot
from .linalg import (Augmented, augment_bases, augmented_coefficients, budget_ranks, columns_in_use,
                     matched_identity, transport_first_moment, transport_second_moment, truncation_ranks)
from .model import adapters, config_of

BASE_OPTIMIZERS = ("adamw", "sgd")
MOMENT_TRANSPORTS = ("rotate", "reset")


class _Plan(NamedTuple):
    """How the layers of one maximum rank R (and dtype, device) are stacked, whatever their shapes:
    fixed while the set of stepped layers is, so it is worked out once rather than every step."""

    layers: list[GeoLoRALinear]
    coefficients: list[nn.Parameter]  # each layer's S
    groups: list[list[nn.Parameter]]  # the layers' U and V factors grouped by shape
    slots: list[list[GradientSlot]]  # where the backward writes their gradients, grouped alike
    order: list[int]  # item i of the augmentation is factor order[i] of [U_1..U_B, V_1..V_B]
    order_tensor: torch.Tensor


class _Batch(NamedTuple):
    """One plan's layers in one step."""

    plan: _Plan
    ranks: list[int]  # before this step
    s: torch.Tensor  # B x R x R, after the base step
    grad_s: torch.Tensor  # B x R x R: U^T G_K, and transposed V^T G_L
    moments: dict[str, torch.Tensor]  # the base optimizer's S moments, stacked (the states hold views)
    steps: int | torch.Tensor  # the base step count, per layer (B x 1 x 1) where they differ


class _Bases(NamedTuple):
    """A batch's U and V factors, stacked per shape (the plan's groups), all augmented in one call."""

    stacked: list[torch.Tensor]  # each group stacked: the factors are views of these
    order: torch.Tensor  # item i of the augmentation is factor order[i] of [U_1..U_B, V_1..V_B]
    augmented: Augmented

    def in_batch_order(self, field: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A small per-item field of the augmentation, for the batch's U and for its V factors."""
        values = getattr(self.augmented, field)
        return torch.empty_like(values).index_copy_(0, self.order, values).chunk(2)


class _Decomposed(NamedTuple):
    """One batch after the augmented SVD, before truncation."""

    batch: _Batch
    bases: _Bases
    u_factor: torch.Tensor  # old basis = augmented[:, :r] @ factor, B x R x R
    v_factor: torch.Tensor
    left: torch.Tensor  # singular vectors of the augmented coefficients, B x R x R
    sigma: torch.Tensor  # B x R, zero beyond what the augmented bases can hold
    right: torch.Tensor
    capacity: torch.Tensor  # B: the most columns both augmented bases can give


def _buffer_key(role: str, item_shape: tuple, like: torch.Tensor) -> tuple:
    """Buffers are kept one per role and item shape (and dtype, device): none pile up when the number
    of stacked items changes."""
    return role, tuple(item_shape), like.dtype, like.device


def _are_views(tensors: list[torch.Tensor], stacked: torch.Tensor) -> bool:
    """Whether each ``tensors[i]`` lies where ``stacked[i]`` does (same shape assumed)."""
    start, stride = stacked.data_ptr(), stacked.stride(0) * stacked.element_size()
    return stacked.shape[0] == len(tensors) and all(t is not None and t.data_ptr() == start + i * stride
                                                    for i, t in enumerate(tensors))


class GeoLoRAOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` over the adapters and every other trainable parameter of ``model``.

    Group 0 holds the adapter factors (U, S, V of each layer, in that order) and runs the geometric
    step; group 1, if any, holds the remaining trainable parameters (``modules_to_save``) and runs the
    plain base optimizer. LR schedulers, gradient clipping and ``GradScaler`` work as usual.

    Layers of one maximum rank are stepped as one batch whatever their shapes and ranks (batched
    linear algebra), so the cost per step hardly grows with the number of layers. From the first step
    on, the factors of each shape are views of one stacked tensor (as are the S moments in the state),
    so batched results land in the parameters without copies; moving or casting the model breaks the
    views and the next step restacks. The backward writes ``U.grad`` and ``V.grad`` into stacked
    buffers this optimizer lends the layers (``GradientSlot``), so the step reads them without a copy;
    the projected gradients and new columns live in two more buffers kept between steps (``_scratch``):
    about twice the adapters' size in extra memory. ``step()`` never changes the gradients.
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
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._plans: tuple[tuple[int, ...], list[_Plan]] = ((), [])  # for the last set of stepped layers

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
                        state = self.state[param]
                        moments = self._moments(state, param)
                        state["step"] += 1
                        self._base_step(param, param.grad, moments, state["step"], group)
        return loss

    def _moments(self, state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base optimizer's moment tensors in ``state``, created (zero) on first use."""
        keys = ("exp_avg", "exp_avg_sq") if self.base_optimizer == "adamw" else ("exp_avg",)
        if not state:
            state["step"] = 0
            for key in keys:
                state[key] = torch.zeros_like(like)
        return {key: state[key] for key in keys}

    def _stacked_moments(self, coefficients: list[nn.Parameter], like: torch.Tensor) -> tuple[dict, list[int]]:
        """The moments of a batch's S factors as B x R x R tensors their states are views of (updating
        them costs one op per batch, not one per layer); and each layer's step."""
        states = [self.state[p] for p in coefficients]
        template = like[0]
        moments = [self._moments(state, template) for state in states]
        stacked = {key: self._stacked(key, [m[key] for m in moments],
                                      lambda i, view, key=key: states[i].__setitem__(key, view))
                   for key in moments[0]}
        for state in states:
            state["step"] += 1
        return stacked, [state["step"] for state in states]

    def _base_step(self, param: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor],
                   steps: int | torch.Tensor, group: dict) -> None:
        """AdamW / SGD in place on one tensor (or on a stack of same-shaped ones, ``steps`` then per
        item, shaped to broadcast). Coefficient matrices are stepped at their full fixed size: outside
        the rank x rank block their gradient, moments and values are zero, so the step leaves them zero."""
        lr, wd = group["lr"], group["weight_decay"]
        exp_avg = moments["exp_avg"]
        if self.base_optimizer == "adamw" and isinstance(steps, int):  # one fused pass over the data
            beta1, beta2 = group["betas"]
            step = torch.tensor(float(steps), device=param.device)
            torch._fused_adamw_([param], [grad], [exp_avg], [moments["exp_avg_sq"]], [], [step], lr=lr, beta1=beta1,
                                beta2=beta2, weight_decay=wd, eps=group["eps"], amsgrad=False, maximize=False)
        elif self.base_optimizer == "adamw":
            beta1, beta2 = group["betas"]
            exp_avg_sq = moments["exp_avg_sq"]
            if wd:
                param.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq / (1 - beta2 ** steps)).sqrt_().add_(group["eps"])
            param.sub_(exp_avg / denom * (lr / (1 - beta1 ** steps)))
        else:
            if wd:
                grad = grad + wd * param
            if group["momentum"]:
                grad = exp_avg.mul_(group["momentum"]).add_(grad)
            param.add_(grad, alpha=-lr)

    def _adapter_step(self, group: dict) -> None:
        adapt = group["step"] % (self.coefficient_steps + 1) == 0
        group["step"] += 1
        coefficients = group["params"][1::3]
        stepped = tuple(i for i, (layer, s) in enumerate(zip(self.layers, coefficients))
                        if s.grad is not None and not layer.merged)
        if self._plans[0] != stepped:
            self._plans = (stepped, self._make_plans([self.layers[i] for i in stepped],
                                                     [group["params"][3 * i:3 * i + 3] for i in stepped]))
        batches = []
        for plan in self._plans[1]:
            s = self._stacked_factors("coefficients", plan.coefficients)
            moments, steps = self._stacked_moments(plan.coefficients, s)
            steps = steps[0] if len(set(steps)) == 1 else torch.tensor(steps, dtype=s.dtype, device=s.device).view(-1, 1, 1)
            grad_s = torch.stack([p.grad for p in plan.coefficients])
            self._base_step(s, grad_s, moments, steps, group)
            if adapt:
                batches.append(_Batch(plan, [l.rank for l in plan.layers], s, grad_s, moments, steps))
        if batches:
            self._truncate([self._augmented_svd(batch, group) for batch in batches])
        for layer in self.layers:  # their gradients are consumed: the next backward may write the slots
            for slot in layer.gradient_slots:
                slot.task = None

    @staticmethod
    def _make_plans(layers: list[GeoLoRALinear], factors: list[list[nn.Parameter]]) -> list[_Plan]:
        """Layers of one maximum rank are stepped together whatever their shapes and ranks, in the
        fixed-size (padded) layout: one batched base step and one batched SVD; their U and V factors
        are stacked per shape and augmented in one call. ``factors`` holds each layer's (U, S, V)."""
        by_rank: dict[tuple, list[int]] = {}
        for i, (layer, (_, s, _)) in enumerate(zip(layers, factors)):
            by_rank.setdefault((layer.max_rank, s.dtype, s.device), []).append(i)
        plans = []
        for members in by_rank.values():
            bases = [factors[i][0] for i in members] + [factors[i][2] for i in members]
            slots = [layers[i].gradient_slots[side] for side in (0, 1) for i in members]
            by_shape: dict[torch.Size, list[int]] = {}
            for position, basis in enumerate(bases):
                by_shape.setdefault(basis.shape, []).append(position)
            order = [p for positions in by_shape.values() for p in positions]
            plans.append(_Plan([layers[i] for i in members], [factors[i][1] for i in members],
                               [[bases[p] for p in positions] for positions in by_shape.values()],
                               [[slots[p] for p in positions] for positions in by_shape.values()], order,
                               torch.tensor(order, device=bases[0].device)))
        return plans

    def _augmentation_gains(self, batch: _Batch, ranks: torch.Tensor, group: dict) -> torch.Tensor | float:
        """Scale of the new directions relative to ``lr``: 1 for SGD; for AdamW, Adam's normalisation
        ``1 / (sqrt(mean v_hat) + eps)`` of each layer's S-gradients (mean over the rank x rank block),
        so augmented directions enter on the same scale as the Adam step on S (a per-layer scalar:
        basis-independent)."""
        if self.base_optimizer != "adamw" or not self.precondition_augmentation:
            return 1.0
        second = batch.moments["exp_avg_sq"].sum(dim=(-2, -1)).view(-1, 1, 1) / ranks.view(-1, 1, 1) ** 2
        return 1.0 / ((second / (1 - group["betas"][1] ** batch.steps)).sqrt() + group["eps"])

    def _scratch(self, role: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A buffer kept across steps: on CPU a fresh allocation of the stacked n-sized factors each
        step costs page faults that rival the arithmetic done with them."""
        key = _buffer_key(role, shape[1:], like)
        if key not in self._buffers or self._buffers[key].shape != shape:
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]

    def _stacked(self, role: str, tensors: list[torch.Tensor], rebind: Callable[[int, torch.Tensor], None]
                 ) -> torch.Tensor:
        """The stacked tensor that ``tensors`` are views of, so batched work reads and writes them in
        place. Made wherever they are not its views (the first step, after the model was moved or
        cast, or when the stepped layers change), then ``rebind(i, view)`` makes item i a view."""
        key = _buffer_key(role, tensors[0].shape, tensors[0])
        stacked = self._buffers.get(key)
        if stacked is None or not _are_views(tensors, stacked):
            stacked = self._buffers[key] = torch.stack(tensors)
            for i, view in enumerate(stacked.unbind()):
                rebind(i, view)
        return stacked

    def _stacked_factors(self, role: str, factors: list[nn.Parameter]) -> torch.Tensor:
        """Factors as views of one stacked tensor: batched results land in the parameters."""
        return self._stacked(role, factors, lambda i, view: setattr(factors[i], "data", view))

    def _directions(self, factors: list[nn.Parameter], slots: list[GradientSlot], shape: tuple
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked gradients of same-shaped factors, and where to write their projection. Read in
        place where the backward wrote them into the slots this optimizer lends (the projection then
        goes to a buffer of its own: ``.grad`` stays untouched); otherwise copied into that buffer,
        which the projection overwrites, and the slots are lent for the next backward."""
        grads = [f.grad for f in factors]
        own = self._scratch("projections", shape, factors[0])
        lent = self._scratch("gradients", shape, factors[0])
        if _are_views(grads, lent):
            return lent, own
        if not _are_views([slot.tensor for slot in slots], lent):
            for slot, view in zip(slots, lent.unbind()):
                slot.tensor = view
        return torch.stack(grads, out=own), own

    def _augment(self, plan: _Plan, ranks: list[int], widths: list[int], overlaps: torch.Tensor) -> _Bases:
        """Augment a batch's bases (U and V factors alike) by their gradients (the K- and L-gradients),
        stacked per factor shape, in one call. ``ranks``, ``widths`` and ``overlaps`` (each factor's
        ``basis^T gradient``) run over the factors [U_1..U_B, V_1..V_B]."""
        order, device = plan.order, plan.order_tensor.device
        shapes = [(len(g), *g[0].shape) for g in plan.groups]
        stacked = [self._stacked_factors("bases", g) for g in plan.groups]
        directions, projections = zip(*[self._directions(g, slots, shape) for g, slots, shape
                                        in zip(plan.groups, plan.slots, shapes)])
        narrow = [i for i, p in enumerate(order) if widths[p] < ranks[p]]
        augmented = augment_bases(stacked, directions, torch.tensor([ranks[p] for p in order], device=device),
                                  torch.tensor([widths[p] for p in order], device=device),
                                  torch.tensor(narrow, dtype=torch.long, device=device),
                                  out=[self._scratch("columns", shape, g[0]) for g, shape in zip(plan.groups, shapes)],
                                  projections_out=projections, overlap=overlaps[plan.order_tensor])
        return _Bases(stacked, plan.order_tensor, augmented)

    def _augmented_svd(self, batch: _Batch, group: dict) -> _Decomposed:
        """For a batch of layers: augmented bases and the SVD (P, sigma, Q) of the augmented
        coefficient matrices, all at the fixed size R (the layers' maximum rank)."""
        device, max_rank = batch.s.device, batch.plan.layers[0].max_rank
        host_widths = [min(r, max_rank - r) for r in batch.ranks]
        # The layers' S-gradient is U^T G_K (and transposed V^T G_L): the augmentation's first product.
        bases = self._augment(batch.plan, batch.ranks * 2, host_widths * 2, torch.cat([batch.grad_s, batch.grad_s.mT]))
        ranks, widths = torch.tensor(batch.ranks, device=device), torch.tensor(host_widths, device=device)
        u_factor, v_factor = bases.in_batch_order("r_factor")
        s = u_factor @ batch.s @ v_factor.mT  # S in the augmented bases
        step = group["lr"] * self._augmentation_gains(batch, ranks.to(s.dtype), group)
        u_projections, v_projections = bases.in_batch_order("projections")
        s = augmented_coefficients(s, u_projections, v_projections.mT, ranks, widths, step)
        # Columns an augmented basis leaves out are zero. A partial identity between the columns in use,
        # at rounding size, makes the SVD put the singular vectors of zero singular values there (they
        # are kept when min_rank asks for more than the nonzero ones), never on a zero column.
        u_valid, v_valid = bases.in_batch_order("valid")
        nudge = 10 * torch.finfo(s.dtype).eps * (torch.linalg.matrix_norm(s) + 1e-20).view(-1, 1, 1)
        left, sigma, right_t = torch.linalg.svd(s + nudge * matched_identity(u_valid, v_valid).to(s.dtype))
        sigma = torch.where(sigma > 2 * nudge.view(-1, 1), sigma, 0.0)
        capacity = torch.minimum(u_valid.sum(-1), v_valid.sum(-1))
        return _Decomposed(batch, bases, u_factor, v_factor, left, sigma, right_t.mT, capacity)

    def _truncate(self, decomposed: list[_Decomposed]) -> None:
        """New ranks for every layer (one host sync), then rotate and cut the factors and moments."""
        if self.rank_budget is not None:
            layers = [layer for d in decomposed for layer in d.batch.plan.layers]
            # Per layer: its singular values, then its capacity; batches may differ in R.
            rows = [torch.cat([d.sigma, d.capacity.unsqueeze(-1).to(d.sigma.dtype)], -1) for d in decomposed]
            flat = torch.cat([row.flatten() for row in rows]).double().cpu()  # the one host sync
            rows = [row for chunk, d in zip(flat.split([row.numel() for row in rows]), decomposed)
                    for row in chunk.view(len(d.batch.plan.layers), -1)]
            ranks = [r for d in decomposed for r in d.batch.ranks]
            lengths = [min(2 * r, layer.max_rank, int(row[-1])) for r, layer, row in zip(ranks, layers, rows)]
            new_ranks = budget_ranks([row[:n] for row, n in zip(rows, lengths)], self.rank_budget,
                                     [l.min_rank for l in layers], [l.max_rank for l in layers])
        else:  # one config per model: tau and the rank limits are those of the batch's first layer
            new_ranks = torch.cat([torch.minimum(truncation_ranks(d.sigma, d.batch.plan.layers[0].tau,
                                                                  d.batch.plan.layers[0].min_rank,
                                                                  d.batch.plan.layers[0].max_rank), d.capacity)
                                   for d in decomposed]).tolist()  # the sync
        start = 0
        for d in decomposed:
            members, sigma = d.batch.plan.layers, d.sigma
            host_ranks = new_ranks[start:start + len(members)]
            start += len(members)
            keep = columns_in_use(torch.tensor(host_ranks, device=sigma.device), sigma.shape[-1]).to(sigma.dtype)
            # Rotations zero beyond the new rank (as the layers keep them).
            rotations = (torch.cat([d.left, d.right]) * keep.repeat(2, 1).unsqueeze(-2))[d.bases.order]
            d.bases.augmented.product(rotations, out=d.bases.stacked)  # into the layers' U and V
            d.batch.s.copy_(torch.diag_embed(sigma * keep))
            self._transport_moments(d, keep.unsqueeze(-1) * keep.unsqueeze(-2))
            for layer, rank in zip(members, host_ranks):
                if layer.rank != rank:  # nn.Module's __setattr__ is slow enough to show here
                    layer.rank = rank

    def _transport_moments(self, d: _Decomposed, block: torch.Tensor) -> None:
        """Adam moments of S carried into the new bases and cut to the new ranks (``block``): first into
        the augmented bases as S is (through the r_factors), then along the kept singular vectors."""
        if self.moment_transport == "reset":
            for coefficients in d.batch.plan.coefficients:
                self.state[coefficients].clear()
            return
        moments = d.batch.moments
        if "exp_avg" in moments:
            first = d.u_factor @ moments["exp_avg"] @ d.v_factor.mT
            moments["exp_avg"].copy_(transport_first_moment(first, d.left, d.right) * block)
        if "exp_avg_sq" in moments:
            second = d.u_factor ** 2 @ moments["exp_avg_sq"] @ (d.v_factor ** 2).mT
            moments["exp_avg_sq"].copy_(transport_second_moment(second, d.left, d.right) * block)
