"""Half-precision models: where GeoLoRA's factors should live. A tiny Llama (random weights) cast to bf16 or fp16
after injection, trained with GeoLoRAOptimizer on sequences of a fixed random bigram language, two ways:

- ``kept float32`` (the library's choice): the factors stay float32 whatever the model is cast to, the adapter
  computes in the input's precision;
- ``written back``: the step computes in float32 and writes the factors back rounded to the model's dtype (what
  storing them in half precision amounts to), simulated by rounding U, S, V after every step;

beside the same model in float32. Reports ``max |U^T U - I|`` and ``|V^T V - I|`` over the layers at the end, the
mean training loss of the last 50 steps, and the bytes the factors take.

    python scripts/half_precision.py [--steps 300] [--out results/half_precision.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import geolora  # noqa: E402
from experiments.synthetic import LLAMA_TARGETS, language_model_step, tiny_llama  # noqa: E402


def bigram_batches(steps: int, batch: int, length: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Token sequences of a random bigram language (each token has 4 likely successors): there is something to
    learn, and the best loss is known to be about log 4."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(steps):
        tokens = [torch.randint(0, vocab, (batch,), generator=g)]
        for _ in range(length - 1):
            tokens.append(successors[tokens[-1], torch.randint(0, 4, (batch,), generator=g)])
        out.append(torch.stack(tokens, 1))
    return out


def orthogonality_error(model) -> float:
    worst = 0.0
    for _, layer in geolora.adapters(model):
        for basis in (layer.u, layer.v):
            gram = basis.double().T @ basis.double()
            worst = max(worst, float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max()))
    return worst


def train(dtype: torch.dtype, written_back: bool, batches: list[torch.Tensor], lr: float) -> dict:
    model = tiny_llama(vocab_size=256, hidden_size=64)
    geolora.inject(model, geolora.GeoLoRAConfig(target_modules=LLAMA_TARGETS, init_rank=4, max_rank=16, tau=0.1))
    model.to(dtype)
    optimizer = geolora.GeoLoRAOptimizer(model, lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    losses = []
    for tokens in batches:
        losses.append(language_model_step(model, optimizer, scaler, tokens))
        if written_back and dtype != torch.float32:
            with torch.no_grad():
                for _, layer in geolora.adapters(model):
                    for factor in (layer.U, layer.S, layer.V):
                        factor.copy_(factor.to(dtype).float())
    factor_bytes = sum(
        f.numel() * (torch.finfo(dtype).bits // 8 if written_back else f.element_size())
        for _, layer in geolora.adapters(model)
        for f in (layer.U, layer.S, layer.V)
    )
    tail = losses[-50:]
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "factors": "written back" if written_back else "kept float32",
        "orthogonality_error": orthogonality_error(model),
        "final_loss": sum(tail) / len(tail),
        "first_loss": losses[0],
        "factor_bytes": factor_bytes,
        "total_rank": sum(geolora.ranks(model).values()),
        "finite": all(map(lambda v: v == v and abs(v) < float("inf"), losses)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="results/half_precision.json")
    args = parser.parse_args()
    batches = bigram_batches(args.steps, batch=16, length=32, vocab=256)
    rows = [train(torch.float32, False, batches, args.lr)]
    for dtype in (torch.bfloat16, torch.float16):
        for written_back in (False, True):
            rows.append(train(dtype, written_back, batches, args.lr))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "lr": args.lr, "rows": rows}, indent=2))
    print("| model | factors | max abs(UᵀU − I) | loss, last 50 steps | total rank | factor bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['factors']} | {r['orthogonality_error']:.1e} | {r['final_loss']:.4f} | "
            f"{r['total_rank']} | {r['factor_bytes']:,} |"
        )


if __name__ == "__main__":
    main()
