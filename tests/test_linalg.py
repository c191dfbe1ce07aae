"""The pure functions of the step, tested alone."""

import torch

from geolora.linalg import (
    augment_bases,
    augmented_coefficients,
    budget_ranks,
    matched_identity,
    near_identity_rows,
    noise_floor,
    random_orthonormal,
    transport_first_moment,
    transport_second_moment,
    truncation_ranks,
)


def test_random_orthonormal_is_orthonormal():
    q = random_orthonormal(50, 7)
    assert torch.allclose(q.T @ q, torch.eye(7), atol=1e-5)


def _padded(columns: list[torch.Tensor], width: int, beyond=torch.zeros) -> torch.Tensor:
    """Stack n x r_i matrices into a B x n x width buffer, filling columns beyond r_i with ``beyond``."""
    padded = beyond(len(columns), columns[0].shape[0], width, dtype=columns[0].dtype)
    for i, c in enumerate(columns):
        padded[i, :, : c.shape[1]] = c
    return padded


def _augment(bases: list[torch.Tensor], directions: list[torch.Tensor], widths: list[int], width: int = 8):
    """Bases zero beyond their rank (as the layers keep them); directions with junk there (ignored).
    Returns the augmented bases (formed) and the factored result."""
    ranks = torch.tensor([b.shape[1] for b in bases])
    result = augment_bases(
        [_padded(bases, width)], [_padded(directions, width, torch.randn)], ranks, torch.tensor(widths)
    )
    return result.columns[0] @ result.mix, result


def _assert_orthonormal_where_valid(aug: torch.Tensor, valid: torch.Tensor, atol: float = 1e-5) -> None:
    assert torch.allclose(aug.mT @ aug, torch.diag_embed(valid.to(aug.dtype)), atol=atol)


def test_augmented_bases_are_orthonormal_and_contain_the_basis_even_for_degenerate_directions():
    u = [random_orthonormal(30, r) for r in (2, 4, 5)]
    for make in (torch.randn, torch.zeros):
        for widths in ([0, 0, 0], [1, 3, 2], [2, 4, 3]):
            aug, result = _augment(u, [make(30, r) for r in (2, 4, 5)], widths)
            assert aug.shape == (3, 30, 8)
            expected_valid = [r + (w if make is torch.randn else 0) for r, w in zip((2, 4, 5), widths)]
            assert result.valid.sum(-1).tolist() == expected_valid
            _assert_orthonormal_where_valid(aug, result.valid)
            for i, (basis, r) in enumerate(zip(u, (2, 4, 5))):
                r_factor = result.r_factor
                assert torch.allclose(aug[i, :, :r] @ r_factor[i, :r, :r], basis, atol=1e-6)
                assert torch.allclose(r_factor[i, :r, :r], torch.eye(r), atol=1e-5)
                assert r_factor[i, r:].abs().sum() == 0 and r_factor[i, :, r:].abs().sum() == 0
    inside = u[1] @ torch.randn(4, 4)  # directions in the span of the basis: nothing new to add
    aug, result = _augment([u[1]], [inside], [4])
    assert result.valid.sum() == 4
    _assert_orthonormal_where_valid(aug, result.valid)


def test_augmented_basis_spans_badly_scaled_directions_in_float32():
    """Gradient columns of very different sizes, one mostly along another: orthonormal, still spanned."""
    g = torch.Generator().manual_seed(3)
    u = random_orthonormal(200, 4, generator=g)
    directions = torch.randn(200, 4, generator=g) * torch.tensor([1e3, 1.0, 1e-4, 1e-8])
    directions[:, 1] += 1e2 * directions[:, 0] / 1e3  # 99% along column 0
    aug, result = _augment([u], [directions], [4])
    projected = directions - u @ (u.T @ directions)
    above = torch.linalg.svdvals(projected.double()) > noise_floor(torch.float32) * directions.double().norm()
    assert result.valid.sum() == 4 + above.sum() == 6  # the 1e-4 and 1e-8 columns are below rounding here
    _assert_orthonormal_where_valid(aug, result.valid)
    projected = directions - u @ (u.T @ directions)
    new = aug[0, :, 4:6]
    assert torch.allclose(new @ (new.T @ projected), projected, atol=1e-5 * projected.norm(dim=0).max())
    scale = directions.norm(dim=0).max()
    assert torch.allclose(result.projections[0, :, :4], aug[0].T @ directions, atol=1e-4 * scale)  # float32 Gram


