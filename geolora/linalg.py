"""Pure linear algebra of the GeoLoRA step: augmentation, truncation and moment transport.

Every function works on plain tensors so it can be tested alone against the paper's statements.
"""
from __future__ import annotations

import torch


def random_orthonormal(rows: int, cols: int, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """A rows x cols matrix with orthonormal columns, Haar-distributed (QR of a Gaussian)."""
    gauss = torch.randn(rows, cols, dtype=dtype, device=device, generator=generator)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
    return q


def augment_basis(basis: torch.Tensor, directions: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend ``basis`` (n x r, orthonormal) by ``width`` directions of ``(I - B B^T) directions``.

    Returns ``(augmented, r_factor)``: ``augmented`` (n x (r + width)) has orthonormal columns, its
    first r span ``basis`` with ``basis = augmented[:, :r] @ r_factor`` (``r_factor`` is I up to the
    rounding ``basis`` has accumulated, so every step re-orthonormalises the basis for free).

    Both come from one Householder QR of ``[basis, directions]``: the trailing columns are orthonormal
    and orthogonal to ``basis`` even when the projected directions are rank deficient or zero. When
    fewer than r new columns are wanted, the top singular directions of the projected ``directions``
    are kept. Leading batch dimensions are allowed (one QR for a stack of same-shaped layers).
    """
    r = basis.shape[-1]
    q, upper = torch.linalg.qr(torch.cat([basis, directions], dim=-1) if width > 0 else basis)
    diagonal = torch.diagonal(upper, dim1=-2, dim2=-1)[..., :r]
    signs = torch.where(diagonal < 0, -1.0, 1.0).to(basis.dtype)
    kept, r_factor = q[..., :r] * signs.unsqueeze(-2), upper[..., :r, :r] * signs.unsqueeze(-1)
    new = q[..., r:]
    if 0 < width < new.shape[-1]:
        left = torch.linalg.svd(new.mT @ directions, full_matrices=False)[0]
        new = new @ left[..., :width]
    return torch.cat([kept, new[..., :width]], dim=-1), r_factor


def augmented_coefficients(s_new: torch.Tensor, ubar_t_gk: torch.Tensor, gl_t_vbar: torch.Tensor,
                           lr: float | torch.Tensor) -> torch.Tensor:
    """The (r+a) x (r+a) coefficient matrix of the augmented basis ``[U Ubar], [V Vbar]``.

    Blocks: ``[[S', -lr G_L^T Vbar], [-lr Ubar^T G_K, 0]]``: the K- and L-steps of the parallel
    rank-adaptive integrator written in the augmented bases (``Ubar^T U = 0``, ``Vbar^T V = 0``).
    Leading batch dimensions are allowed; ``lr`` may then hold one step size per matrix (shape B x 1 x 1).
    """
    a = ubar_t_gk.shape[-2]
    top = torch.cat([s_new, -lr * gl_t_vbar], dim=-1)
    bottom = torch.cat([-lr * ubar_t_gk, s_new.new_zeros(*s_new.shape[:-2], a, a)], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def truncation_rank(sigma: torch.Tensor, tau: float, min_rank: int, max_rank: int) -> int:
    """Smallest r with ``||sigma[r:]||_2 <= tau ||sigma||_2`` (sigma sorted descending), clamped.

    The clamp is to ``[min_rank, min(max_rank, len(sigma))]``.
    """
    sigma = sigma.detach().double().cpu()
    n = sigma.numel()
    # tail[k] = ||sigma[k:]||, computed from the back so no cancellation happens.
    tail = torch.flip(torch.cumsum(torch.flip(sigma ** 2, [0]), 0), [0]).sqrt()
    tail = torch.cat([tail, tail.new_zeros(1)])
    threshold = tau * tail[0]
    rank = int(torch.nonzero(tail <= threshold)[0].item())
    return max(min(rank, max_rank, n), min(min_rank, n))


def budget_ranks(sigmas: list[torch.Tensor], budget: int, min_ranks: list[int], max_ranks: list[int]) -> list[int]:
    """Per-layer ranks for a global budget of singular values (each list sorted descending).

    Every layer keeps its ``min_rank``; the rest of the budget goes to the largest remaining singular
    values over all layers (ties to the earlier layer), each layer capped at its ``max_rank``. The total
    is exactly ``budget`` unless the minimum ranks alone exceed it or the caps cannot hold it.
    """
    floors = [min(lo, s.numel()) for lo, s in zip(min_ranks, sigmas)]
    caps = [max(min(hi, s.numel()), f) for hi, s, f in zip(max_ranks, sigmas, floors)]
    values = torch.cat([s.detach().double().cpu()[f:c] for s, f, c in zip(sigmas, floors, caps)])
    layer_of = torch.cat([torch.full((c - f,), i) for i, (f, c) in enumerate(zip(floors, caps))])
    kept = torch.argsort(values, descending=True, stable=True)[:max(budget - sum(floors), 0)]
    extra = torch.bincount(layer_of[kept], minlength=len(sigmas)).tolist()
    return [f + e for f, e in zip(floors, extra)]


def transport_first_moment(moment: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Rotate an r x r first moment into the new basis: ``left[:r]^T moment right[:r]``.

    ``left`` / ``right`` ((r+a) x r1) are the kept singular vectors of the augmented coefficients.
    The old moment has no component along the augmentation directions, so only their first r rows act.
    This keeps ``U m V^T`` (the moment seen in weight space) wherever the new basis can represent it.
    """
    r = moment.shape[-1]
    return left[..., :r, :].mT @ moment @ right[..., :r, :]


def transport_second_moment(moment: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Carry an elementwise second moment to the new basis: ``(left[:r]**2)^T moment (right[:r]**2)``.

    A rotated gradient ``g' = P^T g Q`` has ``E[g'_ij^2] = sum_kl P_ki^2 Q_lj^2 E[g_kl^2]`` when the
    old entries are uncorrelated; this is that diagonal approximation. It preserves the total and
    stays non-negative.
    """
    r = moment.shape[-1]
    return (left[..., :r, :] ** 2).mT @ moment @ (right[..., :r, :] ** 2)
