"""The GeoLoRA adapter around one ``nn.Linear``: ``y = base(x) + alpha * x V S^T U^T``.

U (out x R) and V (in x R) hold orthonormal columns and S (R x R) the coefficients, in fixed-size
buffers of the layer's maximum rank R; only the leading ``rank`` columns are in use, so rank changes
never reallocate and optimizer state keeps its shape.

The backward pass stores in ``U.grad`` and ``V.grad`` the K- and L-gradients the integrator needs,
``dL/dK = grad_W V`` and ``dL/dL = grad_W^T U`` (with ``K = U S``, ``L = V S^T``), not ``dL/dU`` and
``dL/dV``. They cost the same matmuls as the usual factor gradients and are exact from ``S = 0`` on.
Keeping them in ``.grad`` lets gradient clipping, ``GradScaler`` and data-parallel all-reduce treat
them like any other gradient. ``S.grad`` is the ordinary ``dL/dS = U^T grad_W V``.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .config import GeoLoRAConfig
from .linalg import random_orthonormal


class _LowRankProduct(torch.autograd.Function):
    """``alpha * x V S^T U^T`` at rank r; backward returns (dL/dx, dL/dK, dL/dS, dL/dL).

    Takes the full fixed-size factors and slices inside, so the graph holds one node per adapter
    (no slicing nodes) and the factor gradients come back at their full, fixed shapes. Every token-sized
    product has its thin factor as a contiguous r x n matrix on the right (``F.linear``) or forms the thin
    result transposed (``r x n = (tokens x r)^T (tokens x n)``): CPU BLAS runs the other layouts of these
    products (``x @ V[:, :r]``, ``g^T @ xV``) two to five times slower.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, rank: int, alpha: float
    ) -> torch.Tensor:
        xv = F.linear(x, V[:, :rank].T.contiguous())
        ctx.save_for_backward(x, U, S, V, xv)
        ctx.rank, ctx.alpha = rank, alpha
        return F.linear(xv, U[:, :rank] @ (alpha * S[:rank, :rank]))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, U, S, V, xv = ctx.saved_tensors
        rank, alpha = ctx.rank, ctx.alpha
        dtype = xv.dtype  # the compute dtype of the forward (bf16/fp16 under autocast)
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        if alpha != 1.0:
            g = g * alpha
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        xv2 = xv.reshape(-1, xv.shape[-1])
        u_t, s, v = U[:, :rank].T.contiguous(), S[:rank, :rank].to(dtype), V[:, :rank].to(dtype)
        gu = F.linear(g, u_t.to(dtype))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.linear(gu, v @ s.T).reshape(x.shape).to(x.dtype)
        grad_k_t = (xv2.T @ g).to(U.dtype)
        grad_s = torch.zeros_like(S)
        grad_s[:rank, :rank] = u_t @ grad_k_t.T
        grad_u = grad_v = None  # the factor gradients at the factors' full fixed shape
        if ctx.needs_input_grad[1]:
            grad_u = torch.zeros_like(U)
            grad_u[:, :rank] = grad_k_t.T
        if ctx.needs_input_grad[3]:
            grad_v = torch.zeros_like(V)
            grad_v[:, :rank] = (gu.T @ x2).T
        return grad_x, grad_u, grad_s, grad_v, None, None


class BasisParameter(nn.Parameter):
    """U or V of a GeoLoRA layer: an orthonormal basis whose ``.grad`` is a K- or L-gradient. The type survives
    ``deepcopy``, ``.to()`` and ``load_state_dict``, so other optimizers can be refused wherever the model goes."""