def test_rank_deficient_directions_give_exactly_their_rank_of_new_columns():
    """A gradient of rank 2 in 4 columns adds 2 columns, whatever rounding leaves in the other two."""
    for dtype in (torch.float32, torch.float64):
        for seed in range(20):
            g = torch.Generator().manual_seed(seed)
            u = random_orthonormal(40, 4, generator=g, dtype=dtype)
            directions = torch.randn(40, 2, generator=g, dtype=dtype) @ torch.randn(2, 4, generator=g, dtype=dtype)
            directions = directions + u @ torch.randn(4, 4, generator=g, dtype=dtype) * 10  # mostly in the basis
            aug, result = _augment([u], [directions], [4])
            assert result.valid.sum() == 6
            _assert_orthonormal_where_valid(aug, result.valid, atol=1e-5 if dtype == torch.float32 else 1e-12)
            projected = directions - u @ (u.T @ directions)
            new = aug[0, :, 4:6]
            assert torch.allclose(new @ (new.T @ projected), projected, atol=1e-5 * directions.norm())


def test_matched_identity_pairs_valid_rows_and_columns_in_order():
    rows = torch.tensor([[True, False, True, True]])
    cols = torch.tensor([[False, True, True, False]])
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 0, 1] = expected[0, 2, 2] = True
    assert torch.equal(matched_identity(rows, cols), expected)


def test_augmented_basis_reorthonormalises_a_drifted_basis():
    u = random_orthonormal(30, 4) * (1 + 1e-4)
    aug, result = _augment([u], [torch.randn(30, 4)], [2])
    _assert_orthonormal_where_valid(aug, result.valid, atol=1e-6)
    assert torch.allclose(aug[0, :, :4] @ result.r_factor[0, :4, :4], u, atol=1e-6)


def test_augmented_basis_spans_projected_directions():
    u = random_orthonormal(30, 4)
    directions = torch.randn(30, 4)
    aug, result = _augment([u], [directions], [4])
    new = aug[0, :, 4:8]
    projected = directions - u @ (u.T @ directions)
    assert torch.allclose(new @ (new.T @ projected), projected, atol=1e-5)
    assert torch.allclose(result.projections[0, :, :4], aug[0].T @ directions, atol=1e-5)


def test_augmented_basis_keeps_dominant_directions_when_narrow():
    u = random_orthonormal(30, 3)
    strong = _augment([u], [torch.randn(30, 1)], [1])[0][0, :, 3:4]  # a unit direction orthogonal to u
    directions = torch.cat([1e-3 * torch.randn(30, 2), 100 * strong], dim=1)
    new = _augment([u], [directions], [1])[0][0, :, 3:4]
    assert abs(float(new[:, 0] @ strong[:, 0])) > 0.999


def test_augmented_coefficients_blocks():
    r, a, width = 3, 2, 6
    s = torch.zeros(1, width, width)
    s[0, :r, :r] = torch.randn(r, r)
    ut_gk, gl_t_v = torch.randn(1, width, width), torch.randn(1, width, width)
    m = augmented_coefficients(s, ut_gk, gl_t_v, torch.tensor([r]), torch.tensor([a]), 0.5)[0]
    assert torch.equal(m[:r, :r], s[0, :r, :r])
    assert torch.allclose(m[r : r + a, :r], -0.5 * ut_gk[0, r : r + a, :r])  # -h Ubar^T G_K
    assert torch.allclose(m[:r, r : r + a], -0.5 * gl_t_v[0, :r, r : r + a])  # -h G_L^T Vbar
    assert torch.equal(m[r:, r:], torch.zeros(width - r, width - r))
    assert not m[r + a :].any() and not m[:, r + a :].any()  # padding beyond the augmented rank


def _truncation_rank(sigma: torch.Tensor, tau: float, min_rank: int, max_rank: int) -> int:
    return int(truncation_ranks(sigma.unsqueeze(0), tau, min_rank, max_rank)[0])


