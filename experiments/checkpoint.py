"""Checkpoints of a run, for an exact resume after a kill.

``<run folder>/checkpoint/`` holds ``state.json`` (``{"step": N, ...}``, readable without torch) and
``state.pt``: the trainable weights and every adapter's rank, the method's own state (AdaLoRA's importance
scores), optimizer, scheduler and GradScaler states, the RNG states (torch, CUDA, numpy, python), the data
order (the loader's generator at the start of the current epoch and the batches taken from it), and the
loop's history. It is written beside (``checkpoint.partial``) and swapped in by renames, so a kill at any
moment leaves a complete checkpoint (the new one, or the previous one as ``checkpoint.old``).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, one_line

FOLDER, PARTIAL, OLD = "checkpoint", "checkpoint.partial", "checkpoint.old"


def _kept(model: torch.nn.Module) -> set[str]:
    """The state-dict names a checkpoint keeps: trainable parameters and extra states (an adapter's rank)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k for k in model.state_dict(keep_vars=True) if k in trainable or k.endswith("_extra_state")}


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The kept entries of ``model``'s state dict, on the CPU."""
    kept = _kept(model)
    return {
        k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
        for k, v in model.state_dict().items()
        if k in kept
    }


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run, position: dict) -> Path:
    """Write the run's checkpoint atomically; ``position`` is where the data order stands (``fit`` keeps it)."""
    state, adapted = run.state, run.adapted
    partial = run.run_dir / PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    torch.save(
        {
            "model": _model_state(adapted.model),
            "method": adapted.state(),
            "optimizer": adapted.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": _rng_state(),
            "position": position,
            "loop": state.resumable(),
        },
        partial / "state.pt",
    )
    info = {
        "step": state.step,
        "total_steps": state.total_steps,
        "epoch": position["epoch"],
        "batch_in_epoch": position["batch"],
        "wandb_id": run.records.wandb_id,
    }
    (partial / "state.json").write_text(json.dumps(info, indent=2))
    current, old = run.run_dir / FOLDER, run.run_dir / OLD
    shutil.rmtree(old, ignore_errors=True)
    if current.exists():
        current.rename(old)
    partial.rename(current)
    shutil.rmtree(old, ignore_errors=True)
    return current


def find(run_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: the current one, or the previous one a kill left mid-swap."""
    for name in (FOLDER, OLD):
        if (run_dir / name / "state.json").is_file() and (run_dir / name / "state.pt").is_file():
            return run_dir / name
    return None


def info(folder: Path) -> dict:
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {folder} is unreadable ({err}); delete it or rerun with resume=false") from None


def load(run, folder: Path) -> dict:
    """Restore everything ``save`` wrote into a freshly set-up run; returns the data-order position."""
    try:
        saved = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        model = run.adapted.model
        result = model.load_state_dict(saved["model"], strict=False)
        if result.unexpected_keys:
            raise ValueError(f"weights of other modules: {result.unexpected_keys[:3]}")
        missing = _kept(model) - set(saved["model"])
        if missing:
            raise ValueError(f"no weights for {sorted(missing)[:3]}")
        run.adapted.load_state(saved["method"])
        run.adapted.optimizer.load_state_dict(saved["optimizer"])
        run.scheduler.load_state_dict(saved["scheduler"])
        run.scaler.load_state_dict(saved["scaler"])
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(
            f"checkpoint {folder} does not fit this run ({type(err).__name__}: {one_line(err)}); delete it or "
            "rerun with resume=false"
        ) from None
    run.state.restore(saved["loop"])
    return {**saved["position"], "rng": saved["rng"]}
