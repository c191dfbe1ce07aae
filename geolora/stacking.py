"""Stacked storage for the batched step: which layers step together (plans), and tensors kept between
steps that parameters and optimizer state are views of (buffers)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .layer import GeoLoRALinear


class Plan(NamedTuple):
    """How the layers of one maximum rank R (and dtype, device) are stacked, whatever their shapes:
    fixed while the set of stepped layers is, so it is worked out once rather than every step."""

    layers: list[GeoLoRALinear]
    names: list[str]
    coefficients: list[nn.Parameter]  # each layer's S
    groups: list[list[nn.Parameter]]  # the layers' U and V factors grouped by shape
    order: torch.Tensor  # item i of the augmentation is factor order[i] of [U_1..U_B, V_1..V_B]


def _key(role: str, item_shape: tuple, like: torch.Tensor) -> tuple:
    """Buffers are kept one per role and item shape (and dtype, device): none pile up when the number
    of stacked items changes."""
    return role, tuple(item_shape), like.dtype, like.device


def _are_views(tensors: list[torch.Tensor], stacked: torch.Tensor) -> bool:
    """Whether each ``tensors[i]`` lies where ``stacked[i]`` does (same shape assumed)."""
    start, stride = stacked.data_ptr(), stacked.stride(0) * stacked.element_size()
    return stacked.shape[0] == len(tensors) and all(
        t is not None and t.data_ptr() == start + i * stride for i, t in enumerate(tensors)
    )


def in_batch_order(values: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-item field of the augmentation (items in ``order``), for the batch's U and for its V factors."""
    return torch.empty_like(values).index_copy_(0, order, values).chunk(2)


def make_plans(layers: list[GeoLoRALinear], names: list[str], factors: list[list[nn.Parameter]]) -> list[Plan]:
    """Layers of one maximum rank are stepped together whatever their shapes and ranks, in the
    fixed-size (padded) layout: one batched base step and one batched SVD; their U and V factors
    are stacked per shape and augmented in one call. ``factors`` holds each layer's (U, S, V)."""
    by_rank: dict[tuple, list[int]] = {}
    for i, (layer, (_, s, _)) in enumerate(zip(layers, factors)):
        by_rank.setdefault((layer.max_rank, s.dtype, s.device), []).append(i)
    plans = []
    for members in by_rank.values():
        bases = [factors[i][0] for i in members] + [factors[i][2] for i in members]
        by_shape: dict[torch.Size, list[int]] = {}
        for position, basis in enumerate(bases):
            by_shape.setdefault(basis.shape, []).append(position)
        order = [p for positions in by_shape.values() for p in positions]
        plans.append(
            Plan(
                [layers[i] for i in members],
                [names[i] for i in members],
                [factors[i][1] for i in members],
                [[bases[p] for p in positions] for positions in by_shape.values()],
                torch.tensor(order, device=bases[0].device),
            )
        )
    return plans


class Buffers:
    """Tensors kept between steps, one per role and item shape (and dtype, device)."""

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.tensors)

    def keep_only(self, kinds: set[tuple]) -> None:
        """Drop the buffers of a (dtype, device) not in ``kinds`` (after a cast or a move)."""
        self.tensors = {key: value for key, value in self.tensors.items() if key[2:] in kinds}

    def scratch(self, role: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A buffer kept across steps: on CPU a fresh allocation of the stacked n-sized factors each
        step costs page faults that rival the arithmetic done with them."""
        key = _key(role, shape[1:], like)
        if key not in self.tensors or self.tensors[key].shape != shape:
            self.tensors[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self.tensors[key]

    def stacked(
        self, role: str, tensors: list[torch.Tensor], rebind: Callable[[int, torch.Tensor], None]
    ) -> torch.Tensor:
        """The stacked tensor that ``tensors`` are views of, so batched work reads and writes them in
        place. Made wherever they are not its views (the first step, after the model was moved or
        cast, or when the stepped layers change), then ``rebind(i, view)`` makes item i a view."""
        key = _key(role, tensors[0].shape, tensors[0])
        stacked = self.tensors.get(key)
        if stacked is None or not _are_views(tensors, stacked):
            stacked = self.tensors[key] = torch.stack(tensors)
            for i, view in enumerate(stacked.unbind()):
                rebind(i, view)
        return stacked

    def stacked_factors(self, role: str, factors: list[nn.Parameter]) -> torch.Tensor:
        """Factors as views of one stacked tensor: batched results land in the parameters."""
        return self.stacked(role, factors, lambda i, view: setattr(factors[i], "data", view))
