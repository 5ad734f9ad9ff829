"""Communication for context parallelism over torch.distributed (NCCL on GPUs, gloo on
the CPU): async all-gather and reduce-scatter of packed K/V, and the ring exchange
(batched isend/irecv to the next rank, from the previous one).

Async collectives run on the process group's own stream (NCCL's communication stream), so
the compute issued after them overlaps; ``wait()`` makes the current stream wait for them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


# torch 2.13 renamed the flat collectives (the old names warn); torch 2.11 has only the old ones.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Comm:
    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("group: torch.distributed is not initialized; expected init_process_group() first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.next_global = dist.get_global_rank(self.group, (self.rank + 1) % self.world_size)
        self.prev_global = dist.get_global_rank(self.group, (self.rank - 1) % self.world_size)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor):
        """out (world * n, ...) <- every rank's inp (n, ...), rank-major. Returns a work handle."""
        return _all_gather_flat(out, inp, group=self.group, async_op=True)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor):
        """out (n, ...) <- sum over ranks of inp[rank * n : (rank + 1) * n]. Returns a work handle."""
        return _reduce_scatter_flat(out, inp, group=self.group, async_op=True)

    def ring_exchange(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Send ``send`` to the next rank and receive the previous rank's into ``recv``."""
        ops = [dist.P2POp(dist.isend, send, self.next_global, self.group),
               dist.P2POp(dist.irecv, recv, self.prev_global, self.group)]
        return dist.batch_isend_irecv(ops)


def wait_all(works) -> None:
    for w in works:
        w.wait()
