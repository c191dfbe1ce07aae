"""`make gpu-check`'s dry run: the same code paths (bench in fp32 and fp16 autocast, a harness run at the GLUE
settings) on tiny sizes on the CPU, writing the Markdown report."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_markdown_report(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "scripts" / "gpu_check.py"),
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_check_cpu.md").read_text()
    assert "Device: **CPU" in report and "torch 2." in report
    assert "### fp32" in report and "### fp16" in report and "FAILED" not in report
    assert "| 1 process | 6 |" in report
    assert (tmp_path / "step_time_tiny_cpu.md").is_file() and (tmp_path / "step_time_tiny_cpu_fp16.md").is_file()
