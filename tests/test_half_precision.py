"""Half-precision models: a tiny Llama in bf16 or fp16 (cast before or after injection) trains with
GeoLoRAOptimizer (finite, falling loss, ranks adapting, bases orthonormal: the factors stay float32), merges, and
saves / loads / exports to peft and back in its dtype."""

from __future__ import annotations

import pytest
import torch

import geolora
from experiments.synthetic import LLAMA_TARGETS as TARGETS
from experiments.synthetic import language_model_step, tiny_llama


def _llama():
    return tiny_llama(vocab_size=64)


def _adapted(dtype, cast_after: bool):
    model = _llama()
    if not cast_after:
        model.to(dtype)
    geolora.inject(model, geolora.GeoLoRAConfig(target_modules=TARGETS, init_rank=2, max_rank=8, tau=0.1))
    if cast_after:
        model.to(dtype)
    return model


def _train(model, dtype, steps=40):
    optimizer = geolora.GeoLoRAOptimizer(model, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    tokens = torch.randint(0, 64, (8, 24), generator=torch.Generator().manual_seed(1))
    losses, ranks = [], []
    for _ in range(steps):
        losses.append(language_model_step(model, optimizer, scaler, tokens))
        ranks.append(sum(geolora.ranks(model).values()))
    return losses, ranks, tokens


SLOW = pytest.mark.slow  # fp16 matmuls are slow on CPU: make test runs bf16 cast after injection


@pytest.mark.parametrize(
    "cast_after", [True, pytest.param(False, marks=SLOW)], ids=["cast after injection", "injected into a half model"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=SLOW)], ids=["bf16", "fp16"])
def test_a_half_precision_llama_trains_merges_and_reloads_in_its_dtype(dtype, cast_after, tmp_path):
    model = _adapted(dtype, cast_after)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base.weight.dtype == dtype and layer.U.dtype == layer.S.dtype == torch.float32
    losses, ranks, tokens = _train(model, dtype)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1  # falling
    assert len(set(ranks)) > 1  # ranks adapt
    for _, adapter in geolora.adapters(model):
        for basis in (adapter.u, adapter.v):
            assert (basis.T @ basis - torch.eye(basis.shape[1])).abs().max() < 1e-4  # float32 bases

    model.eval()
    with torch.no_grad():
        before = model(input_ids=tokens).logits.float()
    geolora.save_adapter(model, tmp_path / "adapter")
    fresh = _llama().to(dtype)
    geolora.load_adapter(fresh, tmp_path / "adapter")
    assert fresh.model.layers[0].mlp.up_proj.base.weight.dtype == dtype
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(input_ids=tokens).logits.float(), before, atol=1e-5)
        geolora.merge(model)
        merged = model(input_ids=tokens).logits.float()
    assert layer.base.weight.dtype == dtype
    assert (merged - before).abs().max() < 0.1 * before.abs().max()  # one rounding of W + dW to the half dtype


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_peft_export_and_import_keep_the_half_base(dtype, tmp_path):
    from peft import PeftModel

    model = _adapted(dtype, cast_after=True)
    _, _, tokens = _train(model, dtype, steps=10)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits.float()
    geolora.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(_llama().to(dtype), str(tmp_path / "peft")).eval()
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == dtype
    back = geolora.from_peft(_llama().to(dtype), tmp_path / "peft").eval()
    assert back.model.layers[0].self_attn.q_proj.base.weight.dtype == dtype
    with torch.no_grad():
        for other in (peft_model, back):
            assert (other(input_ids=tokens).logits.float() - expected).abs().max() < 2e-2 * expected.abs().max()
