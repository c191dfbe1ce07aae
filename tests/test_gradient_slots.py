"""The backward writes U.grad / V.grad into buffers the optimizer lends: same gradients as fresh tensors."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import geolora


class _SharedProjection(nn.Module):
    """``proj`` is called twice per forward, as DeBERTa's shared attention key is."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x)) + self.proj(2 * x))


def _model() -> nn.Module:
    torch.manual_seed(0)
    config = geolora.GeoLoRAConfig(target_modules=["proj", "out"], init_rank=2, max_rank=6, min_rank=1, tau=0.01)
    return geolora.inject(_SharedProjection(), config)


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(16, 12, generator=g)).pow(2).mean()


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _lent_model() -> tuple[nn.Module, geolora.GeoLoRAOptimizer]:
    """After one adapting step the optimizer has lent its buffers to every layer."""
    model = _model()
    opt = geolora.GeoLoRAOptimizer(model, lr=0.05)
    _loss(model, 0).backward()
    opt.step()
    opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("scenario", ["one pass", "accumulate two passes", "zeroed in place",
                                      "stepped, then zeroed in place", "grad of input first"])
def test_gradients_written_into_lent_slots_equal_fresh_ones(scenario):
    model, opt = _lent_model()
    if scenario in ("zeroed in place", "stepped, then zeroed in place"):  # autograd adds into the old gradient
        _loss(model, 1).backward()
        if scenario.startswith("stepped"):
            opt.step()
        model.zero_grad(set_to_none=False)
    fresh = copy.deepcopy(model)  # a copy starts without the optimizer's buffers
    assert all(slot.tensor is None for _, layer in geolora.adapters(fresh) for slot in layer.gradient_slots)
    assert all(slot.tensor is not None for _, layer in geolora.adapters(model) for slot in layer.gradient_slots)
    for m in (model, fresh):
        if scenario == "grad of input first":  # a pass that never reaches the factors' gradients
            x = torch.randn(4, 12, requires_grad=True)
            torch.autograd.grad(m(x).sum(), x)
        _loss(m, 2).backward()
        if scenario == "accumulate two passes":
            _loss(m, 3).backward()
    expected, got = _gradients(fresh), _gradients(model)
    assert expected.keys() == got.keys() and len(got) == 2 * 3  # U, S, V of both layers
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradients_of_a_layer_called_inside_and_outside_checkpoints_equal_fresh_ones(reentrant):
    """Reentrant checkpoints run their own backward passes, nested in the outer one."""
    model, _ = _lent_model()
    fresh = copy.deepcopy(model)
    for m in (model, fresh):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(4)).requires_grad_()
        inner = [checkpoint(lambda t: torch.tanh(m.proj(t)), scale * x, use_reentrant=reentrant) for scale in (1, 2)]
        m.out(inner[0] + inner[1] + m.proj(3 * x)).pow(2).mean().backward()
    expected, got = _gradients(fresh), _gradients(model)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name


def test_backward_writes_the_lent_slots_and_the_step_leaves_gradients_alone():
    model, opt = _lent_model()
    _loss(model, 1).backward()
    for _, layer in geolora.adapters(model):  # the shared layer too: its second call adds into the slot
        for factor, slot in zip((layer.U, layer.V), layer.gradient_slots):
            assert factor.grad.data_ptr() == slot.tensor.data_ptr()
    before = _gradients(model)
    opt.step()
    after = _gradients(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
