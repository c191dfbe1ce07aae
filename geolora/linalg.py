"""Pure linear algebra of the GeoLoRA step: augmentation, truncation and moment transport.

Every function works on plain tensors so it can be tested alone against the paper's statements.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def random_orthonormal(
    rows: int,
    cols: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A rows x cols matrix with orthonormal columns, Haar-distributed (QR of a Gaussian)."""
    gauss = torch.randn(rows, cols, dtype=dtype, device=device, generator=generator)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
    return q


def columns_in_use(ranks: torch.Tensor, width: int) -> torch.Tensor:
    """B x width mask: True where a column index is below the layer's rank."""
    return torch.arange(width, device=ranks.device) < ranks.unsqueeze(-1)


def noise_floor(dtype: torch.dtype) -> float:
    """Relative size below which a projected gradient direction is rounding, not a direction: 30 eps of
    the data type, and no finer than a float64 Gram matrix resolves (``sqrt(1000 eps_64)``)."""
    return max(30 * torch.finfo(dtype).eps, (1e3 * torch.finfo(torch.float64).eps) ** 0.5)


def near_identity_rows(gram: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """B x R bool: the rows j among ``columns`` (B x R bool) whose Gershgorin disc over those columns
    lies in (0.5, 1.5): ``|g_jj - 1| + sum_{k != j} |g_jk| < 0.5``. The Gram matrix of any set of such
    columns has all eigenvalues in (0.5, 1.5): they are a well-conditioned, nearly orthonormal set."""
    mask = columns.to(gram.dtype)
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    radius = (gram.abs() * mask.unsqueeze(-2)).sum(-1) - diagonal.abs()
    return columns & ((diagonal - 1).abs() + radius < 0.5)


def masked_cholesky(gram: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lower, inverse_t)`` with ``lower lower^T = gram`` on the ``valid`` rows/columns (B x R bool)
    and ``inverse_t = lower^-T`` there; both zero in the other rows/columns."""
    mask = valid.to(gram.dtype)
    block = mask.unsqueeze(-1) * mask.unsqueeze(-2)
    lower = torch.linalg.cholesky_ex(gram * block + torch.diag_embed(1 - mask)).L
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
    return lower * block, inverse.mT * block


class Augmented(NamedTuple):
    """Augmented bases of stacks of layers in factored form: for each group g of same-sized bases,
    ``augmented_g = columns[g] @ mix[items of g]`` (B_g x n_g x R). The n-sized ``columns`` are formed
    once; the small ``mix`` is folded into whatever multiplies them (``product``), so the orthonormal
    basis itself never costs a pass over n-sized data. Small fields cover all groups' items in order."""

    columns: list[torch.Tensor]
    mix: torch.Tensor  # B x R x R, upper triangular
    r_factor: torch.Tensor  # basis[:, :r] = augmented[:, :r] @ r_factor[:r, :r]; zero outside r x r
    projections: torch.Tensor  # augmented^T directions (B x R x R; directions' columns beyond r: zero)
    valid: torch.Tensor  # B x R bool: columns of the augmented basis in use; the others are zero
    finite: torch.Tensor  # B bool: the item's directions and basis^T directions were all finite

    def product(self, rotation: torch.Tensor, out: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """``augmented_g @ rotation[items of g]`` for each group (``rotation`` B x R x R)."""
        small = (self.mix @ rotation).split([c.shape[0] for c in self.columns])
        return [torch.bmm(c, m, out=o) for c, m, o in zip(self.columns, small, out or [None] * len(self.columns))]


def augment_bases(
    bases: list[torch.Tensor],
    directions: list[torch.Tensor],
    ranks: torch.Tensor,
    widths: torch.Tensor,
    out: list[torch.Tensor] | None = None,
    projections_out: list[torch.Tensor] | None = None,
    overlap: torch.Tensor | None = None,
    rank_bound: int | None = None,
) -> Augmented:
    """Extend each basis by the strongest ``widths[i]`` directions of ``(I - B B^T) directions``, for
    stacks of layers of different ranks held in fixed-size buffers.

    ``bases[g]`` and ``directions[g]`` are B_g x n_g x R (groups may differ in n, not in R); ``ranks``,
    ``widths`` and the results run over the groups' items in order. Item i uses the first ``ranks[i]``
    columns of its basis and directions and needs ``ranks[i] + widths[i] <= R <= n``. Columns of a
    basis beyond the rank must be zero (the layers keep them so); those of the directions are ignored.
    The augmented basis has orthonormal ``valid`` columns: the first r span the basis (``r_factor`` is
    I up to the rounding the basis has accumulated, so every step re-orthonormalises it for free); the
    next ones hold the projected directions, strongest first: the eigenvectors of their Gram matrix
    ``P^T P`` (float64), i.e. the left singular vectors of ``P``. Directions whose singular value is below
    ``noise_floor`` times the norm of the item's directions are rounding (a rank-deficient gradient
    leaves such): they get no column, so what the basis misses of ``P`` is below that relative size.

    The n-sized data is read by seven batched matmuls per group: ``B^T D``; the projection
    ``P = D - B B^T D`` (explicit, so a gradient lying mostly in the basis loses no precision to
    cancellation) and its Gram matrix; the columns ``C = B + P T``, T from the eigenvectors; their Gram
    matrix, whose Cholesky factor gives ``mix`` (the second pass of CholeskyQR2, which removes the first
    pass's rounding); ``C^T P`` for the coefficients; later the product with the rotation. The small
    linear algebra runs once for all groups. ``out[g]`` receives group g's columns and ``projections_out[g]``
    its projection (it may be ``directions[g]`` itself): callers that step every iteration reuse their buffers.
    ``overlap`` (B x R x R, ``B^T D`` of every item) spares the first matmul where the caller already has it:
    GeoLoRA's S-gradient is ``U^T G_K``, and its transpose ``V^T G_L``. Non-finite directions make
    ``finite`` false for their item; its other results are then meaningless but finite-sized work.
    ``rank_bound`` (a host int, at least every rank) limits the float64 Gram matrix of the projections and its
    eigendecomposition to the columns that can be in use.
    """
    dtype, width = bases[0].dtype, bases[0].shape[-1]
    read = width if rank_bound is None else rank_bound  # columns of the directions that can be in use
    in_use = columns_in_use(ranks, width)
    old = in_use.double()
    old_block = old.unsqueeze(-1) * old.unsqueeze(-2)
    sizes = [basis.shape[0] for basis in bases]
    overlaps = [b.mT @ d for b, d in zip(bases, directions)] if overlap is None else overlap.split(sizes)  # B^T D
    projections_of, grams = [], []
    for basis, direction, part, o in zip(bases, directions, overlaps, projections_out or [None] * len(bases)):
        projection = torch.baddbmm(direction, basis, part, alpha=-1, out=o)
        projections_of.append(projection)
        wide = projection[..., :read].double()
        grams.append(wide.mT @ wide)  # P^T P, exact for float32 data
    overlap = torch.cat(overlaps).double() * old_block
    projected_gram = torch.cat(grams) * old_block[..., :read, :read]
    square = torch.diagonal(projected_gram, dim1=-2, dim2=-1).sum(-1) + overlap.pow(2).sum((-2, -1))  # |D|^2
    finite = torch.isfinite(square)
    projected_gram = torch.where(finite.view(-1, 1, 1), projected_gram, 0.0)
    strength, vectors = torch.linalg.eigh(projected_gram)  # ascending
    strength, vectors = strength.flip(-1), vectors.flip(-1) * old[..., :read].unsqueeze(-1)
    slot = torch.arange(width, device=ranks.device)
    strong = (strength > noise_floor(dtype) ** 2 * torch.where(finite, square, 0.0).unsqueeze(-1)) & (
        slot[:read] < widths.unsqueeze(-1)
    )
    # place[k, r + k] = 1 for the strong directions k: direction k becomes augmented column r + k.
    place = (
        (slot[:read].view(1, -1, 1) + ranks.view(-1, 1, 1) == slot.view(1, 1, -1)) & strong.unsqueeze(-1)
    ).double()
    new = place.sum(-2) > 0
    on_projection = vectors * torch.where(strong, strength, 1.0).rsqrt().unsqueeze(-2) @ place
    on_projection = torch.nn.functional.pad(on_projection, (0, 0, 0, width - read))  # unread rows: zero
    columns = [
        torch.baddbmm(basis, projection, t, out=o)
        for basis, projection, t, o in zip(
            bases, projections_of, on_projection.to(dtype).split(sizes), out or [None] * len(bases)
        )
    ]
    # The new columns are orthonormal up to the rounding of forming them, below 0.1 for any direction
    # above the noise floor. A column whose Gershgorin disc leaves (0.5, 1.5) can only come from
    # non-finite or overflowing data: it is left out, which keeps the second factorisation defined.
    gram = torch.cat([c.mT @ c for c in columns]).double()
    sound = near_identity_rows(gram, in_use | new)
    # An old column far from orthonormal can only come from new columns gone wrong: keep the old alone.
    valid = in_use | (new & sound & (sound | ~in_use).all(-1, keepdim=True))
    lower, mix = masked_cholesky(gram, valid)
    # columns^T D = columns^T P + columns^T B B^T D, from the columns as formed: a weak direction's column
    # carries rounding of relative size eps / strength, which must not reach its coefficient.
    formed = torch.cat([c.mT @ p for c, p in zip(columns, projections_of)]).double()
    projections = mix.mT @ (formed + gram @ overlap)
    return Augmented(
        columns,
        mix.to(dtype),
        (lower.mT * old_block).to(dtype),
        projections.to(dtype),
        valid,
        finite & torch.isfinite(gram).all((-2, -1)),
    )


def matched_identity(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """B x R x R partial isometry pairing the k-th True of ``rows`` with the k-th True of ``cols``."""
    rank_rows, rank_cols = rows.cumsum(-1), cols.cumsum(-1)
    return rows.unsqueeze(-1) & cols.unsqueeze(-2) & (rank_rows.unsqueeze(-1) == rank_cols.unsqueeze(-2))


def augmented_coefficients(
    s_new: torch.Tensor,
    basis_t_grad_k: torch.Tensor,
    grad_l_t_basis: torch.Tensor,
    ranks: torch.Tensor,
    widths: torch.Tensor,
    step: float | torch.Tensor,
) -> torch.Tensor:
    """The coefficient matrix of the augmented bases ``[U Ubar], [V Vbar]`` (B x R x R, padded).

    Blocks: ``[[S', -h G_L^T Vbar], [-h Ubar^T G_K, 0]]``: the K- and L-steps of the parallel
    rank-adaptive integrator written in the augmented bases (``Ubar^T U = 0``, ``Vbar^T V = 0``), with
    step size ``h`` (a scalar or one per layer, B x 1 x 1). Inputs are in the padded layout of
    ``augment_bases``: ``s_new`` is zero outside r x r, ``basis_t_grad_k = augmented_U^T G_K`` and
    ``grad_l_t_basis = G_L^T augmented_V``; rows/columns r..r+a hold the new directions and everything
    beyond r + a is masked to zero.
    """
    width = s_new.shape[-1]
    old = columns_in_use(ranks, width)
    new = columns_in_use(ranks + widths, width) & ~old
    lower_left = (new.unsqueeze(-1) & old.unsqueeze(-2)).to(s_new.dtype)
    return s_new - step * (basis_t_grad_k * lower_left + grad_l_t_basis * lower_left.mT)


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

    Every layer keeps its ``min_rank``; the rest of the budget goes to the largest remaining nonzero
    singular values over all layers (ties to the earlier layer), each layer capped at its ``max_rank``.
    The total is exactly ``budget`` unless the minimum ranks alone exceed it, the caps cannot hold it or
    fewer nonzero singular values are left (zero ones add nothing to the adapter but parameters).
    """
    floors = [min(lo, s.numel()) for lo, s in zip(min_ranks, sigmas)]
    caps = [max(min(hi, s.numel()), f) for hi, s, f in zip(max_ranks, sigmas, floors)]
    values = torch.cat([s.detach().double().cpu()[f:c] for s, f, c in zip(sigmas, floors, caps)])
    layer_of = torch.cat([torch.full((c - f,), i) for i, (f, c) in enumerate(zip(floors, caps))])
    kept = torch.argsort(values, descending=True, stable=True)[: max(budget - sum(floors), 0)]
    kept = kept[values[kept] > 0]
    extra = torch.bincount(layer_of[kept], minlength=len(sigmas)).tolist()
    return [f + e for f, e in zip(floors, extra)]


def transport_first_moment(moment: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Rotate an r x r first moment into the new basis: ``P[:r]^T moment Q[:r]``.

    ``P`` / ``Q`` ((r+a) x r1) are the kept singular vectors of the augmented coefficients.
    The old moment has no component along the augmentation directions, so only their first r rows act.
    This keeps ``U m V^T`` (the moment seen in weight space) wherever the new basis can represent it.
    """
    r = moment.shape[-1]
    return P[..., :r, :].mT @ moment @ Q[..., :r, :]


def transport_second_moment(moment: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Carry an elementwise second moment to the new basis: ``(P[:r]**2)^T moment (Q[:r]**2)``.

    A rotated gradient ``g' = P^T g Q`` has ``E[g'_ij^2] = sum_kl P_ki^2 Q_lj^2 E[g_kl^2]`` when the
    old entries are uncorrelated; this is that diagonal approximation. It preserves the total and
    stays non-negative.
    """
    r = moment.shape[-1]
    return (P[..., :r, :] ** 2).mT @ moment @ (Q[..., :r, :] ** 2)
