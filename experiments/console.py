"""What a run prints: its progress bar, one line per evaluation and the warnings that matter. The libraries'
load reports, progress bars and deprecation notices show only with ``verbose=true``."""

from __future__ import annotations

import logging
import warnings

LIBRARIES = ("transformers", "diffusers", "datasets", "peft", "huggingface_hub", "accelerate")


def quiet_libraries(verbose: bool) -> None:
    if verbose:
        return
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        import diffusers
    except ImportError:  # only the DreamBooth family needs it
        pass
    else:
        diffusers.logging.set_verbosity_error()
        diffusers.logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for module in (
        "transformers",
        "diffusers",
        "datasets",
    ):  # their advice on setups not ours ("not set in the config")
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
