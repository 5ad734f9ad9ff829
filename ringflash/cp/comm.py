"""Communication for context parallelism over torch.distributed (NCCL on GPUs, gloo on
the CPU): async all-gather and reduce-scatter of packed K/V, the ring exchange (batched
isend/irecv to the next rank, from the previous one), the all-to-all of Ulysses, and the
sub-communicators of the hybrid strategy (``hybrid_comms``).

Async collectives run on the process group's own stream (NCCL's communication stream), so
the compute issued after them overlaps; ``wait()`` makes the current stream wait for them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from . import profile


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
        #: Times the waits on this communicator's collectives (``profile``); off by default.
        self.profiler: profile.Profiler | profile._Off = profile.OFF

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor):
        """out (world * n, ...) <- every rank's inp (n, ...), rank-major. Returns a work handle."""
        work = _all_gather_flat(out, inp, group=self.group, async_op=True)
        return self.profiler.timed_wait(work, "all_gather", out.device)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor):
        """out (n, ...) <- sum over ranks of inp[rank * n : (rank + 1) * n]. Returns a work handle."""
        work = _reduce_scatter_flat(out, inp, group=self.group, async_op=True)
        return self.profiler.timed_wait(work, "reduce_scatter", out.device)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_rows: list[int], inp_rows: list[int]):
        """Rows ``inp[sum(inp_rows[:s]) :][: inp_rows[s]]`` go to rank s; ``out``'s rows are every
        rank's in rank order, ``out_rows[s]`` from rank s (uneven splits; zeros allowed). Both
        contiguous. Returns a work handle."""
        work = dist.all_to_all_single(out, inp, out_rows, inp_rows, group=self.group, async_op=True)
        return self.profiler.timed_wait(work, "all_to_all", out.device)

    def ring_exchange(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Send ``send`` to the next rank and receive the previous rank's into ``recv``."""
        ops = [dist.P2POp(dist.isend, send, self.next_global, self.group),
               dist.P2POp(dist.irecv, recv, self.prev_global, self.group)]
        return [self.profiler.timed_wait(w, "ring", recv.device) for w in dist.batch_isend_irecv(ops)]


def wait_all(works) -> None:
    for w in works:
        w.wait()


@contextlib.contextmanager
def settled_on_error(posted: list) -> Iterator[None]:
    """On an exception inside the block, wait for the work handles in ``posted`` (those
    already waited for return at once) before it propagates. A ring loop that raises
    between posting an exchange and waiting for it (the local kernel failing, out of memory)
    leaves a send and a receive in flight; every rank posted the same ones, and unwaited
    they blocked the group's next collective (the next Plan's checks hung, for a caller that
    caught the error to retry). Errors of these waits are dropped: the exception raised in
    the block is the one to report."""
    try:
        yield
    except Exception:  # not an interrupt: the process is going down, and a wait could block it
        for w in posted:
            try:
                w.wait()
            except Exception:
                pass  # the block's exception is the one to report
        raise


# Sub-communicators of hybrid plans, created once per (group, degree) and kept for the
# life of the process (a training run builds a plan per batch on the same group). Each
# entry holds its parent group, so that a parent's id can never be reused by another group
# while the entry exists.
_HYBRID: dict[tuple[int, int], tuple] = {}
# Every sub-group made, by (creation mode, global ranks): the same ranks are never created
# twice (new_group's local mode names a group by its ranks).
_SUBGROUPS: dict[tuple[bool, tuple[int, ...]], dist.ProcessGroup] = {}


def _subgroup(ranks: list[int], whole: bool) -> Optional[dist.ProcessGroup]:
    """A group of these global ranks. ``whole``: the parent is the whole job, and every rank
    makes this call (new_group's contract); else only the parent's ranks do, and new_group
    synchronizes only the members."""
    key = (whole, tuple(ranks))
    if key not in _SUBGROUPS:
        if whole:
            _SUBGROUPS[key] = dist.new_group(ranks)
        elif dist.get_rank() in ranks:
            _SUBGROUPS[key] = dist.new_group(ranks, use_local_synchronization=True)
        else:
            return None
    return _SUBGROUPS[key]


def hybrid_comms(comm: Comm, degree: int) -> tuple[Comm, Comm]:
    """(ulysses, across): the 2-D split of ``comm``'s W ranks used by the hybrid strategy.
    ``ulysses`` is this rank's group of ``degree`` consecutive ranks (g * degree + j for
    j < degree, where g = rank // degree); ``across`` holds the ranks at the same place j
    in every Ulysses group (rank index g in it). Collective: every rank of ``comm`` calls
    it with the same degree, in the same order as its other calls; the groups are created
    on the first call for (group, degree), in one fixed order, and cached."""
    key = (id(comm.group), degree)
    hit = _HYBRID.get(key)
    if hit is None or hit[0] is not comm.group:
        w = comm.world_size
        glob = [dist.get_global_rank(comm.group, i) for i in range(w)]
        whole = w == dist.get_world_size()
        lists = [glob[g * degree:(g + 1) * degree] for g in range(w // degree)]
        lists += [glob[j::degree] for j in range(degree)]
        made = [comm.group if ranks == glob else _subgroup(ranks, whole) for ranks in lists]
        group, j = divmod(comm.rank, degree)
        ulysses, across = Comm(made[group]), Comm(made[w // degree + j])
        if (ulysses.rank, across.rank) != (j, group):
            raise RuntimeError(f"group: rank order of the sub-groups ({ulysses.rank}, {across.rank}) differs from "
                               f"the plan's ({j}, {group}); expected a group whose global ranks increase with "
                               "the group rank")
        hit = _HYBRID[key] = (comm.group, ulysses, across)
    return hit[1], hit[2]
