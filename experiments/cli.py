"""One-line errors for bad input on the command line.

Hydra prints composition errors (unknown key, bad value, missing config) over several lines; this
reports them, and our own UserErrors, as one ``error: ...`` line that keeps the hint. Bugs keep their
traceback, and HYDRA_FULL_ERROR=1 shows everything, as in plain Hydra.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import hydra._internal.utils as hydra_utils
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError

_NOISE = (
    "full_key:",
    "reference_type=",
    "object_type=",
    "Config search path",
    "provider=",
    "Set the environment variable HYDRA_FULL_ERROR",
)


def condense(error: BaseException) -> str:
    """The error and its OmegaConf cause on one line, without Hydra's bookkeeping lines."""
    parts = [str(error)]
    if isinstance(error.__cause__, OmegaConfBaseException) and str(error.__cause__) not in parts[0]:
        parts.append(str(error.__cause__))
    lines = [line.strip() for part in parts for line in part.splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE)]
    return " ".join(kept)


def _report(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except (HydraException, OmegaConfBaseException, UserError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {condense(error)}", file=sys.stderr)
        sys.exit(2)
    except PermissionError as error:  # e.g. a run folder that cannot be written
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}; pick a writable folder (hydra.run.dir=..., hydra.sweep.dir=...)", file=sys.stderr)
        sys.exit(2)


def install_one_line_errors() -> None:
    """Route Hydra's error reporting through ``_report`` (hydra-core 1.3)."""
    hydra_utils.run_and_report = _report
