"""The GPU check, one command: `make gpu-check` (``python scripts/gpu_check.py --device cuda``).

1. the step-time bench (scripts/bench_step.py) at the DeBERTa-v3-base geometry, batch 32 x 256, in fp32 and with
   fp16 autocast (GradScaler);
2. one short run of the harness at a GLUE geometry: a DeBERTa-v3-base-sized model with random weights (no hub is
   needed) on synthetic RTE-format sentences, ``model=deberta task=glue/rte`` with the paper's GeoLoRA settings
   (coefficient cycles of 10), fp16;
3. the same run on 2 processes with NCCL DDP when the machine has 2 GPUs (replicas checked at every evaluation).

Writes ``gpu_check_<device>.md`` (the GPU's name, the versions, every table) and the bench's own files into
``--out`` (default results/bench/). ``--device cpu --tiny`` is a dry run of the same code paths on tiny sizes
(the test suite runs it). Needs torch with CUDA and this project's other requirements (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
DEBERTA_V3 = dict(
    max_position_embeddings=512, relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"]
)


def _run(command: list[str], timeout: int, **kwargs) -> tuple[int, str, float]:
    """(exit status, last lines of the output, seconds)."""
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kwargs)
        status, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as err:
        status, text = 124, f"timed out after {timeout} s: {err}"
    return status, "\n".join(text.strip().splitlines()[-15:]), time.perf_counter() - start


def bench(args, out: Path) -> list[str]:
    """The bench in fp32 and fp16 autocast: its tables, as the bench writes them."""
    sizes = ["--geometry", "tiny", "--batch", "2", "--seq", "16", "--reps", "2", "--warmup", "1"] if args.tiny else [
        "--geometry", "base", "--batch", "32", "--seq", "256"
    ]  # fmt: skip
    lines = ["## Step-time bench", ""]
    for precision in ("fp32", "fp16"):
        command = [sys.executable, str(ROOT / "scripts" / "bench_step.py"), *sizes, "--device", args.device]
        status, tail, seconds = _run([*command, "--precision", precision, "--out", str(out)], args.timeout)
        suffix = "" if precision == "fp32" else f"_{precision}"
        table = out / f"step_time_{sizes[1]}_{args.device}{suffix}.md"
        if status == 0 and table.is_file():
            lines += [f"### {precision} ({seconds:.0f} s)", "", table.read_text(), ""]
        else:
            lines += [f"### {precision}: FAILED (exit {status})", "", "```", tail, "```", ""]
    return lines


def harness_command(args, model: Path, data: Path, run_dir: Path) -> list[str]:
    """``run.py`` at the paper's RTE settings (conf/hparams/glue/rte), shortened."""
    return [
        "model=deberta",
        f"model.name_or_path={model}",
        "task=glue/rte",
        f"task.data_dir={data}",
        "method=geolora",
        f"trainer.device={args.device}",
        f"trainer.precision={'fp32' if args.device == 'cpu' else 'fp16'}",
        f"trainer.max_steps={6 if args.tiny else 60}",
        f"trainer.batch_size={8 if args.tiny else 32}",
        f"trainer.eval_every={3 if args.tiny else 30}",
        "trainer.warmup_steps=0",
        "logger=none",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    ]


def harness(args, workdir: Path) -> list[str]:
    """One short GLUE-geometry run on one device and, with 2 GPUs, on two processes (NCCL)."""
    import torch

    from experiments.synthetic import deberta_dir, write_text_task

    model = deberta_dir(workdir / "model", **(TINY if args.tiny else BASE), **DEBERTA_V3)
    data = write_text_task(
        workdir / "rte", ["sentence1", "sentence2"], 2, ["entailment", "not_entailment"], ["train", "validation"],
        rows=64 if args.tiny else 2048,
    )  # fmt: skip
    rows = []
    launches = [("1 process", [sys.executable, str(ROOT / "run.py")])]
    if args.device == "cuda" and torch.cuda.device_count() >= 2:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        launches.append(("2 processes, NCCL DDP", [*torchrun, str(ROOT / "run.py")]))
    for name, launcher in launches:
        run_dir = workdir / name.split(",")[0].replace(" ", "_")
        status, tail, seconds = _run([*launcher, *harness_command(args, model, data, run_dir)], args.timeout)
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if status != 0 or summary.get("status") != "finished":
            rows.append(f"| {name} | FAILED (exit {status}) | | | | | | |")
            rows.append(f"\n```\n{tail}\n```\n")
            continue
        final = summary["final"]
        rows.append(
            f"| {name} | {summary['steps']} | {final.get('eval/accuracy', float('nan')):.4f} | "
            f"{final.get('total_rank')} | {summary['trainable_params_final']:,} | "
            f"{1e3 * summary['step_time_median_s']:.1f} | {summary['peak_memory_mb']:.0f} | "
            f"{summary.get('replicas_identical')} ({summary.get('world_size')} processes) |"
        )
    geometry = "tiny" if args.tiny else "DeBERTa-v3-base"
    return [
        f"## Harness run ({geometry} geometry, random weights, synthetic RTE, GeoLoRA c = 10)",
        "",
        "| launch | steps | accuracy | total rank | params in use | step ms (median) | peak MiB "
        "| replicas identical |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def versions(device: str) -> list[str]:
    import torch

    from experiments.records import provenance

    facts = provenance(torch.device(device))
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    cuda = f", CUDA {torch.version.cuda}" if device == "cuda" else ""
    listed = ", ".join(f"{k} {v}" for k, v in facts["versions"].items() if v)
    return [f"Device: **{gpu}**{cuda}; {listed}; commit {(facts['commit'] or 'unknown')[:10]}", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a dry run of the same code paths")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per command")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here: run `make gpu-check` on a machine with a GPU (or --device cpu --tiny)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        lines = [f"# GPU check ({args.device}{', tiny sizes' if args.tiny else ''})", "", *versions(args.device)]
        lines += bench(args, out) + harness(args, Path(workdir))
    report = out / f"gpu_check_{args.device}.md"
    report.write_text("\n".join(lines) + "\n")
    print(report.read_text())
    failed = "FAILED" in report.read_text()
    print(f"{'error: a check failed' if failed else 'every check passed'}; report: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
