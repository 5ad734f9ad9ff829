"""Run a function on several local processes joined by a process group: gloo on the CPU
(Triton's interpreter), or NCCL with one GPU per process. Used by ``ringflash demo``,
``ringflash bench cp`` and the tests. Multi-node runs go through torchrun instead.

``run_local(target, world_size, payload, backend)`` spawns the processes on a free port;
each calls ``target(rank, world_size, payload)`` and sends back its return value or its
traceback. A timeout kills every process, so a hang becomes an error.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, backend, target, payload, queue):
    if backend == "gloo":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":
            # NCCL's kernels on a high-priority stream: a collective issued while an attention
            # kernel fills every SM then gets SMs as soon as blocks retire, instead of waiting
            # for the whole kernel to drain, so communication actually overlaps compute.
            os.environ.setdefault("TORCH_NCCL_HIGH_PRIORITY", "1")
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            queue.put((rank, "ok", target(rank, world_size, payload)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including assertion failures, to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_local(target, world_size: int, payload=None, backend: str = "gloo", timeout: float = 600.0) -> list:
    """Returns each rank's return value, in rank order; raises with the first traceback."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: got {backend!r}; expected 'gloo' or 'nccl'")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, backend, target, payload, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the others may be blocked in a collective with the failed rank
    except Exception as exc:  # queue.Empty: a hang
        errors.append(f"timed out after {timeout}s waiting for the ranks ({type(exc).__name__})")
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 0.1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
