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


def columns_in_use(ranks: torch.Tensor, width: int) -> torch.Tensor:
    """B x width mask: True where a column index is below the layer's rank."""
    return torch.arange(width, device=ranks.device) < ranks.unsqueeze(-1)


def augment_bases(bases: torch.Tensor, directions: torch.Tensor, ranks: torch.Tensor, widths: torch.Tensor,
                  narrow: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Extend each basis by ``widths[i]`` directions of ``(I - B B^T) directions``, for a stack of
    same-shaped layers of different ranks held in fixed-size buffers.

    ``bases`` and ``directions`` are B x n x R; layer i uses its first ``ranks[i]`` columns of each and
    needs ``ranks[i] + widths[i] <= R <= n``. Columns of ``bases`` beyond the rank must be zero (the
    layers keep them so); those of ``directions`` are ignored. Returns ``(augmented, signs, r_factor)``:
    ``augmented`` (B x n x R) has orthonormal columns, each to be read times its sign (B x R, +-1: the
    QR fixes no sign, and flipping n-sized columns would cost a pass over them; callers fold the signs
    into their small matrices). With ``A = augmented * signs``: the first r columns of A span the basis,
    ``basis[:, :r] = A[:, :r] @ r_factor[:r, :r]`` (``r_factor`` is I up to the rounding the basis has
    accumulated, so every step re-orthonormalises it for free, and zero outside r x r); the next
    ``widths[i]`` columns span the strongest projected directions; the remaining columns are an
    orthonormal completion that callers mask out.

    One Householder QR of ``[basis, directions, 0]`` per layer, all layers in one batched call: the new
    columns are orthonormal and orthogonal to the basis even when the projected directions are rank
    deficient or zero. The directions are moved into place (and, when fewer new columns than directions
    fit, first ordered by strength: eigenvectors of the projected Gram matrix) by one small R x R
    matrix, so the n-sized data is read only by a few batched matmuls and the QR. ``narrow`` says whether
    any ``widths[i] < ranks[i]``; callers that know it on the host pass it, which spares a device sync.
    """
    width = bases.shape[-1]
    in_use = columns_in_use(ranks, width).to(bases.dtype).unsqueeze(-1)  # B x R x 1
    slot = torch.arange(width, device=bases.device)
    # place[j, r + j] = 1 for j < a: direction j becomes column r + j of the matrix to factor.
    place = ((slot.view(1, -1, 1) + ranks.view(-1, 1, 1) == slot.view(1, 1, -1))
             & (slot.view(1, -1, 1) < widths.view(-1, 1, 1))).to(bases.dtype)
    if bool((widths < ranks).any()) if narrow is None else narrow:
        overlap = bases.mT @ directions
        gram = (directions.mT @ directions - overlap.mT @ overlap) * in_use * in_use.mT
        place = torch.linalg.eigh(gram)[1].flip(-1) * in_use @ place  # strongest projected directions first
    q, upper = torch.linalg.qr(torch.baddbmm(bases, directions, place))
    signs = torch.where(torch.diagonal(upper, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(bases.dtype)
    return q, signs, signs.unsqueeze(-1) * upper * in_use * in_use.mT


def augmented_coefficients(s_new: torch.Tensor, basis_t_grad_k: torch.Tensor, grad_l_t_basis: torch.Tensor,
                           ranks: torch.Tensor, widths: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
    """The coefficient matrix of the augmented bases ``[U Ubar], [V Vbar]`` (B x R x R, padded).

    Blocks: ``[[S', -lr G_L^T Vbar], [-lr Ubar^T G_K, 0]]``: the K- and L-steps of the parallel
    rank-adaptive integrator written in the augmented bases (``Ubar^T U = 0``, ``Vbar^T V = 0``).
    Inputs are in the padded layout of ``augment_bases``: ``s_new`` is zero outside r x r,
    ``basis_t_grad_k = augmented_U^T G_K`` and ``grad_l_t_basis = G_L^T augmented_V``; rows/columns
    r..r+a hold the new directions and everything beyond r + a is masked to zero. ``lr`` may hold one
    step size per layer (shape B x 1 x 1).
    """
    width = s_new.shape[-1]
    old = columns_in_use(ranks, width)
    new = columns_in_use(ranks + widths, width) & ~old
    lower_left = (new.unsqueeze(-1) & old.unsqueeze(-2)).to(s_new.dtype)
    return s_new - lr * (basis_t_grad_k * lower_left + grad_l_t_basis * lower_left.mT)


def truncation_ranks(sigmas: torch.Tensor, tau: float, min_rank: int, max_rank: int) -> torch.Tensor:
    """Per row, the smallest r with ``||sigma[r:]||_2 <= tau ||sigma||_2`` (rows sorted descending),
    clamped to ``[min_rank, max_rank]`` and to the row length. Batched; stays on the device."""
    squares = sigmas.double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(squares, [-1]), -1), [-1]).sqrt()  # tail[k] = ||sigma[k:]||
    ranks = (tail > tau * tail[..., :1]).sum(-1)  # tail is non-increasing: count = first index at or below
    length = sigmas.shape[-1]
    return ranks.clamp(max=min(max_rank, length)).clamp(min=min(min_rank, length))


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
