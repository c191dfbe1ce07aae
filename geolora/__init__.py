"""GeoLoRA: rank-adaptive low-rank adapters trained by geometric integration (arXiv 2410.18720)."""

from .config import GeoLoRAConfig
from .io import export_diffusers, export_peft, from_peft, load_adapter, save_adapter
from .layer import GeoLoRALinear
from .model import adapters, count_trainable, inject, merge, ranks, unmerge
from .optimizer import GeoLoRAOptimizer

__all__ = [
    "GeoLoRAConfig",
    "GeoLoRALinear",
    "GeoLoRAOptimizer",
    "adapters",
    "count_trainable",
    "export_diffusers",
    "export_peft",
    "from_peft",
    "inject",
    "load_adapter",
    "merge",
    "ranks",
    "save_adapter",
    "unmerge",
]
__version__ = "0.1.0"
