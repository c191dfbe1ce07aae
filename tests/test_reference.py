"""GeoLoRAOptimizer (batched) against geolora.reference (the step one layer at a time, plain QR + SVD)."""

import copy

import pytest
import torch
from torch import nn

import geolora
from geolora.reference import ReferenceStep

BASES = {
    "sgd": dict(base_optimizer="sgd"),
    "sgd+momentum+wd": dict(base_optimizer="sgd", momentum=0.9, weight_decay=0.01),
    "adamw+wd": dict(base_optimizer="adamw", weight_decay=0.01),
    "adamw h=lr, new moments from tangent": dict(base_optimizer="adamw", new_block_step="lr", new_moments="tangent"),
}
TRUNCATIONS = {
    "tau": dict(tau=0.1),
    "at max rank": dict(tau=0.0, max_rank=4),
    "at min rank": dict(tau=0.7, min_rank=2),
    "rank budget": dict(tau=0.0, rank_budget=11),
}
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


def _model(dtype, max_rank, coefficient_steps, truncation, seed):
    """Three layers of different shapes; max_rank 16 exceeds two of them (R = min(out, in) there)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 6)).to(dtype)
    config = dict(
        dict(
            target_modules=["0", "2", "4"],
            init_rank=3,
            max_rank=max_rank,
            min_rank=1,
            coefficient_steps=coefficient_steps,
            alpha=1.5,
        ),
        **truncation,
    )
    return geolora.inject(model, geolora.GeoLoRAConfig(**config))


def _loss(model, x, y):
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def _copy_state(model, optimizer, twin, reference):
    """Put the reference where the optimizer is: factors, ranks and S moments (cut to the rank)."""
    for (_, mine), (_, spec) in zip(geolora.adapters(model), geolora.adapters(twin)):
        spec.set_factors(mine.u.detach(), mine.s.detach(), mine.v.detach())
        r, state = mine.rank, optimizer.state[mine.S]
        reference.state[spec] = {
            key: value if not torch.is_tensor(value) else value[:r, :r].clone() if value.dim() == 2 else value.clone()
            for key, value in state.items()
        }
    reference.augmented = optimizer.param_groups[0]["pending"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("truncation", list(TRUNCATIONS))
def test_batched_step_equals_reference_step(dtype, base, truncation):
    """Identical ranks and adapter weights at every step of 24-step runs, over batch sizes 1-4 (gradients
    of rank below the adapter's) and 64, two maximum ranks and coefficient_steps 0, 1, 3 and 10 (cycles: the
    rank grows at a cycle's first step and is cut after its last), with ``truncate()`` mid-cycle at step 13
    and after the last step. Float64 runs free; float32 restarts the reference from the optimizer's state
    each step (two float32 runs drift apart by rounding however exact each step is: Adam's normalisation
    amplifies it)."""
    lr = 0.05 if base.startswith("sgd") else 0.01
    for case, (batch, max_rank, c) in enumerate(
        [(1, 8, 0), (2, 16, 1), (3, 8, 3), (4, 16, 0), (64, 8, 10), (64, 16, 3)]
    ):
        model = _model(dtype, max_rank, c, TRUNCATIONS[truncation], seed=case)
        twin = copy.deepcopy(model)
        optimizer = geolora.GeoLoRAOptimizer(model, lr=lr, **BASES[base])
        reference = ReferenceStep(twin, lr=lr, **BASES[base])
        g = torch.Generator().manual_seed(100 + case)
        x, y = torch.randn(batch, 10, generator=g, dtype=dtype), torch.randn(batch, 6, generator=g, dtype=dtype)
        rank_history = []
        for step in range(25):
            if dtype == torch.float32:
                _copy_state(model, optimizer, twin, reference)
            for net, stepper in ((model, optimizer), (twin, reference)):
                if step < 24:
                    _loss(net, x, y).backward()
                    stepper.step()
                    net.zero_grad()
                if step in (13, 24):
                    stepper.truncate()
            truncated = step % (c + 1) == c or step in (13, 24)  # the budget holds after every truncation
            rank_history.append((truncated, list(geolora.ranks(model).values())))
            assert geolora.ranks(model) == geolora.ranks(twin), f"case {case} step {step}"
            for (_, mine), (_, spec) in zip(geolora.adapters(model), geolora.adapters(twin)):
                expected = spec.delta_weight()
                error = (mine.delta_weight() - expected).norm() / expected.norm().clamp_min(1e-30)
                assert error <= TOLERANCE[dtype], f"case {case} step {step}: relative error {error:.2e}"
        if c > 0:  # the rank grew at the first step of a cycle (to at most 2r) and was cut at its end
            assert all(3 < rank <= 6 for rank in rank_history[c - 1][1]), rank_history[c - 1]
        final = [layer.rank for _, layer in geolora.adapters(model)]
        if truncation == "at max rank" and batch > 1:
            assert final == [4, 4, 4]
        if truncation == "at min rank":
            assert final == [2, 2, 2]
        if truncation == "rank budget":
            assert all(sum(ranks) <= 11 for truncated, ranks in rank_history if truncated) and sum(final) == 11
