"""How large should the new directions' blocks be with AdamW? Candidates measured side by side.

- ``s_gain``: Adam's per-layer gain of the S-gradients, ``lr / (sqrt(mean v_S) + eps)``, times the raw
  blocks (the rule before: unbounded when the gradient lies outside the bases);
- ``entry_cap``: the same, lowered until no entry of the blocks exceeds lr (bounded, basis-dependent);
- ``block_rms``: the blocks normalised by their own current RMS (RMS exactly lr, basis-independent, but
  as large when almost nothing lies outside the bases as when everything does);
- ``tangent_rms`` (the library's rule): ``lr / (sqrt(max(v, q)) + eps)``, q the mean square of the whole
  tangent gradient ``[G_S, Ubar^T G_K, G_L^T Vbar]`` and v its running average: the integrator's
  proportions, Adam's scale, RMS of the blocks at most ``sqrt(3) lr``, basis-independent.

Adam moments kept for the K and L directions (as LoRA keeps them for A and B) are not among them: they
live in n-space per basis column, must be carried along whenever U or V rotate, and normalise entry by
entry in one basis, so the step would depend on the basis.

    python scripts/augmentation_scale.py              # one-step scenario + short offline runs (~12 min)
    python scripts/augmentation_scale.py --no-train   # the one-step scenario alone (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import geolora  # noqa: E402
from geolora.linalg import columns_in_use  # noqa: E402


class SGain(geolora.GeoLoRAOptimizer):
    def _step_size(self, batch, projections, valid, ranks, group):
        second = batch.moments_new["exp_avg_sq"].sum(dim=(-2, -1)).view(-1, 1, 1) / ranks.view(-1, 1, 1) ** 2
        return group["lr"] / ((second / (1 - group["betas"][1] ** batch.steps)).sqrt() + group["eps"]), None


def _new_blocks(projections, valid, ranks):
    """The K and L blocks of each layer (zero elsewhere) and their entry counts."""
    old = columns_in_use(ranks, projections[0].shape[-1])
    masks = [((v & ~old).unsqueeze(-1) & old.unsqueeze(-2)).to(p.dtype) for p, v in zip(projections, valid)]
    return [p * m for p, m in zip(projections, masks)], sum(m.sum((-2, -1)) for m in masks)


class EntryCap(SGain):
    """The S-gradient gain, lowered per layer until no entry of the blocks exceeds lr."""

    def _step_size(self, batch, projections, valid, ranks, group):
        gain, _ = super()._step_size(batch, projections, valid, ranks, group)
        blocks, _ = _new_blocks(projections, valid, ranks)
        largest = torch.stack([b.abs().amax((-2, -1)) for b in blocks]).amax(0).clamp_min(1e-30)
        return torch.minimum(gain, group["lr"] / largest.view(-1, 1, 1)), None


class BlockRMS(geolora.GeoLoRAOptimizer):
    """The blocks' own current RMS (G_S left out): RMS exactly lr, however little lies outside the bases."""

    def _step_size(self, batch, projections, valid, ranks, group):
        blocks, count = _new_blocks(projections, valid, ranks)
        mean_square = sum(b.pow(2).sum((-2, -1)) for b in blocks) / count.clamp_min(1)
        return (group["lr"] / (mean_square.sqrt() + group["eps"])).view(-1, 1, 1), None


CANDIDATES = {"s_gain": SGain, "entry_cap": EntryCap, "block_rms": BlockRMS, "tangent_rms": geolora.GeoLoRAOptimizer}


def one_step_norms(candidate, ratios=(1e-1, 1e-2, 1e-3, 1e-4, 0.0), lr=1e-3, rank=4, n=64) -> list[float]:
    """||dW|| after one AdamW step from S = 0 when the gradient inside the bases is ``ratio`` times the
    one outside (64 x 64 layer, rank 4)."""
    norms = []
    for ratio in ratios:
        torch.manual_seed(0)
        model = geolora.inject(
            nn.Sequential(nn.Linear(n, n, bias=False)),
            geolora.GeoLoRAConfig(target_modules=["0"], init_rank=rank, max_rank=16, tau=0.0),
        )
        layer = model[0]
        g = torch.Generator().manual_seed(0)
        u, v = layer.u.detach(), layer.v.detach()
        outside = (torch.eye(n) - u @ u.T) @ torch.randn(n, n, generator=g) @ v @ v.T
        inside = u @ torch.randn(rank, rank, generator=g) @ v.T
        grad = outside / outside.norm() + ratio * inside / inside.norm()
        layer.U.grad, layer.V.grad = (
            nn.functional.pad(t, (0, layer.max_rank - t.shape[1])) for t in (grad @ v, grad.T @ u)
        )
        layer.S.grad = nn.functional.pad(u.T @ grad @ v, (0, layer.max_rank - rank, 0, layer.max_rank - rank))
        candidate(model, lr=lr).step()
        norms.append(layer.delta_weight().norm().item())
    return norms


def offline_run(candidate, lr: float, budget: int, seed: int) -> dict:
    """One run of the offline robustness study's setting with ``candidate`` as GeoLoRA's optimizer."""
    from hydra import compose, initialize_config_dir

    from experiments.config import register
    from experiments.train import train

    register()
    overrides = [
        "method=geolora",
        "logger=none",
        "progress=false",
        "task.max_train_samples=2000",
        "trainer.epochs=1",
        f"trainer.lr={lr}",
        f"method.rank_budget={budget}",
        "method.init_rank=8",
        "method.max_rank=16",
        f"seed={seed}",
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    original, geolora.GeoLoRAOptimizer = geolora.GeoLoRAOptimizer, candidate
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            summary = train(cfg, run_dir)
    finally:
        geolora.GeoLoRAOptimizer = original
    return {
        "accuracy": summary["final"].get(summary["main_metric"]),
        "status": summary["status"],
        "total_rank": sum(summary["ranks_final"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--lrs", default="5e-2,1e-2,2e-3")
    parser.add_argument("--budget", type=int, default=288)
    parser.add_argument("--out", default=str(ROOT / "results" / "augmentation_scale.json"))
    args = parser.parse_args()
    results = {"one_step_norm": {}, "offline": {}}
    lora = 2.0 * 1e-3 * math.sqrt(64 * 8) * math.sqrt(1 / 3)  # LoRA's first AdamW step, about: scale lr sqrt(n r) |a|
    print(
        f"||dW|| after one AdamW step (lr 1e-3) for ||G_S||/||G_K|| = 0.1, 1e-2, 1e-3, 1e-4, 0 "
        f"(LoRA's first step: about {lora:.3f})"
    )
    for name, candidate in CANDIDATES.items():
        results["one_step_norm"][name] = norms = one_step_norms(candidate)
        print(f"  {name:10s} " + "  ".join(f"{v:.3g}" for v in norms))
    if not args.no_train:
        print(f"offline robustness setting, rank budget {args.budget}, seed 0: final accuracy (total rank)")
        for lr in (float(v) for v in args.lrs.split(",")):
            for name, candidate in CANDIDATES.items():
                run = results["offline"].setdefault(f"lr={lr:g}", {})[name] = offline_run(
                    candidate, lr, args.budget, 0
                )
                print(f"  lr {lr:g} {name:10s} {run['accuracy']} ({run['total_rank']}, {run['status']})")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
