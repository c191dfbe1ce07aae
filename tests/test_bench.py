"""The step-time benchmark runs end to end on a tiny geometry and reports what it promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the bench end to end: `make test-all`

ROOT = Path(__file__).resolve().parents[1]


def test_bench_script_writes_table_and_ratios(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench_step.py"),
        "--geometry",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "16",
        "--rank",
        "4",
        "--warmup",
        "1",
        "--reps",
        "2",
        "--steps",
        "1",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "step_time_tiny_cpu.json").read_text())
    assert set(data["methods"]) == {"frozen", "lora", "adalora", "geolora", "geolora_c10"}
    for name, row in data["methods"].items():
        assert row["iteration_ms"]["median"] > 0
        assert row["peak_memory_mb"] >= 0
        assert (row["trainable_params"] > 0) == (name != "frozen")
        if name.startswith("geolora"):  # the ranks the timed steps ran at
            low, high = row["mean_rank_range"]
            assert 1 <= low <= row["mean_rank"] <= high <= 8
    assert {"geolora/lora iteration", "geolora/adalora update", "geolora_c10/lora iteration"} <= set(data["ratios"])
    assert "ratios" in result.stdout.splitlines()[-len(data["ratios"]) - 1]
    assert (tmp_path / "step_time_tiny_cpu.md").is_file()
