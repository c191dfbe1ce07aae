"""What an optimizer step decides before it writes anything: every layer's new rank and whether every gradient
is finite, fetched to the host in one transfer (the one device sync of an adapting step)."""

from __future__ import annotations

import torch

from .linalg import budget_ranks, truncation_ranks


def decide(
    batches: list,
    decomposed: list,
    others: list[tuple[str, torch.Tensor]],
    others_finite: torch.Tensor | None,
    rank_budget: int | None,
    truncating: bool = True,
) -> list[int]:
    """New ranks for every layer of an adapting step (``decomposed``: the optimizer's batches after the augmented
    SVD, or the SVD of S at a cycle's end; none on a coefficient-only step) by the tau rule or the global
    ``rank_budget`` (``truncating``), or what the augmented bases hold (a cycle's first step); raises
    ``FloatingPointError`` naming the layers or parameters with a non-finite gradient (or an update too large for
    the dtype)."""
    if decomposed:
        finite = [d.finite for d in decomposed]
    else:
        finite = [torch.isfinite(b.s_new).all((-2, -1)) & torch.isfinite(b.grad_s).all((-2, -1)) for b in batches]
    names = [name for b in batches for name in b.plan.names] + [name for name, _ in others]
    flags = torch.cat(finite + ([others_finite] if others_finite is not None else []))
    new_ranks: list[int] = []
    if rank_budget is not None and decomposed and truncating:
        layers = [layer for d in decomposed for layer in d.batch.plan.layers]
        # Per layer: its singular values, then its capacity; batches may differ in R.
        rows = [torch.cat([d.sigma, d.capacity.unsqueeze(-1).to(d.sigma.dtype)], -1) for d in decomposed]
        flat = torch.cat([row.flatten() for row in rows] + [flags]).double().cpu()  # the one host sync
        *chunks, host_flags = flat.split([row.numel() for row in rows] + [flags.numel()])
        host_flags = host_flags.bool().tolist()
        rows = [row for chunk, d in zip(chunks, decomposed) for row in chunk.view(len(d.batch.plan.layers), -1)]
        if all(host_flags):
            ranks = [r for d in decomposed for r in d.batch.ranks]
            lengths = [min(2 * r, layer.max_rank, int(row[-1])) for r, layer, row in zip(ranks, layers, rows)]
            new_ranks = budget_ranks(
                [row[:n] for row, n in zip(rows, lengths)],
                rank_budget,
                [layer.min_rank for layer in layers],
                [layer.max_rank for layer in layers],
            )
    else:  # one config per model: tau and the rank limits are those of the batch's first layer
        ranks = []
        for d in decomposed:
            first = d.batch.plan.layers[0]
            cut = truncation_ranks(d.sigma, first.tau, first.min_rank, first.max_rank) if truncating else d.capacity
            ranks.append(torch.minimum(cut, d.capacity))
        values = torch.cat(ranks + [flags.long()]).tolist()  # the sync
        new_ranks, host_flags = values[: len(values) - flags.numel()], values[len(values) - flags.numel() :]
    bad = [name for name, ok in zip(names, host_flags) if not ok]
    if bad:
        raise FloatingPointError(
            f"non-finite gradient or update in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: the step was not "
            "applied (parameters, moments and step counts unchanged); lower the learning rate, clip the gradients or "
            "train with a GradScaler"
        )
    return new_ranks
