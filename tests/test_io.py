"""Save / load, merge / unmerge, peft export, and mixed precision."""

import copy

import pytest
import torch
from conftest import deberta_config, tiny_deberta, train_steps

import geolora
from geolora.model import config_of


def _trained(batch, steps=4, **config):
    base = tiny_deberta()
    pristine = copy.deepcopy(base)
    model = geolora.inject(base, deberta_config(**config))
    opt = geolora.GeoLoRAOptimizer(model, lr=5e-2)
    train_steps(model, opt, batch, steps)
    return model, opt, pristine


def test_save_load_restores_ranks_and_outputs(batch, tmp_path):
    model, _, pristine = _trained(batch)
    ranks = geolora.ranks(model)
    assert set(ranks.values()) != {4}  # ranks moved away from init_rank
    geolora.save_adapter(model, tmp_path / "adapter")
    fresh = geolora.inject(copy.deepcopy(pristine), deberta_config())
    geolora.load_adapter(fresh, tmp_path / "adapter")
    assert geolora.ranks(fresh) == ranks
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)
    auto = geolora.load_adapter(copy.deepcopy(pristine), tmp_path / "adapter")  # injects from saved config
    with torch.no_grad():
        assert torch.equal(auto(**batch).logits, model(**batch).logits)


def test_saving_while_factors_share_the_optimizers_stacked_storage(batch, tmp_path):
    """After a step, same-shaped factors are views of one stacked tensor; at full rank even the
    slices in use are. Both save paths must write separate tensors and load back the same model."""
    model, _, pristine = _trained(batch, steps=2, init_rank=8, min_rank=8)
    assert set(geolora.ranks(model).values()) == {8}
    layers = [layer for _, layer in geolora.adapters(model)]
    assert len({layer.U.untyped_storage().data_ptr() for layer in layers}) < len(layers)
    geolora.save_adapter(model, tmp_path / "adapter")
    model.save_pretrained(tmp_path / "full")
    fresh = geolora.load_adapter(copy.deepcopy(pristine), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)
    whole = geolora.inject(copy.deepcopy(pristine), deberta_config(init_rank=8, min_rank=8))
    from safetensors.torch import load_file

    whole.load_state_dict(load_file(str(tmp_path / "full" / "model.safetensors")))
    with torch.no_grad():
        assert torch.equal(whole(**batch).logits, model(**batch).logits)


def test_load_adapter_rejects_a_wrong_folder(tmp_path):
    with pytest.raises(ValueError, match="not a GeoLoRA adapter folder"):
        geolora.load_adapter(tiny_deberta(), tmp_path)


def test_model_state_dict_carries_ranks(batch):
    model, _, pristine = _trained(batch)
    fresh = geolora.inject(copy.deepcopy(pristine), deberta_config())
    fresh.load_state_dict(model.state_dict())
    assert geolora.ranks(fresh) == geolora.ranks(model)


def test_loading_clears_factor_columns_beyond_the_rank(batch):
    """The optimizer assumes zero columns beyond the rank; a state dict may carry stale ones."""
    model, _, pristine = _trained(batch)
    state = {k: v + 1.0 if k.endswith((".U", ".V")) else v for k, v in model.state_dict().items()}
    fresh = geolora.inject(copy.deepcopy(pristine), deberta_config())
    fresh.load_state_dict(state)
    for _, layer in geolora.adapters(fresh):
        assert not layer.U[:, layer.rank :].any() and not layer.V[:, layer.rank :].any()
        assert layer.U[:, : layer.rank].all()


def test_optimizer_state_round_trips(batch, tmp_path):
    model, opt, _ = _trained(batch, coefficient_steps=2)
    twin = copy.deepcopy(model)
    twin_opt = geolora.GeoLoRAOptimizer(twin, lr=5e-2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    twin_opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=False))
    train_steps(model, opt, batch, 3)
    train_steps(twin, twin_opt, batch, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert geolora.ranks(model) == geolora.ranks(twin)


def test_merge_then_unmerge_restores_base_weights(batch):
    model, _, _ = _trained(batch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    with torch.no_grad():
        before = model(**batch).logits
        geolora.merge(model)
        assert torch.allclose(model(**batch).logits, before, atol=1e-5)
        assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
        geolora.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.allclose(p, weights[n], atol=1e-6)


def test_export_peft_loads_in_peft_with_same_logits(batch, tmp_path):
    from peft import PeftModel

    model, _, pristine = _trained(batch)
    geolora.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(pristine, tmp_path / "peft").eval()
    with torch.no_grad():
        ours, theirs = model(**batch).logits, peft_model(**batch).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_bf16_autocast_on_cpu_trains(batch):
    model = geolora.inject(tiny_deberta(), deberta_config())
    opt = geolora.GeoLoRAOptimizer(model, lr=1e-2)
    model.train()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for _, layer in geolora.adapters(model):
        assert layer.U.dtype == torch.float32
        assert torch.allclose(layer.u.T @ layer.u, torch.eye(layer.rank), atol=1e-5)


def test_grad_scaler_unscales_and_skips_steps_with_inf(batch):
    model = geolora.inject(tiny_deberta(), deberta_config())
    model.train()
    plain = copy.deepcopy(model)
    plain(**batch).loss.backward()
    opt = geolora.GeoLoRAOptimizer(model, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(model(**batch).loss).backward()
    scaler.unscale_(opt)
    for p, q in zip(model.parameters(), plain.parameters()):  # K/L gradients are unscaled too
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()

    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    ranks = geolora.ranks(model)
    scaler.scale(model(**batch).loss).backward()
    next(p for p in model.parameters() if p.grad is not None).grad[0].fill_(float("inf"))
    scale = scaler.get_scale()
    scaler.step(opt)  # must be skipped
    scaler.update()
    assert scaler.get_scale() < scale
    assert geolora.ranks(model) == ranks
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n])


def _peft_lora(base, tmp_path):
    """A peft LoRA model with nonzero factors (one layer at its own rank and alpha), saved to a folder."""
    from conftest import DEBERTA_TARGETS
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=DEBERTA_TARGETS,
        modules_to_save=["classifier"],
        rank_pattern={"layer.0.attention.self.query_proj": 2},
        alpha_pattern={"layer.0.attention.self.query_proj": 3},
    )
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "lora")
    return peft_model.eval()


def test_from_peft_computes_what_the_peft_model_computes(batch, tmp_path):
    peft_model = _peft_lora(tiny_deberta(), tmp_path)
    model = geolora.from_peft(tiny_deberta(), tmp_path / "lora", tau=0.1).eval()
    ranks = geolora.ranks(model)
    assert ranks["deberta.encoder.layer.0.attention.self.query_proj"] == 2 and max(ranks.values()) == 4
    assert config_of(model).tau == 0.1 and config_of(model).max_rank == 8
    with torch.no_grad():
        assert (model(**batch).logits - peft_model(**batch).logits).abs().max() <= 1e-5


def test_from_peft_round_trips_export_peft(batch, tmp_path):
    model, _, pristine = _trained(batch)
    geolora.export_peft(model, tmp_path / "peft")
    again = geolora.from_peft(pristine, tmp_path / "peft")
    assert geolora.ranks(again) == geolora.ranks(model)
    with torch.no_grad():
        assert (again.eval()(**batch).logits - model.eval()(**batch).logits).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="not a peft adapter folder"):
        geolora.from_peft(tiny_deberta(), tmp_path)
