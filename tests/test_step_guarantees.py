"""What the step guarantees beyond the theory: exact for rank-deficient gradients, bounded with AdamW,
atomic on non-finite gradients, correct after a cast, and PyTorch's own gradient semantics."""

import copy
import math

import pytest
import torch
from torch import nn

import geolora
from geolora.linalg import random_orthonormal


def _random_layer(seed, n, rank, dtype, max_rank=16, tau=0.0):
    torch.manual_seed(seed)
    linear = nn.Linear(n, n, bias=False).to(dtype)
    nn.init.zeros_(linear.weight)
    model = geolora.inject(
        nn.Sequential(linear),
        geolora.GeoLoRAConfig(target_modules=["0"], init_rank=rank, max_rank=max_rank, min_rank=1, tau=tau),
    )
    g = torch.Generator().manual_seed(seed)
    model[0].set_factors(
        random_orthonormal(n, rank, generator=g, dtype=dtype),
        torch.randn(rank, rank, generator=g, dtype=dtype),
        random_orthonormal(n, rank, generator=g, dtype=dtype),
    )
    return model, g


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-8)], ids=["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 64])
def test_untruncated_sgd_step_is_projected_gradient_descent_for_every_batch_size(dtype, tol, batch):
    """W - lr P(W) grad L, relative to the step, over 40 seeds; a batch below the rank gives a gradient of
    rank ``batch``, so the rank grows by exactly that (float64; in float32 a direction can fall below rounding)."""
    n, rank = 32, 4
    for seed in range(40):
        model, g = _random_layer(seed, n, rank, dtype)
        x, y = torch.randn(batch, n, generator=g, dtype=dtype), torch.randn(batch, n, generator=g, dtype=dtype)
        layer = model[0]
        u, s, v = (t.detach().clone() for t in (layer.u, layer.s, layer.v))
        weight = (u @ s @ v.T).requires_grad_()
        (grad,) = torch.autograd.grad(0.5 * ((x @ weight.T - y) ** 2).sum(-1).mean(), weight)
        pu, pv = u @ u.T, v @ v.T
        step = 0.1 * (pu @ grad + grad @ pv - pu @ grad @ pv)
        optimizer = geolora.GeoLoRAOptimizer(model, lr=0.1, base_optimizer="sgd")
        (0.5 * ((model(x) - y) ** 2).sum(-1).mean()).backward()
        optimizer.step()
        error = (layer.delta_weight() - (weight.detach() - step)).norm() / step.norm()
        assert error <= tol, f"seed {seed}: {error:.2e}"
        if dtype == torch.float64:
            assert layer.rank == rank + min(batch, rank), f"seed {seed}"


def test_the_issue_reproducer_reaches_rank_7():
    model, g = _random_layer(8, 32, 4, torch.float32)
    x, y = torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g)
    optimizer = geolora.GeoLoRAOptimizer(model, lr=0.1, base_optimizer="sgd")
    (0.5 * ((model(x) - y) ** 2).sum(-1).mean()).backward()
    optimizer.step()
    assert model[0].rank == 7


def _gradient_with_ratio(layer, ratio, seed=0):
    """A dense gradient whose part inside the bases (G_S) is ``ratio`` times its part outside (G_K)."""
    g = torch.Generator().manual_seed(seed)
    n = layer.U.shape[0]
    u, v = layer.u.detach(), layer.v.detach()
    outside = (torch.eye(n) - u @ u.T) @ torch.randn(n, n, generator=g) @ v @ v.T
    inside = u @ torch.randn(layer.rank, layer.rank, generator=g) @ v.T
    return outside / outside.norm() + ratio * inside / inside.norm()


def _set_gradients(layer, grad_w):
    r, big = layer.rank, layer.max_rank

    def pad(t):
        return nn.functional.pad(t, (0, big - t.shape[1]))

    layer.U.grad = pad(grad_w @ layer.v.detach())  # G_K
    layer.V.grad = pad(grad_w.T @ layer.u.detach())  # G_L
    layer.S.grad = nn.functional.pad(layer.u.detach().T @ grad_w @ layer.v.detach(), (0, big - r, 0, big - r))


@pytest.mark.parametrize("ratio", [1e-1, 1e-2, 1e-3, 1e-4, 0.0])
def test_adamw_augmentation_enters_at_adams_scale_whatever_the_gradient_split(ratio):
    """One AdamW step from S = 0 on a 64 x 64 layer at rank 4: Adam moves each entry of S by at most lr and
    the blocks h B have ||h B||^2 <= lr^2 (r^2 + 2 a r) (h normalises the whole tangent gradient), so
    ||dW|| <= alpha lr sqrt(2 r^2 + 2 a r), within a small factor of LoRA's first AdamW step."""
    lr, rank, n = 1e-3, 4, 64
    model = geolora.inject(
        nn.Sequential(nn.Linear(n, n, bias=False)),
        geolora.GeoLoRAConfig(target_modules=["0"], init_rank=rank, max_rank=16, tau=0.0),
    )
    layer = model[0]
    grad_w = _gradient_with_ratio(layer, ratio)
    _set_gradients(layer, grad_w)
    geolora.GeoLoRAOptimizer(model, lr=lr).step()
    geo = layer.delta_weight().norm().item()
    assert geo <= lr * math.sqrt(2 * rank**2 + 2 * rank * rank) * (1 + 1e-4)
    # LoRA (B = 0, A Kaiming-uniform as peft makes it, scale 2): the first AdamW step is -lr sign(dL/dB).
    torch.manual_seed(0)
    a = nn.init.kaiming_uniform_(torch.empty(8, n), a=math.sqrt(5))
    lora = (2.0 * (-lr * torch.sign(grad_w @ a.T)) @ a).norm().item()
    assert lora / 10 <= geo <= 3 * lora


