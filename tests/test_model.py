"""Injection into a Hugging Face model, inspection, and bad input."""

import pytest
import torch
from conftest import DEBERTA_TARGETS, deberta_config, tiny_deberta
from torch import nn

import geolora


def test_inject_into_deberta_trains_only_adapters_and_saved_modules(batch):
    model = tiny_deberta()
    with torch.no_grad():
        reference = model(**batch).logits
    geolora.inject(model, deberta_config())
    names = list(geolora.ranks(model))
    assert len(names) == 2 * 5 + 2  # per layer: q, k, v, attention.output.dense, intermediate, output.dense
    assert all(any(n.endswith(t) for t in DEBERTA_TARGETS) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".U", ".S", ".V")) or n.startswith("classifier.") for n in trainable)
    assert {"classifier.weight", "classifier.bias"} <= trainable
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


def test_count_trainable_counts_parameters_in_use():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    geolora.inject(
        model, geolora.GeoLoRAConfig(target_modules=["0"], init_rank=4, max_rank=8, min_rank=1, modules_to_save=["2"])
    )
    assert geolora.count_trainable(model) == 4 * (10 + 20) + 16 + (20 * 3 + 3)


def test_regex_target_modules():
    model = tiny_deberta()
    geolora.inject(model, deberta_config(target_modules=r".*layer\.0\.attention\.self\.(query|value)_proj"))
    assert sorted(geolora.ranks(model)) == [
        "deberta.encoder.layer.0.attention.self.query_proj",
        "deberta.encoder.layer.0.attention.self.value_proj",
    ]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(target_modules=["no_such_layer"]), "no module matched"),
        (dict(target_modules=["LayerNorm"]), "nn.Linear only"),
        (dict(modules_to_save=["no_head"]), "modules_to_save"),
    ],
)
def test_bad_injection_names_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        geolora.inject(tiny_deberta(), deberta_config(**overrides))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(min_rank=9, max_rank=8), "min_rank"),
        (dict(tau=1.0), "tau"),
        (dict(tau=-0.1), "tau"),
        (dict(init_rank=20, max_rank=8), "init_rank"),
        (dict(target_modules=[]), "target_modules"),
    ],
)
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        deberta_config(**overrides)


def test_inject_twice_is_refused():
    model = geolora.inject(tiny_deberta(), deberta_config())
    with pytest.raises(ValueError, match="already"):
        geolora.inject(model, deberta_config())


def test_optimizer_needs_an_injected_model():
    with pytest.raises(ValueError, match="inject"):
        geolora.GeoLoRAOptimizer(nn.Linear(3, 3))


def test_lr_scheduler_drives_the_geometric_step(batch):
    model = geolora.inject(tiny_deberta(), deberta_config())
    opt = geolora.GeoLoRAOptimizer(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2 * 0.125] * 2)
