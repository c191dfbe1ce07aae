"""Run one experiment (or a sweep with -m): model x task x method, composed by Hydra from conf/.

    python run.py                                            # offline default (MiniLM-L6, movie reviews)
    python run.py model=deberta task=glue/rte method=geolora
    python run.py -m method=geolora,lora,adalora task=glue/rte,glue/mrpc seed=0,1,2
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from experiments.cli import install_one_line_errors
from experiments.config import register

register()
install_one_line_errors()
log = logging.getLogger("run")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.train import train

    summary = train(cfg, HydraConfig.get().runtime.output_dir)
    value = summary["final"].get(summary["main_metric"])
    log.info("done: %s = %s, run folder %s", summary["main_metric"], value, HydraConfig.get().runtime.output_dir)
    return value


if __name__ == "__main__":
    main()
