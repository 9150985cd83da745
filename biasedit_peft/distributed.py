"""Several processes (``accelerate launch`` or ``torchrun``) computing what one process would: shards and sums.

The joint solve is a sum over tokens, so it splits exactly. With ``U [N, d_in]`` the keys and ``D [N, d_out]``
the value changes, each process holds the rows of its own shard of the samples, and

- primal: ``U^T U`` and ``U^T D`` are sums of per-process partial sums; one all-reduce of each (in float64)
  gives every process the system one process would build from all ``N`` rows;
- dual: ``U U^T`` couples every pair of rows, so ``U`` and ``D`` are gathered instead.

``editor.solve.solve_ridge(..., processes=)`` picks the form from the total ``N``, as one process would. The
only difference from one process is the order of the float64 additions: on well-spread keys the deltas agree to
float32 rounding; on harsh, rank-deficient keys (a Gram diagonal of 1e8 against lambda = 1) float64 rounding in
the unspanned directions shows, measured 1.2e-6 relative (tests/test_distributed.py).

:class:`Processes` is the small view of the process group the package needs (rank, size, sums, gathers). It
comes from an ``Accelerator`` (or accelerate's ``PartialState``) when one is passed, else from an initialised
``torch.distributed`` group, else it is the single process, whose collectives are the identity, so every caller
behaves as before without a launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Processes:
    """``rank`` of ``world_size`` processes; collectives over the default ``torch.distributed`` group."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n_items: int) -> slice:
        """This process's contiguous block of ``n_items`` (sizes differ by at most one; rank order = item order).

        Raises:
            ValueError: Fewer items than processes (a process would hold none).
        """
        if n_items < self.world_size:
            raise ValueError(f"{n_items} samples cannot be split across {self.world_size} processes; use fewer "
                             "processes or more samples")
        base, extra = divmod(n_items, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (a new tensor; every process gets the same)."""
        if not self.distributed:
            return tensor.clone()
        import torch.distributed as dist

        total = tensor.detach().clone().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def sum_int(self, value: int) -> int:
        return int(self.sum(torch.tensor([value], dtype=torch.int64)).item())

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[n_r, ...]`` per process -> ``[sum n_r, ...]``, in rank order, on every process (sizes may differ)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.int64))
        rows = [int(size) for size in sizes]
        padded = torch.zeros((max(rows), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(gathered, rows)])

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Give every process rank 0's parameters and buffers (in place), as DDP does at the start: one process's
        random initialisation for all."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Processes()
"""One process: every collective is the identity."""


def as_processes(given: Any | None) -> Processes:
    """``given`` as :class:`Processes`: itself, those of an ``Accelerator`` / ``PartialState`` (anything with
    ``process_index`` and ``num_processes``), or for None :func:`current_processes`."""
    return given if isinstance(given, Processes) else current_processes(given)


def current_processes(accelerator: Any | None = None) -> Processes:
    """The processes this one belongs to.

    Args:
        accelerator: An ``accelerate.Accelerator`` or ``PartialState`` (its ``process_index`` / ``num_processes``);
            None: an initialised ``torch.distributed`` default group, else accelerate's ``PartialState`` when a
            launcher set ``WORLD_SIZE`` > 1 (it initialises the group: gloo on the CPU), else one process.
    """
    if accelerator is not None:
        return Processes(int(accelerator.process_index), int(accelerator.num_processes))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # gloo on the CPU (not without cpu=True)
        return Processes(int(state.process_index), int(state.num_processes))
    return SINGLE


def leave_processes(succeeded: bool = True) -> None:
    """End a launched run: wait for every process (when this one succeeded), then destroy the process group.

    A process that exits with its gloo group alive can abort in the group's teardown while another still talks
    to it ("terminate called without an active exception", SIGABRT, seen 1 run in 8 on 2 CPU processes). After a
    failure the barrier is skipped: the others may never reach it. Nothing to do without a group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if succeeded:
            dist.barrier()
        dist.destroy_process_group()


def sum_gradients(module: torch.nn.Module, processes: Processes) -> None:
    """Replace every parameter's ``.grad`` by its sum over the processes (one all-reduce of them all, flattened).

    Each process back-propagated the loss terms of its own rows, so the sum is the one-process gradient. A
    parameter with a gradient on some process only (the ridge term, added once) gets the sum; one with a
    gradient on none keeps ``None``, as one process would (Adam skips it).
    """
    if not processes.distributed:
        return
    parameters = list(module.parameters())
    has_grad = processes.sum(torch.tensor([p.grad is not None for p in parameters], dtype=torch.int64))
    used = [p for p, count in zip(parameters, has_grad.tolist()) if count > 0]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in used]
    if not grads:
        return
    total = processes.sum(torch.cat([grad.reshape(-1) for grad in grads]))
    for parameter, summed in zip(used, total.split([p.numel() for p in used])):
        parameter.grad = summed.view_as(parameter).clone()


def process_device(device: str | torch.device, processes: Processes) -> str | torch.device:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process) when there
    are several processes; anything else is kept."""
    if processes.distributed and str(device) == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', processes.rank))}"
    return device


def split_for(processes: Processes, items: Sequence[Any]) -> list[Any]:
    """This process's share of ``items`` (:meth:`Processes.shard`)."""
    return list(items[processes.shard(len(items))])
