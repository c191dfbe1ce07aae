"""Run one experiment (or a sweep with -m): model x task x method, composed by Hydra from conf/.

python run.py                                            # offline default (MiniLM-L6, movie reviews)
python run.py model=deberta task=glue/rte method=geolora
python run.py -m method=geolora,lora,adalora task=glue/rte,glue/mrpc seed=0,1,2
torchrun --standalone --nproc_per_node=2 run.py ...      # DistributedDataParallel, gloo on CPU
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments import distributed
from experiments.cli import install_one_line_errors
from experiments.config import register

register()
install_one_line_errors()
sys.argv += distributed.hydra_overrides()  # torchrun: only rank 0's Hydra folder is the run folder
log = logging.getLogger("run")


def keep_log_out_of(run_dir: str) -> None:
    """A skipped run's ``run.log`` stays as the run wrote it: this job's log goes to the console only (Hydra has
    opened that file to append to it, and sets up logging afresh for the next job of a sweep). Hydra has also
    rewritten the run's ``.hydra/`` copies by now; ``make reproduce-tables`` avoids that by not starting sweeps
    whose runs are all finished."""
    root, folder = logging.getLogger(), Path(run_dir).resolve()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(folder):
            root.removeHandler(handler)
            handler.close()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.records import finished_summary
    from experiments.train import train

    distributed.init(cfg.trainer.device)
    run_dir = distributed.agree(HydraConfig.get().runtime.output_dir)  # rank 0 decides (a ${now:} name differs)
    summary = finished_summary(run_dir) if cfg.skip_finished else None
    if summary is not None:
        keep_log_out_of(run_dir)
        log.info("skip %s (done; skip_finished=false runs it again)", run_dir)
    else:
        summary = train(cfg, run_dir)
    distributed.close()
    value = summary["final"].get(summary["main_metric"])
    log.info("%s: %s = %s, run folder %s", summary["status"], summary["main_metric"], value, run_dir)
    return value


if __name__ == "__main__":
    main()
