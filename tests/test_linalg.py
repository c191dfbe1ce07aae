"""The pure functions of the step, tested alone."""
import torch

from geolora.linalg import (augment_basis, augmented_coefficients, budget_ranks, random_orthonormal,
                            transport_first_moment, transport_second_moment, truncation_rank)


def test_random_orthonormal_is_orthonormal():
    q = random_orthonormal(50, 7)
    assert torch.allclose(q.T @ q, torch.eye(7), atol=1e-5)


def test_augmented_basis_is_orthonormal_and_contains_the_basis_even_for_degenerate_directions():
    u = random_orthonormal(30, 4)
    for directions in (torch.randn(30, 4), torch.zeros(30, 4), u @ torch.randn(4, 4)):
        for width in (0, 1, 3, 4):
            aug, r_factor = augment_basis(u, directions, width)
            assert aug.shape == (30, 4 + width)
            assert torch.allclose(aug.T @ aug, torch.eye(4 + width), atol=1e-5)
            assert torch.allclose(aug[:, :4] @ r_factor, u, atol=1e-6)
            assert torch.allclose(r_factor, torch.eye(4), atol=1e-5)


def test_augmented_basis_reorthonormalises_a_drifted_basis():
    u = random_orthonormal(30, 4) * (1 + 1e-4)
    aug, r_factor = augment_basis(u, torch.randn(30, 4), 2)
    assert torch.allclose(aug.T @ aug, torch.eye(6), atol=1e-6)
    assert torch.allclose(aug[:, :4] @ r_factor, u, atol=1e-6)


def test_augmented_basis_spans_projected_directions():
    u = random_orthonormal(30, 4)
    directions = torch.randn(30, 4)
    new = augment_basis(u, directions, 4)[0][:, 4:]
    projected = directions - u @ (u.T @ directions)
    assert torch.allclose(new @ (new.T @ projected), projected, atol=1e-5)


def test_augmented_basis_keeps_dominant_directions_when_narrow():
    u = random_orthonormal(30, 3)
    strong = augment_basis(u, torch.randn(30, 1), 1)[0][:, 3:]  # a unit direction orthogonal to u
    directions = torch.cat([100 * strong, 1e-3 * torch.randn(30, 2)], dim=1)
    new = augment_basis(u, directions, 1)[0][:, 3:]
    assert abs(float(new[:, 0] @ strong[:, 0])) > 0.999


def test_augmented_coefficients_blocks():
    s, gk, gl = torch.randn(3, 3), torch.randn(2, 3), torch.randn(3, 2)
    m = augmented_coefficients(s, gk, gl, lr=0.5)
    assert torch.equal(m[:3, :3], s)
    assert torch.allclose(m[3:, :3], -0.5 * gk)
    assert torch.allclose(m[:3, 3:], -0.5 * gl)
    assert torch.equal(m[3:, 3:], torch.zeros(2, 2))


def test_truncation_rank_relative_rule():
    sigma = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1])
    norm = sigma.norm()
    for tau in (0.0, 0.01, 0.05, 0.1, 0.5, 0.9):
        r = truncation_rank(sigma, tau, min_rank=1, max_rank=5)
        assert sigma[r:].norm() <= tau * norm + 1e-12
        if r > 1:  # smallest such rank
            assert sigma[r - 1:].norm() > tau * norm
    assert truncation_rank(sigma, 0.9, min_rank=3, max_rank=5) == 3
    assert truncation_rank(sigma, 0.0, min_rank=1, max_rank=2) == 2
    assert truncation_rank(torch.zeros(4), 0.1, min_rank=2, max_rank=4) == 2


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
