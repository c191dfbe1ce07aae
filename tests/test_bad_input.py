"""Bad input on the command line: each case exits non-zero with one line starting ``error: `` that names the fix,
and no traceback. The table below is the list of bad inputs tried."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one run.py subprocess per case: `make test-all`

ROOT = Path(__file__).resolve().parents[1]


def _folders(tmp: Path) -> dict[str, Path]:
    empty = tmp / "empty_model"
    empty.mkdir()
    broken = tmp / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    data = tmp / "bad_data"
    data.mkdir()
    (data / "train.csv").write_text('sentence,label\n"unclosed,1\n' + "a,b,c,d,e\n" * 3)
    (data / "validation.csv").write_text("x\n" + "1,2,3\n" * 3)
    locked = tmp / "locked"
    locked.mkdir(mode=0o500)
    return {"empty": empty, "broken": broken, "data": data, "locked": locked}


CASES = [  # (overrides, what the one line must name)
    (["experiment=doesnotexist"], "experiment/doesnotexist"),
    (["experiment=causal_lm_instruct"], "model.name_or_path"),  # a hub model offline
    (["model.name_or_path={empty}"], "model.name_or_path"),
    (["model.name_or_path={broken}"], "not a loadable model folder"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.batch_size=0"], "trainer.batch_size"),
    (["trainer.epochs=-1"], "trainer.epochs"),
    (["method.max_rank=0"], "max_rank"),
    (["method=lora", "method.r=0"], "method.r"),
    (["task=glue/sst2", "task.data_dir={data}"], "do not parse"),
    (["hydra.run.dir={locked}/run"], "writable"),
    (["-m", "hydra/launcher=nosuchlauncher", "seed=0"], "hydra/launcher"),
    (["trainer.device=cuda"], "trainer.device"),
    (["no_such_key=1"], "no_such_key"),
]


@pytest.mark.parametrize("overrides,names", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line(tmp_path, overrides, names):
    if names == "trainer.device" and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is visible")
    if names == "writable" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folders = _folders(tmp_path)
    args = [o.format(**folders) for o in overrides]
    if "-m" not in args and not any(a.startswith("hydra.run.dir") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, "logger=none", "progress=false", "task.max_train_samples=16"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode != 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(errors) == 1 and names in errors[0], out.stderr[-2000:]