def _classifier(seed=0, coefficient_steps=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    return geolora.inject(
        model,
        geolora.GeoLoRAConfig(
            target_modules=["0", "2"],
            init_rank=3,
            max_rank=8,
            tau=0.1,
            modules_to_save=["4"],
            coefficient_steps=coefficient_steps,
        ),
    )


def _snapshot(model, optimizer):
    state = {
        id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in optimizer.state.items()
    }
    return [p.detach().clone() for p in model.parameters()], geolora.ranks(model), state


@pytest.mark.parametrize("where", ["0.U", "2.S", "4.weight"])
@pytest.mark.parametrize("coefficient_steps", [0, 1])
def test_a_non_finite_gradient_raises_and_changes_nothing(where, coefficient_steps):
    model = _classifier(coefficient_steps=coefficient_steps)
    optimizer = geolora.GeoLoRAOptimizer(model, lr=0.05, weight_decay=0.01)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    twin, twin_optimizer = copy.deepcopy(model), None
    for step in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 2:  # adapting for c = 0, coefficient-only for c = 1
            before = _snapshot(model, optimizer)
            grad = dict(model.named_parameters())[where].grad
            grad.view(-1)[1] = float("nan")
            name = where if where.endswith("weight") else where.split(".")[0]  # a plain parameter, or the layer
            with pytest.raises(FloatingPointError, match=f"non-finite gradient or update in {name}: the step was not"):
                optimizer.step()
            after = _snapshot(model, optimizer)
            assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1]
            assert before[2].keys() == after[2].keys()
            for key, state in before[2].items():
                for name, value in state.items():
                    assert (
                        torch.equal(value, after[2][key][name])
                        if torch.is_tensor(value)
                        else value == after[2][key][name]
                    )
            optimizer.zero_grad()
            twin_optimizer = copy.deepcopy(optimizer.state_dict())
        else:
            optimizer.step()
            optimizer.zero_grad()
    # Skipping the bad batch leaves a healthy optimizer: the next step is the one a twin takes from there.
    twin.load_state_dict(model.state_dict())
    replay = geolora.GeoLoRAOptimizer(twin, lr=0.05, weight_decay=0.01)
    replay.load_state_dict(twin_optimizer)
    for net, opt in ((model, optimizer), (twin, replay)):
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert geolora.ranks(model) == geolora.ranks(twin)


@pytest.mark.parametrize("base_optimizer", ["adamw", "sgd"])
def test_casting_the_model_after_steps_restacks_and_casts_the_state(base_optimizer):
    model = _classifier()
    optimizer = geolora.GeoLoRAOptimizer(model, lr=0.05, base_optimizer=base_optimizer, momentum=0.9)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))

    def train(net, opt, dtype, steps=2):
        for _ in range(steps):
            nn.functional.cross_entropy(net(x.to(dtype)), y).backward()
            opt.step()
            opt.zero_grad()

    train(model, optimizer, torch.float32)
    buffers = len(optimizer._buffers)
    twin = copy.deepcopy(model).double()  # a fresh optimizer given the same state: the reference
    twin_optimizer = geolora.GeoLoRAOptimizer(twin, lr=0.05, base_optimizer=base_optimizer, momentum=0.9)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    model.double()
    train(model, optimizer, torch.float64)
    train(twin, twin_optimizer, torch.float64)
    assert geolora.ranks(model) == geolora.ranks(twin)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert a.dtype == torch.float64 and torch.allclose(a, b, atol=1e-10)
    model.float()
    train(model, optimizer, torch.float32)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    assert len(optimizer._buffers) == buffers  # the float64 buffers were dropped


def test_gradients_stay_the_callers_through_steps():
    """.grad is never changed by step(), and what autograd.grad returns is never overwritten later."""
    model = _classifier()
    optimizer = geolora.GeoLoRAOptimizer(model, lr=0.05)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    layer = model[0]
    for step in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        (kept,) = torch.autograd.grad(loss, [layer.U], retain_graph=True)
        copy_of_kept = kept.clone()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters() if p.grad is not None)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(2 * x), y).backward()  # another pass before anyone reads `kept`
        assert torch.equal(kept, copy_of_kept) and torch.equal(kept, grads["0.U"])
        optimizer.zero_grad()
