"""Run a function on several local processes joined by a process group: gloo on the CPU
(Triton's interpreter), or NCCL with one GPU per process. Used by ``ringflash demo``,
``ringflash bench cp`` and the tests. Multi-node runs go through torchrun instead.

``run_local(target, world_size, payload, backend)`` spawns the processes on a free port;
each calls ``target(rank, world_size, payload)`` and sends back its return value or its
traceback. It fails promptly, with that rank's traceback, as soon as one rank raises or
dies (a crash's native stack comes from ``faulthandler``), and a timeout kills every
process, so a hang becomes an error.

gloo ranks always run the kernels in Triton's interpreter, whatever the parent does (on a
GPU machine the parent compiles them): ``TRITON_INTERPRET=1`` is in the children's
environment from their first instruction, before unpickling the target imports anything.
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_module
import socket
import tempfile
import time
import traceback
from typing import Iterator

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, backend, target, payload, queue, crash_log):
    import faulthandler

    # A segfault or abort in this rank writes its native and Python stacks here; the parent
    # reports them, since such a rank never reaches the queue.
    log = open(crash_log, "w")
    faulthandler.enable(file=log)
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


@contextlib.contextmanager
def _child_environment(backend: str) -> Iterator[None]:
    """Environment variables the spawned children must see before they import anything
    (spawn copies the parent's environment when each process starts)."""
    changes = {}
    if backend == "gloo":
        changes["TRITON_INTERPRET"] = "1"
        # One thread per rank for the BLAS under NumPy (the interpreter's tl.dot) and for
        # OpenMP: by default each rank starts as many threads as the machine has cores, so
        # W ranks (times pytest-xdist's workers) oversubscribe the CPU many times over and
        # the BLAS threads' spin-waits make a run tens of times slower (seen on a 16-core
        # GPU machine). A value the user set is kept.
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            if name not in os.environ:
                changes[name] = "1"
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _crash_report(path: str) -> str:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return ""
    return f"\n{text}" if text else ""


def _other_failures(queue, procs, crash_logs, results: dict, reported: int, grace: float = 2.0) -> list[str]:
    """Reports of ranks other than ``reported`` that fail or die within ``grace`` seconds."""
    found, seen = [], {reported}
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and len(seen) + len(results) < len(procs):
        try:
            rank, status, value = queue.get(timeout=0.1)
        except queue_module.Empty:
            continue
        seen.add(rank)
        if status != "ok":
            found.append(f"rank {rank}:\n{value}")
    for r, p in enumerate(procs):
        if r not in seen and r not in results and not p.is_alive() and p.exitcode != 0:
            found.insert(0, f"rank {r}: exited with code {p.exitcode} without reporting a result"
                            f"{_crash_report(crash_logs[r])}")
    return found


def run_local(target, world_size: int, payload=None, backend: str = "gloo", timeout: float = 600.0) -> list:
    """Returns each rank's return value, in rank order; raises with the first failure's
    traceback as soon as a rank raises or dies, or after ``timeout`` seconds in all."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: got {backend!r}; expected 'gloo' or 'nccl'")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    logs = tempfile.TemporaryDirectory(prefix="ringflash-ranks-")
    crash_logs = [os.path.join(logs.name, f"rank{r}.log") for r in range(world_size)]
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, backend, target, payload, queue, crash_logs[r]),
                         daemon=True)
             for r in range(world_size)]
    with _child_environment(backend):
        for p in procs:
            p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, status, value = queue.get(timeout=0.2)
            except queue_module.Empty:
                # A rank that died without reporting (killed, crashed, os._exit) would
                # otherwise leave the others waiting for it until the timeout.
                dead = [r for r, p in enumerate(procs) if r not in results and not p.is_alive()]
                if not dead:
                    if time.monotonic() > deadline:
                        errors.append(f"timed out after {timeout}s waiting for ranks "
                                      f"{[r for r in range(world_size) if r not in results]}")
                        break
                    continue
                try:  # a report sent just before the exit may still be in the pipe
                    rank, status, value = queue.get(timeout=1.0)
                except queue_module.Empty:
                    errors.append(f"rank {dead[0]}: exited with code {procs[dead[0]].exitcode} without reporting "
                                  f"a result{_crash_report(crash_logs[dead[0]])}")
                    break
            if status == "ok":
                results[rank] = value
            else:
                # The others may be blocked in a collective with the failed rank: stop now,
                # after a moment to collect what else went wrong (the rank that failed first
                # may be a peer's victim: gloo reports a dead peer as a connection error).
                errors.append(f"rank {rank}:\n{value}")
                errors += _other_failures(queue, procs, crash_logs, results, rank)
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        logs.cleanup()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