def _refuse_other_optimizers(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: U.grad and V.grad hold the K- and L-gradients, not dL/dU and dL/dV,
    so any optimizer but GeoLoRAOptimizer (whose class says ``steps_geolora_factors``) would silently train something
    else. Checked once per optimizer."""
    verdict = _checked.get(optimizer)
    if verdict is None:
        factors = any(isinstance(p, BasisParameter) for g in optimizer.param_groups for p in g["params"])
        verdict = _checked[optimizer] = not factors or getattr(optimizer, "steps_geolora_factors", False)
    if not verdict:
        raise RuntimeError(
            f"{type(optimizer).__name__} holds GeoLoRA factors U / V, whose .grad are the integrator's "
            "K- and L-gradients, not dL/dU: step them with geolora.GeoLoRAOptimizer(model, ...) (with "
            "transformers.Trainer: optimizers=(GeoLoRAOptimizer(model, lr=...), None))"
        )


_checked: "weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]" = weakref.WeakKeyDictionary()
register_optimizer_step_pre_hook(_refuse_other_optimizers)


HALF = (torch.float16, torch.bfloat16)


class GeoLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a rank-adaptive adapter ``alpha * U S V^T``.

    S starts at zero, so at injection the layer computes exactly what the base layer computes.
    """

    def __init__(self, base: nn.Linear, config: GeoLoRAConfig) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"GeoLoRA adapts nn.Linear layers only, got {type(base).__name__}")
        self.base = base
        out_features, in_features = base.out_features, base.in_features
        self.max_rank = min(config.max_rank, out_features, in_features)
        self.min_rank = min(config.min_rank, self.max_rank)
        self.tau = config.tau
        self.alpha = config.alpha
        self.rank = min(config.init_rank, self.max_rank)
        self.merged = False
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device = base.weight.device
        # Factors stay in fp32 (fp64 for an fp64 base) whatever the base precision, also when the model is cast
        # to fp16 / bf16 later (``_apply``): the bases must stay orthonormal over many steps and the small S
        # updates must not round away. The adapter computes in the input's precision (autocast).
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        u = torch.zeros(out_features, self.max_rank, device=device, dtype=dtype)
        v = torch.zeros(in_features, self.max_rank, device=device, dtype=dtype)
        u[:, : self.rank] = random_orthonormal(out_features, self.rank, device=device, dtype=dtype)
        v[:, : self.rank] = random_orthonormal(in_features, self.rank, device=device, dtype=dtype)
        self.U = BasisParameter(u)
        self.S = nn.Parameter(torch.zeros(self.max_rank, self.max_rank, device=device, dtype=dtype))
        self.V = BasisParameter(v)

    # Factors in use at the current rank.
    @property
    def u(self) -> torch.Tensor:
        return self.U[:, : self.rank]

    @property
    def s(self) -> torch.Tensor:
        return self.S[: self.rank, : self.rank]

    @property
    def v(self) -> torch.Tensor:
        return self.V[:, : self.rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.rank == 0:
            return out
        x = self.dropout(x)
        context = contextlib.nullcontext()
        if x.dtype in HALF and not torch.is_autocast_enabled(x.device.type):  # a half-precision model
            context = torch.autocast(x.device.type, dtype=x.dtype)
        elif not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.U.dtype)
        with context:
            delta = _LowRankProduct.apply(x, self.U, self.S, self.V, self.rank, self.alpha)
        return out + delta.to(out.dtype)

    def _apply(self, fn, recurse=True):
        """``.to()`` / ``.half()`` / ``.cuda()`` as for any module, except that a cast to fp16 or bf16 leaves the
        factors (and their gradients) in float32, as peft's ``autocast_adapter_dtype`` keeps adapters."""
        super()._apply(fn, recurse)
        for factor in (self.U, self.S, self.V):
            if factor.dtype in HALF:
                factor.data = factor.data.float()
                if factor.grad is not None:
                    factor.grad = factor.grad.float()
        return self

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense (out x in) weight: ``alpha * U S V^T``."""
        return self.alpha * (self.u @ self.s @ self.v.T)

    def set_factors(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
        """Install new factors of rank ``s.shape[0]`` into the fixed-size buffers."""
        rank = s.shape[0]
        if not self.min_rank <= rank <= self.max_rank and rank != 0:
            raise ValueError(f"rank {rank} outside [{self.min_rank}, {self.max_rank}]")
        with torch.no_grad():  # columns beyond the rank stay zero: the optimizer relies on it
            for buffer, value in ((self.U, u), (self.V, v)):
                buffer.zero_()
                buffer[:, :rank].copy_(value)
            self.S.zero_()
            self.S[:rank, :rank].copy_(s)
        self.rank = rank

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    # The current rank and merge flag travel with the module's state_dict.
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.rank, int(self.merged)])

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Runs after the factors are loaded: also clears their columns beyond the rank, which the
        optimizer assumes zero (a state dict from elsewhere may hold stale ones)."""
        self.rank, merged = (int(x) for x in state.tolist())
        self.merged = bool(merged)
        with torch.no_grad():
            self.U[:, self.rank :] = 0
            self.V[:, self.rank :] = 0

    def extra_repr(self) -> str:
        return f"rank={self.rank}, max_rank={self.max_rank}, tau={self.tau}, alpha={self.alpha}"
