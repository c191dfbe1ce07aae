"""Multi-process training under ``torchrun`` / ``accelerate launch`` (DistributedDataParallel, gloo on CPU,
nccl on GPUs).

Every process reads the same global batches in the same order (the single-process data order) and trains on
its contiguous share (``trainer.batch_size`` stays the global batch); DDP averages the gradients, so each
replica takes the same optimizer step and GeoLoRA the same rank decisions, which ``replicas_identical``
checks at every evaluation; evaluation batches are shared out and the predictions gathered. Only rank 0
writes the run folder, W&B and checkpoints, and rank 0 decides the folder for all.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> Context:
    """The process's place in a ``torchrun`` launch (world size 1 otherwise), from the environment."""
    env = os.environ
    return Context(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init(device_name: str) -> Context:
    """Join the process group of a multi-process launch (once); a single process gets a trivial context."""
    context = launched()
    if context.enabled and not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return context


def hydra_overrides() -> list[str]:
    """Command-line additions for processes other than rank 0: their Hydra folder goes to a temporary place
    (the run folder is rank 0's, broadcast in ``agree``)."""
    context = launched()
    if not context.enabled or context.is_main:
        return []
    return [
        f"hydra.run.dir={tempfile.gettempdir()}/geolora-rank{context.rank}-{os.getpid()}",
        "hydra.output_subdir=null",
    ]


def agree(value):
    """Rank 0's ``value`` on every process (the run folder, a ``${now:...}`` name computed per process)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_batch_size(batch_size: int, context: Context) -> None:
    if context.enabled and batch_size % context.world_size:
        raise UserError(
            f"trainer.batch_size={batch_size} (the global batch) does not split over "
            f"{context.world_size} processes; use a multiple of the process count"
        )


def shard(batch: dict[str, torch.Tensor], context: Context) -> dict[str, torch.Tensor] | None:
    """This process's contiguous share of a global batch (every tensor's first dimension). A last, short
    batch is split as evenly as it goes; one smaller than the process count is skipped by every process."""
    if not context.enabled:
        return batch
    size = next(iter(batch.values())).shape[0]
    if size < context.world_size:
        return None
    return {k: torch.tensor_split(v, context.world_size)[context.rank] for k, v in batch.items()}


def _device() -> torch.device:
    """Where collectives take their tensors: the process's GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean(value: float, context: Context) -> float:
    """The mean of ``value`` over the processes (the global loss from the shares' losses)."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.item() / context.world_size


def gather_sorted(items: list[tuple], context: Context) -> list[tuple]:
    """Every process's ``(index, ...)`` items, from all processes, in index order (an evaluation gathered)."""
    if not context.enabled:
        return items
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, items)
    return sorted((item for part in gathered for item in part), key=lambda item: item[0])


def replicas_identical(model: torch.nn.Module, ranks: dict[str, int], context: Context) -> bool:
    """Whether every process holds the same trainable weights and ranks: a float64 checksum of each trainable
    tensor and the ranks, gathered from all processes and compared exactly."""
    if not context.enabled:
        return True
    sums = [p.detach().double().sum().to(_device()) for p in model.parameters() if p.requires_grad]
    checksum = torch.stack(
        sums + [torch.tensor(float(r), dtype=torch.float64, device=_device()) for r in ranks.values()]
    )
    gathered = [torch.empty_like(checksum) for _ in range(context.world_size)]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def close() -> None:
    """Tear the process group down once every process got here: a process that exits while rank 0 is still
    writing its files must not close connections the group's threads still hold."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
