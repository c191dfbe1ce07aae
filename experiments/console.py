"""What a run prints: its progress bar, one line per evaluation and the warnings that matter. The libraries'
load reports, progress bars and deprecation notices show only with ``verbose=true``."""

from __future__ import annotations

import logging
import warnings

LIBRARIES = ("transformers", "diffusers", "datasets", "peft", "huggingface_hub", "accelerate")


def quiet_libraries(verbose: bool) -> None:
    """Set the libraries' loggers, progress bars and deprecation warnings for this run (process-wide)."""
    import datasets
    import transformers

    level = logging.WARNING if verbose else logging.ERROR
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(level)
    transformers.logging.set_verbosity(level)
    (transformers.logging.enable_progress_bar if verbose else transformers.logging.disable_progress_bar)()
    (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()
    try:
        import diffusers
    except ImportError:  # only the DreamBooth family needs it
        pass
    else:
        diffusers.logging.set_verbosity(level)
        (diffusers.logging.enable_progress_bar if verbose else diffusers.logging.disable_progress_bar)()
    action = "default" if verbose else "ignore"
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings(action, category=category)
    for module in (
        "transformers",
        "diffusers",
        "datasets",
    ):  # their advice on setups not ours ("not set in the config")
        warnings.filterwarnings(action, category=UserWarning, module=module)