def test_truncation_rank_relative_rule():
    sigma = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1])
    norm = sigma.norm()
    for tau in (0.0, 0.01, 0.05, 0.1, 0.5, 0.9):
        r = _truncation_rank(sigma, tau, min_rank=1, max_rank=5)
        assert sigma[r:].norm() <= tau * norm + 1e-12
        if r > 1:  # smallest such rank
            assert sigma[r - 1 :].norm() > tau * norm
    assert _truncation_rank(sigma, 0.9, min_rank=3, max_rank=5) == 3
    assert _truncation_rank(sigma, 0.0, min_rank=1, max_rank=2) == 2
    assert _truncation_rank(torch.zeros(4), 0.1, min_rank=2, max_rank=4) == 2
    batch = torch.stack([sigma, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])])
    assert truncation_ranks(batch, 0.05, 1, 5).tolist() == [_truncation_rank(sigma, 0.05, 1, 5), 4]


def test_budget_ranks_keeps_largest_values_across_layers():
    sigmas = [torch.tensor([9.0, 1.0, 0.5]), torch.tensor([8.0, 7.0, 6.0]), torch.tensor([0.1, 0.05])]
    assert budget_ranks(sigmas, 4, [1, 1, 1], [3, 3, 2]) == [1, 2, 1]  # min ranks first, then 7.0
    assert budget_ranks(sigmas, 6, [1, 1, 1], [3, 3, 2]) == [2, 3, 1]
    assert budget_ranks(sigmas, 100, [1, 1, 1], [2, 2, 2]) == [2, 2, 2]  # capped by max ranks
    assert budget_ranks(sigmas, 2, [1, 1, 1], [3, 3, 2]) == [1, 1, 1]  # min ranks win over the budget


def test_first_moment_transport_preserves_weight_space_moment_under_rotation():
    u, v = random_orthonormal(20, 5), random_orthonormal(15, 5)
    m = torch.randn(5, 5)
    p, q = random_orthonormal(5, 5), random_orthonormal(5, 5)
    moved = transport_first_moment(m, p, q)
    assert torch.allclose((u @ p) @ moved @ (v @ q).T, u @ m @ v.T, atol=1e-5)


def test_second_moment_transport_keeps_total_and_sign():
    v = torch.rand(5, 5)
    p, q = random_orthonormal(5, 5), random_orthonormal(5, 5)
    moved = transport_second_moment(v, p, q)
    assert (moved >= 0).all()
    assert torch.allclose(moved.sum(), v.sum(), rtol=1e-5)


def test_near_identity_rows_select_well_conditioned_sets():
    """Rows kept by the Gershgorin test span a Gram matrix with eigenvalues in (0.5, 1.5); a column
    that nearly repeats another (or is far from unit length) is not kept, nor is one outside ``columns``."""
    g = torch.Generator().manual_seed(0)
    vectors = torch.linalg.qr(torch.randn(200, 64, 8, dtype=torch.float64, generator=g))[0]
    vectors = vectors + 0.15 * torch.rand(200, 1, 1, dtype=torch.float64, generator=g) * torch.randn(
        200, 64, 8, dtype=torch.float64, generator=g
    )
    gram = vectors.mT @ vectors
    columns = torch.rand(200, 8, generator=g) < 0.9
    kept = near_identity_rows(gram, columns)
    assert not (kept & ~columns).any()
    assert 0 < kept.sum() < columns.sum()  # the random perturbations make some rows fail
    for matrix, rows in zip(gram, kept):
        eigenvalues = torch.linalg.eigvalsh(matrix[rows][:, rows])
        assert eigenvalues.numel() == 0 or (eigenvalues.min() > 0.5 and eigenvalues.max() < 1.5)
    basis = torch.eye(6, 4, dtype=torch.float64)
    basis[:, 3] = basis[:, 2] + 1e-3 * basis[:, 0]  # column 3 nearly repeats column 2
    twin = near_identity_rows((basis.mT @ basis).unsqueeze(0), torch.ones(1, 4, dtype=torch.bool))[0]
    assert twin.tolist() == [True, True, False, False]
    long = near_identity_rows(
        torch.diag_embed(torch.tensor([[1.0, 1.7, 1.0]], dtype=torch.float64)), torch.ones(1, 3, dtype=torch.bool)
    )
    assert long.tolist() == [[True, False, True]]
