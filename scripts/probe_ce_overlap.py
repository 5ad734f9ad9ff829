"""Does a K/V all-gather slow the attention kernel it overlaps? (2 GPUs.)

Times, on each rank, an attention forward of the zigzag_llama3 step's size (8k local
queries, 32/8 heads, d=128, bf16, against 16k keys) alone, and while the step's K/V
exchange (33.5 MB per rank) runs beside it in two ways:

* NCCL's all-gather (its kernels take SMs from the attention kernel);
* a copy-engine copy: the peer's K/V read from symmetric memory with ``copy_`` on a side
  stream (a DMA transfer over NVLink that uses no SMs).

Prints the median times (slowest rank). If the copy-engine transfer overlaps for free, a
gather built on it could hide the forward's exposed all-gather (docs/benchmarks.md).

    python scripts/probe_ce_overlap.py
"""

from __future__ import annotations

import torch

from ringflash.cp.launch import run_local

ROWS, HEADS, KV_HEADS, HEADDIM = 8192, 32, 8, 128
SAMPLES = 15


def _timed(fn, main: torch.cuda.Stream) -> tuple[float, float]:
    """(kernel us, total us): fn() returns the events around its kernel on ``main``."""
    import torch.distributed as dist

    kernel, total = [], []
    for i in range(SAMPLES + 3):
        dist.barrier()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(main)
        k0, k1 = fn()
        end.record(main)
        torch.cuda.synchronize()
        if i >= 3:
            kernel.append(k0.elapsed_time(k1) * 1000 if k0 is not None else 0.0)
            total.append(start.elapsed_time(end) * 1000)
    return sorted(kernel)[len(kernel) // 2], sorted(total)[len(total) // 2]


def worker(rank: int, world: int, _payload):
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from ringflash import flash_attn_varlen_func

    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(rank)
    q = torch.randn(ROWS, HEADS, HEADDIM, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(world * ROWS, KV_HEADS, HEADDIM, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    cu_q = torch.tensor([0, ROWS], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, world * ROWS], dtype=torch.int32, device=dev)
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()

    def attention():
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(main)
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, ROWS, world * ROWS, causal=True)
        e1.record(main)
        return e0, e1

    send = torch.randn(ROWS, 2, KV_HEADS, HEADDIM, device=dev, dtype=torch.bfloat16, generator=gen)
    gathered = send.new_empty((world * ROWS,) + tuple(send.shape[1:]))

    def nccl_gather():
        return dist.all_gather_into_tensor(gathered, send, async_op=True)

    # Symmetric memory: every rank's send buffer is mapped into the others' address space.
    group_name = dist.group.WORLD.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        symm_mem.enable_symm_mem_for_group(group_name)
    sym = symm_mem.empty(tuple(send.shape), dtype=send.dtype, device=dev)
    sym.copy_(send)
    handle = symm_mem.rendezvous(sym, group_name)
    peers = [handle.get_buffer(r, tuple(send.shape), send.dtype) for r in range(world)]
    dist.barrier()
    torch.cuda.synchronize()

    def ce_gather():
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for r in range(world):
                gathered[r * ROWS:(r + 1) * ROWS].copy_(peers[r])
        return side

    # Check once that the copy-engine gather is the all-gather.
    ce_gather()
    torch.cuda.synchronize()
    expected = gathered.clone()
    nccl_gather().wait()
    torch.cuda.synchronize()
    same = bool(torch.equal(expected, gathered))

    def nccl_alone():
        nccl_gather().wait()
        return None, None

    def ce_alone():
        main.wait_stream(ce_gather())
        return None, None

    def nccl_overlap():
        work = nccl_gather()
        events = attention()
        work.wait()
        return events

    def ce_overlap():
        stream = ce_gather()
        events = attention()
        main.wait_stream(stream)
        return events

    out = {"ce gather equals nccl gather": same}
    for name, fn in (("attention alone", attention), ("nccl all-gather alone", nccl_alone),
                     ("copy-engine gather alone", ce_alone), ("attention + nccl all-gather", nccl_overlap),
                     ("attention + copy-engine gather", ce_overlap)):
        out[name] = _timed(fn, main)
    return out


if __name__ == "__main__":
    res = run_local(worker, 2, None, backend="nccl", timeout=300)
    print(f"device: {torch.cuda.get_device_name(0)} x 2, torch {torch.__version__}")
    print(f"copy-engine gather equals NCCL's: {all(r['ce gather equals nccl gather'] for r in res)}")
    print("| what | attention kernel us | total us |")
    print("|---|---|---|")
    for name in res[0]:
        if name == "ce gather equals nccl gather":
            continue
        kernel = max(r[name][0] for r in res)
        total = max(r[name][1] for r in res)
        print(f"| {name} | {kernel:.0f} | {total:.0f} |" if kernel else f"| {name} | - | {total:.0f} |")
