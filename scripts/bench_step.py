"""Step-time benchmark: GeoLoRA against peft LoRA / AdaLoRA and the frozen model, in one run.

Same model, batch, target modules and initial rank for every method; repetitions are interleaved
(method A, B, C, ... then again) and medians reported. Per method: ms per full iteration (forward,
backward, optimizer step incl. rank adaptation), ms in the update after backward alone, peak memory,
trainable parameters in use; then the ratios GeoLoRA/LoRA and GeoLoRA/AdaLoRA.

    python scripts/bench_step.py                      # CPU: DeBERTa-v3-base geometry, batch 8 x 128
    python scripts/bench_step.py --device cuda --batch 32 --seq 256 [--precision fp16]
    python scripts/bench_step.py --geometry small     # hidden 256, 4 layers: adapter overhead dominates

Weights are random (built from a config, no download): the timing depends on shapes only.
Peak memory on CPU is the peak RSS (VmHWM, reset after the model is built) of a separate process per
method minus its RSS after building the model (so methods do not see each other's allocations); on GPU
max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.config import MethodConfig, MethodName, ModelConfig, TrainerConfig  # noqa: E402
from experiments.methods import adapt  # noqa: E402
from experiments.models import autocast  # noqa: E402

TARGETS = ["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"]
GEOMETRIES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),  # tests
}
METHODS = ["frozen", "lora", "adalora", "geolora", "geolora_c10"]
MODEL = ModelConfig(
    name="deberta-v3 (random weights)",
    name_or_path="none",
    target_modules=TARGETS,
    modules_to_save=["classifier", "pooler"],
)
TRAINER = TrainerConfig(lr=1e-4, weight_decay=0.01)  # torch AdamW's default weight decay, for every method


def build_model(geometry: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    config = DebertaV2Config(
        vocab_size=128100,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        max_relative_positions=-1,
        type_vocab_size=0,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **GEOMETRIES[geometry],
    )
    return DebertaV2ForSequenceClassification(config).to(device)


def method_config(method: str, args) -> MethodConfig:
    """The bench's settings of each method, in the harness's method config."""
    if method == "lora":
        return MethodConfig(name=MethodName.lora, r=args.rank, alpha=2 * args.rank)
    if method == "adalora":  # a long run: importance scores every step, masks every deltaT steps
        return MethodConfig(
            name=MethodName.adalora,
            init_rank=args.rank,
            target_r=max(1, args.rank // 2),
            tinit=0,
            tfinal=1000,
            delta_t=10,
            alpha=2 * args.rank,
        )
    return MethodConfig(
        name=MethodName.geolora,
        init_rank=args.rank,
        max_rank=2 * args.rank,
        min_rank=2,
        tau=args.tau,
        coefficient_steps=10 if method == "geolora_c10" else 0,
    )


class Runner:
    """One method on its own copy of the model: ``step()`` times forward+backward and the update.
    Methods are built by the harness (``experiments.methods.adapt``), as a run builds them."""

    def __init__(self, method: str, args, device: torch.device) -> None:
        self.method, self.device, self.precision = method, device, args.precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        model = build_model(args.geometry, device)
        self.after = lambda step: None
        self.inputs_need_grad = False
        self.ranks = dict
        if method == "frozen":  # the floor: forward + backward through the frozen network, no weight grads
            model.requires_grad_(False)
            self.inputs_need_grad = True
            self.optimizer = None
            self.trainable = lambda: 0
        else:
            adapted = adapt(model, MODEL, method_config(method, args), TRAINER, total_steps=10**6)
            model, self.optimizer, self.after = adapted.model, adapted.optimizer, adapted.after_step
            self.trainable = adapted.trainable
            if method.startswith("geolora"):
                self.ranks = adapted.ranks
        self.model = model.train()
        g = torch.Generator().manual_seed(1)
        self.batch = {
            "input_ids": torch.randint(0, 128100, (args.batch, args.seq), generator=g).to(device),
            "labels": torch.randint(0, 2, (args.batch,), generator=g).to(device),
        }
        self.steps = 0
        self.timed_ranks: list[float] = []  # mean rank over the layers at each timed step (what it ran at)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> tuple[float, float]:
        """(seconds for the whole iteration, seconds for the update after backward)."""
        ranks = self.ranks()
        if ranks:
            self.timed_ranks.append(statistics.mean(ranks.values()))
        self._sync()
        start = time.perf_counter()
        with autocast(self.precision, self.device):
            if self.inputs_need_grad:
                embeds = self.model.get_input_embeddings()(self.batch["input_ids"]).detach().requires_grad_(True)
                loss = self.model(inputs_embeds=embeds, labels=self.batch["labels"]).loss
            else:
                loss = self.model(**self.batch).loss
        self.scaler.scale(loss).backward()
        self._sync()
        middle = time.perf_counter()
        if self.optimizer is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.after(self.steps)
            self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        end = time.perf_counter()
        self.steps += 1
        return end - start, end - middle


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> None:
    """Linux: restart the peak-RSS counter (VmHWM) from the current RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def measure_memory(method: str, args) -> float:
    """Peak memory of ``method``'s training steps, in MiB, beyond the built model."""
    device = torch.device(args.device)
    runner = Runner(method, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(3):
            runner.step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = _status_mb("VmRSS")
    reset_peak_rss()
    for _ in range(3):
        runner.step()
    return _status_mb("VmHWM") - base


def memory_in_subprocess(method: str, args) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--memory-of",
        method,
        "--geometry",
        args.geometry,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--rank",
        str(args.rank),
        "--tau",
        str(args.tau),
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    return float(out.stdout.strip().splitlines()[-1])


def ms(values: list[float]) -> dict[str, float]:
    return {"median": 1e3 * statistics.median(values), "min": 1e3 * min(values), "max": 1e3 * max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="autocast (fp16: GradScaler)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tau", type=float, default=0.15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds")
    parser.add_argument(
        "--steps",
        type=int,
        default=1,
        help="timed steps per method per round (1: finest "
        "interleaving, so drifts in machine load hit every method alike)",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(measure_memory(args.memory_of, args))
        return

    device = torch.device(args.device)
    methods = args.methods.split(",")
    runners = {m: Runner(m, args, device) for m in methods}
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step()
    for runner in runners.values():
        runner.timed_ranks.clear()
    totals = {m: [] for m in methods}
    updates = {m: [] for m in methods}
    for _ in range(args.reps):
        for m, runner in runners.items():
            for _ in range(args.steps):
                total, update = runner.step()
                totals[m].append(total)
                updates[m].append(update)
    rows = {}
    for m, runner in runners.items():
        ranks = runner.timed_ranks
        rows[m] = {
            "iteration_ms": ms(totals[m]),
            "update_ms": ms(updates[m]),
            "trainable_params": runner.trainable(),
            "mean_rank": statistics.mean(ranks) if ranks else None,
            "mean_rank_range": [min(ranks), max(ranks)] if ranks else None,
        }
    del runners
    for m in methods:
        rows[m]["peak_memory_mb"] = memory_in_subprocess(m, args)
    report(rows, args)


def report(rows: dict, args) -> None:
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    setting = (
        f"DeBERTa-v3 {args.geometry} geometry, batch {args.batch} x {args.seq}, {args.device}, "
        f"{args.precision}, init rank {args.rank}, {torch.get_num_threads()} threads, {device_name}"
    )
    ratios = {}
    it = {m: r["iteration_ms"]["median"] for m, r in rows.items()}
    up = {m: r["update_ms"]["median"] for m, r in rows.items()}
    for geo in ("geolora", "geolora_c10"):
        for peer in ("lora", "adalora"):
            if geo in rows and peer in rows:
                ratios[f"{geo}/{peer} iteration"] = it[geo] / it[peer]
                ratios[f"{geo}/{peer} update"] = up[geo] / up[peer] if up[peer] else None
        if geo in rows and "lora" in rows:
            ratios[f"{geo}/lora peak memory"] = rows[geo]["peak_memory_mb"] / rows["lora"]["peak_memory_mb"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"step_time_{args.geometry}_{args.device.split(':')[0]}" + (
        "" if args.precision == "fp32" else f"_{args.precision}"
    )
    (out / f"{name}.json").write_text(json.dumps({"setting": setting, "methods": rows, "ratios": ratios}, indent=2))
    lines = [
        f"**{setting}**",
        "",
        "| method | iteration ms (median / min / max) | update ms (median) | peak memory MiB | trainable params "
        "| mean rank the timed steps ran at (mean, min-max) |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        i = r["iteration_ms"]
        rank = "—"
        if r["mean_rank"] is not None:
            low, high = r["mean_rank_range"]
            rank = f"{r['mean_rank']:.1f} ({low:.1f}-{high:.1f})"
        lines.append(
            f"| {m} | {i['median']:.1f} / {i['min']:.1f} / {i['max']:.1f} | {r['update_ms']['median']:.1f} | "
            f"{r['peak_memory_mb']:.0f} | {r['trainable_params']:,} | {rank} |"
        )
    lines += ["", "| ratio | value |", "|---|---|"] + [
        f"| {k} | {v:.3f} |" for k, v in ratios.items() if v is not None
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: len(rows) + 4]))
    print("\nratios (GeoLoRA over peers; < 1 is faster / smaller):")
    for k, v in ratios.items():
        print(f"  {k:36s} {v:.3f}" if v is not None else f"  {k:36s} n/a")


if __name__ == "__main__":
    main()
