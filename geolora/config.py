"""Configuration of GeoLoRA adapters: which layers, which ranks, which truncation rule."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GeoLoRAConfig:
    """What to adapt and how the rank may evolve.

    target_modules: module-name suffixes (``"query_proj"`` matches ``...attention.self.query_proj``),
        or one regex string matched against the full module name.
    init_rank / max_rank / min_rank: starting rank and the bounds every truncation respects.
    tau: relative truncation tolerance, keep the smallest rank r with ||sigma[r:]|| <= tau * ||sigma||.
    alpha: the adapter adds ``alpha * U S V^T``; the scale never depends on the rank, so the network's
        function is continuous across rank changes.
    dropout: dropout on the adapter's input (as in LoRA).
    coefficient_steps: c; augment + truncate every c + 1 optimizer steps, only S moves in between.
    rank_budget: if set, truncation keeps the rank_budget largest singular values over all layers
        instead of the per-layer tau rule.
    modules_to_save: module-name suffixes trained fully (e.g. the classifier head).
    """

    target_modules: list[str] | str = field(default_factory=list)
    init_rank: int = 8
    max_rank: int = 32
    min_rank: int = 2
    tau: float = 0.15
    alpha: float = 1.0
    dropout: float = 0.0
    coefficient_steps: int = 0
    rank_budget: int | None = None
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save or [])
        if not self.target_modules:
            raise ValueError("GeoLoRAConfig.target_modules is empty: name the Linear layers to adapt")
        if self.min_rank < 1:
            raise ValueError(f"min_rank must be >= 1, got {self.min_rank}")
        if self.min_rank > self.max_rank:
            raise ValueError(
                f"min_rank ({self.min_rank}) > max_rank ({self.max_rank}): lower min_rank or raise max_rank"
            )
        if not self.min_rank <= self.init_rank <= self.max_rank:
            raise ValueError(
                f"init_rank ({self.init_rank}) must lie in [min_rank, max_rank] = [{self.min_rank}, {self.max_rank}]"
            )
        if not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau must lie in [0, 1), got {self.tau}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.coefficient_steps < 0:
            raise ValueError(f"coefficient_steps must be >= 0, got {self.coefficient_steps}")
        if self.rank_budget is not None and self.rank_budget < 1:
            raise ValueError(f"rank_budget must be a positive integer or None, got {self.rank_budget}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GeoLoRAConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GeoLoRAConfig keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**data)
