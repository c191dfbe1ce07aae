"""The paper's theory as properties of GeoLoRAOptimizer (arXiv 2410.18720, Sections 4-5)."""

import copy

import pytest
import torch
from conftest import adapted_linear, least_squares, mse
from torch import nn

import geolora
from geolora.linalg import random_orthonormal, truncation_ranks


def _tangent_projection(u: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """P(W) Z = UU^T Z + Z VV^T - UU^T Z VV^T, the projection onto the tangent space at W = U S V^T."""
    pu, pv = u @ u.T, v @ v.T
    return pu @ z + z @ pv - pu @ z @ pv


def _dense_gradient(model, x, y) -> torch.Tensor:
    """dL/d(Delta W) computed densely, where the adapter adds alpha * Delta W."""
    layer = model[0]
    delta = (layer.u @ layer.s @ layer.v.T).detach().requires_grad_(True)
    loss = 0.5 * ((x @ (layer.base.weight + layer.alpha * delta).T - y) ** 2).sum(-1).mean()
    (grad,) = torch.autograd.grad(loss, delta)
    return grad


def _set_random_factors(layer, rank: int, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    n_out, n_in = layer.base.out_features, layer.base.in_features
    dtype = layer.U.dtype
    layer.set_factors(
        random_orthonormal(n_out, rank, dtype=dtype, generator=g),
        torch.randn(rank, rank, generator=g, dtype=dtype),
        random_orthonormal(n_in, rank, dtype=dtype, generator=g),
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_untruncated_sgd_step_is_projected_gradient_step(dtype, tol, alpha):
    x, y = least_squares()
    x, y = x.to(dtype), y.to(dtype)
    model = adapted_linear(dtype=dtype, init_rank=3, max_rank=8, tau=0.0, alpha=alpha)
    layer = model[0]
    _set_random_factors(layer, 3)
    before = (layer.u @ layer.s @ layer.v.T).detach().clone()
    expected = before - 0.1 * _tangent_projection(layer.u.detach(), layer.v.detach(), _dense_gradient(model, x, y))
    opt = geolora.GeoLoRAOptimizer(model, lr=0.1, base_optimizer="sgd")
    mse(model, x, y).backward()
    opt.step()
    after = layer.u @ layer.s @ layer.v.T
    assert layer.rank == 6
    assert (after - expected).abs().max() < tol * max(1.0, expected.abs().max())


def test_first_step_from_zero_coefficients_follows_true_gradients():
    """The official code takes G_K = G_U S^-1 with a stale S^-1 (identity while S = 0); ours is exact."""
    x, y = least_squares()
    model = adapted_linear(dtype=torch.float64, init_rank=3, max_rank=8, tau=0.0)
    x, y = x.double(), y.double()
    layer = model[0]
    assert torch.count_nonzero(layer.s) == 0
    u0, v0 = layer.u.detach().clone(), layer.v.detach().clone()
    grad = _dense_gradient(model, x, y)
    opt = geolora.GeoLoRAOptimizer(model, lr=0.1, base_optimizer="sgd")
    mse(model, x, y).backward()
    assert torch.allclose(layer.U.grad[:, :3], grad @ v0, atol=1e-10)  # G_K = grad_W V
    assert torch.allclose(layer.V.grad[:, :3], grad.T @ u0, atol=1e-10)  # G_L = grad_W^T U
    opt.step()
    after = layer.u @ layer.s @ layer.v.T
    assert torch.allclose(after, -0.1 * _tangent_projection(u0, v0, grad), atol=1e-10)
    assert ((torch.eye(32, dtype=torch.float64) - u0 @ u0.T) @ after).norm() > 1e-3  # left the old span


@pytest.mark.slow  # hundreds of steps: make test-all
def test_bases_stay_orthonormal_over_hundreds_of_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 8))
    geolora.inject(
        model, geolora.GeoLoRAConfig(target_modules=["0", "2"], init_rank=2, max_rank=12, min_rank=1, tau=0.1)
    )
    opt = geolora.GeoLoRAOptimizer(model, lr=3e-2, weight_decay=0.01)
    x, y = torch.randn(128, 24), torch.randn(128, 8)
    for _ in range(300):
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        for _, layer in geolora.adapters(model):
            eye = torch.eye(layer.rank)
            assert (layer.u.T @ layer.u - eye).abs().max() <= 1e-5
            assert (layer.v.T @ layer.v - eye).abs().max() <= 1e-5


def test_truncation_error_is_bounded_by_tau():
    x, y = least_squares()
    tau = 0.2
    model = adapted_linear(init_rank=2, max_rank=16, min_rank=2, tau=tau)
    opt = geolora.GeoLoRAOptimizer(model, lr=0.05, base_optimizer="sgd")
    seen_ranks = set()
    for _ in range(30):
        mse(model, x, y).backward()
        twin = copy.deepcopy(model)
        for param, twin_param in zip(model.parameters(), twin.parameters()):
            if param.grad is not None:
                twin_param.grad = param.grad.clone()
        twin[0].tau = 0.0
        twin_opt = geolora.GeoLoRAOptimizer(twin, lr=0.05, base_optimizer="sgd")
        twin_opt.load_state_dict(opt.state_dict())
        opt.step()
        twin_opt.step()
        opt.zero_grad()
        untruncated = twin[0].delta_weight()
        truncated = model[0].delta_weight()
        assert (truncated - untruncated).norm() <= tau * untruncated.norm() + 1e-5
        assert 2 <= model[0].rank <= 16
        seen_ranks.add(model[0].rank)
    assert len(seen_ranks) > 1  # truncation really acted


def test_loss_decreases_every_step_for_small_lr():
    x, y = least_squares()
    model = adapted_linear(init_rank=2, max_rank=16, tau=0.01)
    opt = geolora.GeoLoRAOptimizer(model, lr=0.02, base_optimizer="sgd")
    previous = float("inf")
    for _ in range(100):
        loss = mse(model, x, y)
        assert loss.item() < previous
        previous = loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.slow  # hundreds of steps per case: make test-all
@pytest.mark.parametrize("base_optimizer,lr,steps", [("sgd", 0.3, 300), ("adamw", 0.02, 400)])
@pytest.mark.parametrize("init_rank", [2, 8, 16])
def test_rank_found_does_not_depend_on_initial_rank(base_optimizer, lr, steps, init_rank):
    x, y = least_squares(rank=4)
    model = adapted_linear(init_rank=init_rank, max_rank=20, tau=0.05)
    opt = geolora.GeoLoRAOptimizer(model, lr=lr, base_optimizer=base_optimizer)
    initial = mse(model, x, y).item()
    for _ in range(steps):
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert abs(model[0].rank - 4) <= 1
    assert mse(model, x, y).item() < 0.01 * initial


def test_each_step_at_most_doubles_the_rank():
    x, y = least_squares(rank=12)
    model = adapted_linear(init_rank=1, max_rank=20, tau=0.0)
    opt = geolora.GeoLoRAOptimizer(model, lr=0.1, base_optimizer="sgd")
    history = [1]
    for _ in range(6):
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        history.append(model[0].rank)
    assert all(b <= min(2 * a, 20) for a, b in zip(history, history[1:]))
    assert history[-1] > 4


def test_truncation_keeps_the_function_continuous():
    """The official code rescales by alpha / r at each truncation; ours only drops the tail."""
    x, _ = least_squares()
    model = adapted_linear(init_rank=6, max_rank=6, min_rank=1, tau=0.01, alpha=3.0)
    layer = model[0]
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([5.0, 3.0, 2.0, 1e-4, 0.0, 0.0])
    layer.set_factors(
        random_orthonormal(32, 6, generator=g), torch.diag(sigma), random_orthonormal(32, 6, generator=g)
    )
    before = model(x).detach()
    opt = geolora.GeoLoRAOptimizer(model, lr=0.0)
    model(x).sum().backward()
    opt.step()
    assert layer.rank == 3
    tail = 3.0 * sigma[3:].norm()  # alpha * ||dropped singular values||
    assert model[0].delta_weight().norm().item() == pytest.approx(3.0 * sigma[:3].norm().item(), rel=1e-5)
    assert (model(x) - before).norm(dim=-1).max() <= tail * x.norm(dim=-1).max() + 1e-4


def test_a_cycle_trains_the_augmented_rank_then_truncates():
    """c = 3: the cycle's first step augments (rank 3 -> 6, no truncation), the next three move only S at the
    augmented rank, and after the last S is decomposed and truncated by the tau rule (bases rotated)."""
    x, y = least_squares()
    model = adapted_linear(init_rank=3, max_rank=12, tau=0.3, coefficient_steps=3)
    layer = model[0]
    opt = geolora.GeoLoRAOptimizer(model, lr=0.05)
    changed, ranks, diagonal, expected = [], [], [], []
    for _ in range(9):
        u_before = layer.U.detach().clone()
        mse(model, x, y).backward()
        s_before = layer.s.detach().clone()
        opt.step()
        opt.zero_grad()
        changed.append(not torch.equal(u_before, layer.U))
        ranks.append(layer.rank)
        diagonal.append(bool(torch.equal(layer.s, torch.diag(torch.diagonal(layer.s)))))
        sigma = torch.linalg.svdvals(s_before)  # the tau rule's rank of the S the last step started from
        expected.append(int(truncation_ranks(sigma.unsqueeze(0), 0.3, layer.min_rank, layer.max_rank)[0]))
    assert changed == [True, False, False, True, True, False, False, True, True]
    assert ranks[:3] == [6, 6, 6] and ranks[3] < 6 and ranks[4] == min(2 * ranks[3], 12)
    assert diagonal[3] and diagonal[7] and not any(diagonal[1:3])
    # S moved one more step before the SVD, so the rule's rank of the S before it is a close check, not exact.
    assert abs(ranks[3] - expected[3]) <= 1


def test_global_rank_budget_caps_total_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    geolora.inject(
        model,
        geolora.GeoLoRAConfig(
            target_modules=["0", "2", "4"], init_rank=4, max_rank=8, min_rank=1, tau=0.0, rank_budget=6
        ),
    )
    opt = geolora.GeoLoRAOptimizer(model, lr=0.05)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(5):
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        assert sum(geolora.ranks(model).values()) == 6


def _adam_state(opt, layer):
    return opt.state[layer.S]


def test_adam_first_moment_is_rotated_with_the_basis():
    """With no rank change the moment seen in weight space, U m V^T, is kept through the rotation."""
    x, y = least_squares()
    # r = R = min_rank: no augmentation, no rank change, a pure rotation (the first Adam step
    # -lr sign(g) is rank deficient here: min_rank keeps its zero singular directions, in the bases).
    model = adapted_linear(init_rank=5, max_rank=5, min_rank=5, tau=0.0)
    layer = model[0]
    opt = geolora.GeoLoRAOptimizer(model, lr=0.05, betas=(0.9, 0.999))
    mse(model, x, y).backward()
    opt.step()
    opt.zero_grad()
    for _ in range(3):
        mse(model, x, y).backward()
        m_old = _adam_state(opt, layer)["exp_avg"][:5, :5].clone()
        expected = layer.u @ (0.9 * m_old + 0.1 * layer.S.grad[:5, :5]) @ layer.v.T
        v_total = (0.999 * _adam_state(opt, layer)["exp_avg_sq"][:5, :5] + 0.001 * layer.S.grad[:5, :5] ** 2).sum()
        opt.step()
        opt.zero_grad()
        m_new = _adam_state(opt, layer)["exp_avg"][:5, :5]
        assert torch.allclose(layer.u @ m_new @ layer.v.T, expected.detach(), atol=1e-6)
        assert torch.allclose(_adam_state(opt, layer)["exp_avg_sq"][:5, :5].sum(), v_total, rtol=1e-4)
        assert torch.allclose(layer.s, torch.diag(torch.diagonal(layer.s)))  # S is diagonal after an SVD


def test_moment_reset_option_restarts_adam_state_at_truncation():
    x, y = least_squares()
    model = adapted_linear(init_rank=4, max_rank=8, tau=0.05)
    opt = geolora.GeoLoRAOptimizer(model, lr=0.05, moment_transport="reset")
    mse(model, x, y).backward()
    opt.step()
    assert _adam_state(opt, model[0]) == {}


def test_weight_decay_never_touches_the_bases():
    x, y = least_squares()
    model = adapted_linear(init_rank=4, max_rank=4, tau=0.0, coefficient_steps=1000)
    opt = geolora.GeoLoRAOptimizer(model, lr=0.05, weight_decay=0.5)
    mse(model, x, y).backward()
    opt.step()  # adapting step
    u = model[0].U.detach().clone()
    opt.zero_grad()
    mse(model, x, y).backward()
    opt.step()  # coefficient step: U must stay exactly
    assert torch.equal(u, model[0].U)


def test_layers_of_one_shape_step_together_exactly_as_alone():
    """Same-shaped layers of different ranks share one padded batch; no layer may see another's data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    geolora.inject(model, geolora.GeoLoRAConfig(target_modules=["0", "2"], init_rank=5, max_rank=8, tau=0.1))
    _set_random_factors(model[2], rank=2)
    x, y = torch.randn(64, 16), torch.randn(64, 16)
    together, first_alone, second_alone = model, copy.deepcopy(model), copy.deepcopy(model)
    for net, silent in ((together, None), (first_alone, 2), (second_alone, 0)):
        opt = geolora.GeoLoRAOptimizer(net, lr=0.05)
        mse(net, x, y).backward()
        if silent is not None:  # a layer without gradients sits the step out
            for p in (net[silent].U, net[silent].S, net[silent].V):
                p.grad = None
        opt.step()
    for alone, index in ((first_alone, 0), (second_alone, 2)):
        assert alone[index].rank == together[index].rank
        for name in ("U", "S", "V"):
            assert torch.allclose(getattr(alone[index], name), getattr(together[index], name), atol=1e-5)


def test_factors_stay_views_of_the_stacked_tensor_and_are_restacked_when_replaced():
    """After a step the factors are views of the optimizer's stacked tensors: writes through the
    layer (set_factors) reach the next step, and storage replaced behind the optimizer's back (as
    model.to or a cast does) is restacked, giving the same step as the untouched twin."""
    x, y = least_squares()
    model = nn.Sequential(nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 32))
    geolora.inject(model, geolora.GeoLoRAConfig(target_modules=["0", "2"], init_rank=3, max_rank=8, tau=0.05))
    twin = copy.deepcopy(model)
    results = []
    for net, replace in ((model, False), (twin, True)):
        opt = geolora.GeoLoRAOptimizer(net, lr=0.05)
        mse(net, x, y).backward()
        opt.step()
        opt.zero_grad()
        # One stacked tensor per shape: (U_0, V_2), (U_2, V_0), (S_0, S_2).
        for first, second in ((net[0].U, net[2].V), (net[2].U, net[0].V), (net[0].S, net[2].S)):
            assert first.data_ptr() + first.numel() * first.element_size() == second.data_ptr()
        if replace:
            for p in net.parameters():
                p.data = p.data.clone()
        _set_random_factors(net[0], rank=4, seed=11)
        mse(net, x, y).backward()
        opt.step()
        results.append([net[i].delta_weight().detach() for i in (0, 2)])
    for mine, twins in zip(*results):
        assert torch.allclose(mine, twins, atol=1e-6)


def test_a_layer_can_sit_out_a_step_and_rejoin():
    """The stacking plan follows the set of layers with gradients from step to step, and the
    optimizer's stacked buffers are replaced, not added to, when that set changes."""
    x, y = least_squares()
    model = nn.Sequential(nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 32))
    geolora.inject(model, geolora.GeoLoRAConfig(target_modules=["0", "2"], init_rank=3, max_rank=8, tau=0.05))
    opt = geolora.GeoLoRAOptimizer(model, lr=0.05)
    for step, sitting_out in enumerate((None, 2, None, 0)):
        mse(model, x, y).backward()
        if sitting_out is not None:
            for p in (model[sitting_out].U, model[sitting_out].S, model[sitting_out].V):
                p.grad = None
            before = model[sitting_out].delta_weight().clone()
        opt.step()
        opt.zero_grad()
        if step == 0:
            buffers = len(opt._buffers)
        if sitting_out is not None:
            assert torch.equal(model[sitting_out].delta_weight(), before)
    assert len(opt._buffers) == buffers
    assert all(torch.isfinite(p).all() for p in model.parameters())
